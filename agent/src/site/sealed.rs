//! The release's bytes in one sealed memfd, mapped read-only.
//!
//! Keeping the content in a file rather than on the heap is what lets the server hand
//! large bodies to the kernel with `sendfile` (see `http::sendfile`): a `write` copies
//! every byte from the process into the socket, which at a few MiB per response costs
//! several times what the rest of the request does. The memfd is still memory, not disk,
//! so a tampered disk copy is never served; the seals make it immutable, so the kernel
//! can send its pages without copying them and no later write can change a response that
//! is already on its way.

use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use bytes::Bytes;
use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

/// Collects files into a memfd; [`Writer::seal`] turns it into a [`Sealed`] store.
pub struct Writer {
    file: File,
    len: usize,
}

impl Writer {
    /// Fails where memfds are not allowed (an older seccomp profile, say): the caller
    /// then keeps the content on the heap.
    pub fn new() -> io::Result<Self> {
        let fd = memfd_create(
            "ami-agent-release",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        Ok(Writer {
            file: File::from(fd),
            len: 0,
        })
    }

    /// Where the next appended byte goes.
    pub fn position(&self) -> usize {
        self.len
    }

    /// Appends `bytes` and returns where they are in the store.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<Range<usize>> {
        self.file.write_all(bytes)?;
        let start = self.len;
        self.len += bytes.len();
        Ok(start..self.len)
    }

    /// Seals the memfd against any change and maps it. `None` when it holds nothing (a
    /// zero-length mapping does not exist).
    pub fn seal(self) -> io::Result<Option<Arc<Sealed>>> {
        let fd = OwnedFd::from(self.file);
        fcntl_add_seals(
            &fd,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )?;
        if self.len == 0 {
            return Ok(None);
        }
        // SAFETY: a fresh read-only shared mapping of a sealed file of exactly `len`
        // bytes: nobody can shrink the file under it or write to it.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                self.len,
                ProtFlags::READ,
                MapFlags::SHARED,
                &fd,
                0,
            )?
        };
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap: null"))?;
        Ok(Some(Arc::new(Sealed {
            fd,
            ptr,
            len: self.len,
        })))
    }
}

/// A sealed, read-only memfd and its mapping, alive as long as any [`Bytes`] into it.
#[derive(Debug)]
pub struct Sealed {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and never changes (the memfd is sealed against writes),
// so sharing it between threads is sharing immutable bytes.
unsafe impl Send for Sealed {}
unsafe impl Sync for Sealed {}

impl Sealed {
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes at `range` (from [`Writer::append`]), sharing the mapping.
    pub fn bytes(self: &Arc<Self>, range: Range<usize>) -> Bytes {
        Bytes::from_owner(Owner(self.clone())).slice(range)
    }

    /// Where `data` starts in the memfd, if it lies entirely inside the mapping.
    pub fn offset_of(&self, data: &[u8]) -> Option<u64> {
        let base = self.ptr.as_ptr() as usize;
        let start = (data.as_ptr() as usize).checked_sub(base)?;
        (start + data.len() <= self.len).then_some(start as u64)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Sealed {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `seal`; no `Bytes` can point into it any more,
        // since each holds an `Arc<Sealed>`.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

struct Owner(Arc<Sealed>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_seals_and_finds_offsets() {
        let mut w = Writer::new().unwrap();
        let a = w.append(b"hello ").unwrap();
        let b = w.append(b"world").unwrap();
        let store = w.seal().unwrap().unwrap();
        let (a, b) = (store.bytes(a), store.bytes(b));
        assert_eq!(a, "hello ");
        assert_eq!(b, "world");
        assert_eq!(store.offset_of(&b), Some(6));
        assert_eq!(store.offset_of(&b[1..3]), Some(7));
        assert_eq!(
            store.offset_of(b"world"),
            None,
            "a copy elsewhere is not in the store"
        );
        // Sealed: the content cannot change under a response in flight.
        let mut file = File::from(rustix::io::dup(store.fd()).unwrap());
        assert!(file.write_all(b"x").is_err());
        drop(store);
        assert_eq!(b, "world", "the bytes keep the mapping alive");
    }

    #[test]
    fn an_empty_store_has_no_mapping() {
        assert!(Writer::new().unwrap().seal().unwrap().is_none());
    }
}
