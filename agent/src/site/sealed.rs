//! The release's bytes in one sealed memfd, mapped read-only.
//!
//! Keeping the content in a file rather than on the heap is what lets the server hand
//! large bodies to the kernel with `sendfile` (see `http::sendfile`): a `write` copies
//! every byte from the process into the socket, which at a few MiB per response costs
//! several times what the rest of the request does. The memfd is still memory, not disk,
//! so a tampered disk copy is never served; the seals make it immutable, so the kernel
//! can send its pages without copying them and no later write can change a response that
//! is already on its way.
//!
//! Once sealed, the memfd's pages are collapsed into 2 MiB huge pages where the kernel
//! allows (`MADV_COLLAPSE`, Linux 6.1+, honoured even where `shmem_enabled` is `never`,
//! as it is by default). `sendfile` looks up and takes a reference on every folio it sends:
//! one per 2 MiB instead of one per 4 KiB page is about a seventh less kernel CPU per 4 MiB
//! response. It is only a speed-up: where the collapse fails, the same bytes are served
//! from 4 KiB pages.

use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use bytes::Bytes;
use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
use rustix::mm::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use tracing::debug;

/// A huge page (a PMD) on x86_64, and on aarch64 with 4 KiB base pages.
const HUGE_PAGE: usize = 2 << 20;

/// `MADV_COLLAPSE` (include/uapi/asm-generic/mman-common.h, every architecture), which
/// rustix does not name and libc names for glibc targets only.
const MADV_COLLAPSE: libc::c_int = 25;

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
        let ptr = map_aligned(&fd, self.len)?;
        let mut sealed = Sealed {
            fd,
            ptr,
            len: self.len,
            huge: false,
        };
        sealed.huge = sealed.collapse();
        Ok(Some(Arc::new(sealed)))
    }
}

/// A read-only shared mapping of the sealed `fd`'s `len` bytes, starting on a huge page
/// boundary when it is at least a huge page long (a huge page maps only an aligned range):
/// address space for `len` plus a huge page is reserved, the file mapped at the first
/// boundary in it, and the rest given back.
fn map_aligned(fd: &OwnedFd, len: usize) -> io::Result<NonNull<u8>> {
    let page = rustix::param::page_size();
    let (hint, reserved) = if len >= HUGE_PAGE {
        let span = len + HUGE_PAGE;
        // SAFETY: new inaccessible address space that nothing else uses.
        let base = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                span,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )?
        };
        let at = (base as usize).next_multiple_of(HUGE_PAGE);
        (at, Some((base as usize, span)))
    } else {
        (0, None)
    };
    let flags = if reserved.is_some() {
        MapFlags::SHARED | MapFlags::FIXED
    } else {
        MapFlags::SHARED
    };
    // SAFETY: a read-only shared mapping of a sealed file of exactly `len` bytes (nobody
    // can shrink the file under it or write to it), either where the kernel chooses or,
    // with FIXED, over the reservation made above, which nothing else uses.
    let mapped = unsafe { mmap(hint as *mut _, len, ProtFlags::READ, flags, fd, 0) };
    if let Some((base, span)) = reserved {
        let end = hint + len.next_multiple_of(page);
        let unused = match &mapped {
            Ok(_) => [(base, hint - base), (end, base + span - end)],
            Err(_) => [(base, span), (0, 0)],
        };
        for (at, n) in unused.into_iter().filter(|&(_, n)| n > 0) {
            // SAFETY: parts of the reservation that the file's mapping does not cover. A
            // failure would only leave inaccessible address space behind.
            let _ = unsafe { munmap(at as *mut _, n) };
        }
    }
    NonNull::new(mapped?.cast::<u8>()).ok_or_else(|| io::Error::other("mmap: null"))
}

/// A sealed, read-only memfd and its mapping, alive as long as any [`Bytes`] into it.
#[derive(Debug)]
pub struct Sealed {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    /// Whether the kernel moved the pages into huge pages.
    huge: bool,
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

    /// Asks the kernel to move the memfd's pages into huge pages (see the module's
    /// comment); true if it did, for every whole huge page the file holds.
    fn collapse(&self) -> bool {
        if self.len < HUGE_PAGE {
            return false;
        }
        // SAFETY: advice on our own mapping; MADV_COLLAPSE changes how the pages are held,
        // never their content.
        let rc = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, MADV_COLLAPSE) };
        if rc == 0 {
            debug!(
                bytes = self.len,
                "content's pages collapsed into huge pages"
            );
        } else {
            let error = io::Error::last_os_error();
            debug!(%error, "content stays in 4 KiB pages (no MADV_COLLAPSE here)");
        }
        rc == 0
    }

    /// Whether the content is held in huge pages (see the module's comment).
    pub fn in_huge_pages(&self) -> bool {
        self.huge
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
    fn a_large_store_is_mapped_on_a_huge_page_boundary_and_held_in_huge_pages() {
        let mut w = Writer::new().unwrap();
        let small = w.append(b"small").unwrap();
        let big: Vec<u8> = (0..5 * HUGE_PAGE + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let at = w.append(&big).unwrap();
        let store = w.seal().unwrap().unwrap();
        let base = store.ptr.as_ptr() as usize;
        assert_eq!(base % HUGE_PAGE, 0, "mapped at {base:#x}");
        assert_eq!(store.bytes(small), "small");
        let body = store.bytes(at.clone());
        assert!(body[..] == big[..], "the content reads back as written");
        assert_eq!(store.offset_of(&body), Some(at.start as u64));
        // What the kernel says about this mapping, independently of what madvise returned.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{base:x}-");
        let entry: String = smaps
            .lines()
            .skip_while(|l| !l.starts_with(&head))
            .skip(1)
            .take_while(|l| !is_mapping_head(l))
            .collect::<Vec<_>>()
            .join("\n");
        let pmd_kb: u64 = entry
            .lines()
            .find_map(|l| l.strip_prefix("ShmemPmdMapped:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0);
        if store.in_huge_pages() {
            assert!(
                pmd_kb >= 5 * 2048,
                "collapsed, yet the kernel maps {pmd_kb} kB with huge pages:\n{entry}"
            );
        } else {
            eprintln!("this kernel refused MADV_COLLAPSE: the store stays in 4 KiB pages");
        }
        drop(store);
        assert!(body[..] == big[..], "the bytes keep the mapping alive");
    }

    /// A line of smaps that starts a mapping: `start-end perms …`, both ends hex.
    fn is_mapping_head(line: &str) -> bool {
        let range = line.split(' ').next().unwrap_or("");
        range.split_once('-').is_some_and(|(a, b)| {
            [a, b]
                .iter()
                .all(|h| !h.is_empty() && h.bytes().all(|c| c.is_ascii_hexdigit()))
        })
    }

    #[test]
    fn an_empty_store_has_no_mapping() {
        assert!(Writer::new().unwrap().seal().unwrap().is_none());
    }
}
