//! The image's content address: SHA-256 over its length and the SHA-256 of each 512 KiB
//! block (the last one zero-padded). Uploading needs every block's SHA-256 anyway (EBS
//! checksums each block), so the address costs nothing beyond the upload itself, and
//! holes and zero blocks, which are never read, contribute a precomputed constant. It is
//! the same construction as EBS's LINEAR snapshot checksum, extended to every block.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use super::plan::{is_zero, BLOCK_SIZE};

pub type BlockDigest = [u8; 32];

/// Tag value prefix: names the construction so a future change cannot be confused with it.
pub const SCHEME: &str = "sha256-blocks-512k";

/// The SHA-256 of an all-zero 512 KiB block.
pub fn zero_block_digest() -> BlockDigest {
    static ZERO: OnceLock<BlockDigest> = OnceLock::new();
    *ZERO.get_or_init(|| Sha256::digest(vec![0u8; BLOCK_SIZE as usize]).into())
}

pub fn block_digest(block: &[u8]) -> BlockDigest {
    Sha256::digest(block).into()
}

/// Folds block digests (in index order, one per block) into the image digest (hex).
pub fn image_digest(size: u64, blocks: impl IntoIterator<Item = BlockDigest>) -> String {
    let mut h = Sha256::new();
    h.update(format!("{SCHEME}\n{size}\n").as_bytes());
    for d in blocks {
        h.update(d);
    }
    hex::encode(h.finalize())
}

/// Computes the digest of a whole file by reading it: the reference implementation
/// (`amictl image digest`), and what tests compare the upload's digest with.
pub fn digest_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut digests = Vec::with_capacity(size.div_ceil(BLOCK_SIZE) as usize);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut remaining = size;
    while remaining > 0 {
        let n = remaining.min(BLOCK_SIZE) as usize;
        buf[n..].fill(0);
        file.read_exact(&mut buf[..n])?;
        digests.push(if is_zero(&buf) {
            zero_block_digest()
        } else {
            block_digest(&buf)
        });
        remaining -= n as u64;
    }
    Ok(image_digest(size, digests))
}

/// EBS's LINEAR aggregate: SHA-256 over the uploaded blocks' raw digests, in index order.
pub fn linear_checksum(uploaded_in_order: impl IntoIterator<Item = BlockDigest>) -> BlockDigest {
    let mut h = Sha256::new();
    for d in uploaded_in_order {
        h.update(d);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_length_and_every_block() {
        let z = zero_block_digest();
        let a = image_digest(1024, [z]);
        assert_ne!(
            a,
            image_digest(2048, [z]),
            "trailing zeros change the digest"
        );
        assert_ne!(a, image_digest(1024, [block_digest(b"x")]));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn file_digest_matches_the_construction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut data = vec![0u8; BLOCK_SIZE as usize * 2 + 100];
        data[BLOCK_SIZE as usize + 5] = 9;
        std::fs::write(&path, &data).unwrap();
        let mut last = vec![0u8; BLOCK_SIZE as usize];
        last[..100].copy_from_slice(&data[2 * BLOCK_SIZE as usize..]);
        let expected = image_digest(
            data.len() as u64,
            [
                zero_block_digest(),
                block_digest(&data[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize]),
                block_digest(&last),
            ],
        );
        assert_eq!(digest_file(&path).unwrap(), expected);
        assert_eq!(last, vec![0u8; BLOCK_SIZE as usize]);
        assert_eq!(block_digest(&last), zero_block_digest());
    }
}
