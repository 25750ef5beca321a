//! Which 512 KiB blocks of an image go to the snapshot. Pure: the data extents come from
//! the filesystem (SEEK_DATA/SEEK_HOLE) elsewhere.
//!
//! Every block goes, holes and zeros included, unless the caller asks to omit zero blocks.
//! A block absent from a snapshot reads back as zeros only on an *unencrypted* volume; on
//! an encrypted one (every volume amictl launches, and every volume in an account that
//! encrypts by default) it reads back as the decryption of zeros under the volume's key:
//! random bytes where the image had zeros (bottlerocket-os/bottlerocket #2169,
//! awslabs/coldsnap #395 and #470). A file system may rely on such zeroed regions (ext4's
//! lazily initialised inode tables), so a sparse snapshot can boot corrupted.

use std::ops::Range;

/// EBS direct APIs take exactly this many bytes per block (PutSnapshotBlock DataLength).
pub const BLOCK_SIZE: u64 = 524_288;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    /// Read `len` bytes at `index * BLOCK_SIZE` (the last block may be short: pad it).
    Read { index: u64, len: u64 },
    /// Entirely inside a hole: zeros without reading.
    Hole { index: u64 },
}

impl Planned {
    pub fn index(&self) -> u64 {
        match *self {
            Planned::Read { index, .. } | Planned::Hole { index } => index,
        }
    }
}

/// Every block of a `size`-byte image, in order, given its data extents (sorted, possibly
/// overlapping block boundaries). A block touching any data is read.
pub fn plan(size: u64, data: &[Range<u64>]) -> Vec<Planned> {
    let blocks = size.div_ceil(BLOCK_SIZE);
    let mut out = Vec::with_capacity(blocks as usize);
    let mut extents = data.iter().filter(|r| r.start < r.end).peekable();
    for index in 0..blocks {
        let start = index * BLOCK_SIZE;
        let end = (start + BLOCK_SIZE).min(size);
        while extents.peek().is_some_and(|r| r.end <= start) {
            extents.next();
        }
        let touches = extents.peek().is_some_and(|r| r.start < end);
        out.push(if touches {
            Planned::Read {
                index,
                len: end - start,
            }
        } else {
            Planned::Hole { index }
        });
    }
    out
}

/// Whether a block must be uploaded: always, unless it is all zeros and the caller asked
/// for a sparse snapshot (safe only for unencrypted volumes).
pub fn must_upload(is_zero: bool, omit_zero_blocks: bool) -> bool {
    !(is_zero && omit_zero_blocks)
}

/// All-zero test, 16 bytes at a time (the compiler vectorises it).
pub fn is_zero(bytes: &[u8]) -> bool {
    let chunks = bytes.chunks_exact(16);
    let rest = chunks.remainder();
    chunks
        .map(|c| u128::from_ne_bytes(c.try_into().expect("16-byte chunk")))
        .all(|w| w == 0)
        && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    const B: u64 = BLOCK_SIZE;

    #[test]
    fn holes_and_data() {
        // Data in block 0 and across the 2|3 boundary; block 1 and 4 are holes; 5 blocks.
        let p = plan(5 * B, &[0..10, 3 * B - 1..3 * B + 1]);
        assert_eq!(
            p,
            vec![
                Planned::Read { index: 0, len: B },
                Planned::Hole { index: 1 },
                Planned::Read { index: 2, len: B },
                Planned::Read { index: 3, len: B },
                Planned::Hole { index: 4 },
            ]
        );
    }

    #[test]
    fn last_block_is_short_and_fully_sparse_files_are_all_holes() {
        let p = plan(B + 100, &[0..B, B..B + 100]);
        assert_eq!(p[1], Planned::Read { index: 1, len: 100 });
        assert!(plan(3 * B, &[])
            .iter()
            .all(|b| matches!(b, Planned::Hole { .. })));
        assert!(plan(0, &[]).is_empty());
    }

    #[test]
    fn zero_blocks_go_unless_omitted() {
        // By default every block goes, zeros included.
        assert!(must_upload(false, false));
        assert!(must_upload(true, false));
        // Asked for a sparse snapshot: zero blocks stay out, data never does.
        assert!(must_upload(false, true));
        assert!(!must_upload(true, true));
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v));
        assert!(!is_zero(&v[3..]));
        assert!(is_zero(&[]));
    }
}
