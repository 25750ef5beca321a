//! Block buffers that go back to a pool when the last `Bytes` made from them is dropped.
//!
//! An upload reads every block of the image into a fresh 512 KiB buffer and hands it to the
//! HTTP client, which owns it until the request is done. Allocating each buffer anew costs a
//! trip through malloc (a large chunk, often fresh pages the kernel must zero and fault in);
//! recycling them keeps the same few warm pages in use. The pool does not bound memory: the
//! upload's channel does. It only keeps up to `keep` buffers for reuse, and never blocks, so
//! a buffer the client holds on to (a retry) cannot stall the reader.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

#[derive(Debug)]
pub struct BlockPool {
    size: usize,
    keep: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl BlockPool {
    /// A pool of `size`-byte buffers that keeps up to `keep` of them for reuse.
    pub fn new(size: usize, keep: usize) -> Arc<Self> {
        Arc::new(BlockPool {
            size,
            keep,
            free: Mutex::new(Vec::with_capacity(keep)),
        })
    }

    /// A `size`-byte buffer: a returned one if there is one (with the bytes it last held:
    /// the caller overwrites or clears what it uses), else a new zeroed one.
    pub fn take(self: &Arc<Self>) -> Block {
        let buf = self
            .free
            .lock()
            .expect("the pool's lock is never poisoned")
            .pop()
            .unwrap_or_else(|| vec![0; self.size]);
        Block {
            buf,
            pool: Arc::clone(self),
        }
    }

    /// Buffers waiting for reuse.
    pub fn idle(&self) -> usize {
        self.free
            .lock()
            .expect("the pool's lock is never poisoned")
            .len()
    }
}

/// One buffer of the pool; `freeze` turns it into `Bytes` without copying.
#[derive(Debug)]
pub struct Block {
    buf: Vec<u8>,
    pool: Arc<BlockPool>,
}

impl Block {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    /// Read-only, shareable bytes; the buffer returns to the pool when the last clone goes.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Block {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() != self.pool.size {
            return;
        }
        if let Ok(mut free) = self.pool.free.lock() {
            if free.len() < self.pool.keep {
                free.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_clone_is_dropped() {
        let pool = BlockPool::new(8, 4);
        let mut block = pool.take();
        block.as_mut_slice().copy_from_slice(b"abcdefgh");
        let ptr = block.as_slice().as_ptr();
        let bytes = block.freeze();
        let clone = bytes.slice(2..4);
        assert_eq!(&clone[..], b"cd");
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a clone still holds the buffer");
        drop(clone);
        assert_eq!(pool.idle(), 1);
        // The same allocation comes back, with what it held.
        let again = pool.take();
        assert_eq!(again.as_slice().as_ptr(), ptr);
        assert_eq!(again.as_slice(), b"abcdefgh");
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn keeps_at_most_keep_and_never_blocks() {
        let pool = BlockPool::new(4, 2);
        let blocks: Vec<Block> = (0..5).map(|_| pool.take()).collect();
        assert!(blocks.iter().all(|b| b.as_slice() == [0; 4]));
        drop(blocks);
        assert_eq!(pool.idle(), 2);
    }
}
