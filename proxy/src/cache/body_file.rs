//! Large stored bodies in sealed memory files, so that a hit hands the body to the
//! kernel (`sendfile`) instead of copying it through a socket write.
//!
//! A body of at least [`MIN_BYTES`] is copied once, when its entry is built, into a
//! memfd that is then sealed against writes and resizing and mapped read-only. The
//! entry's `Bytes` is that mapping, so every other use of the body (hyper's path, the
//! shared tier's encoding) reads the same pages: the body is in memory once. Each file
//! costs a descriptor and a mapping, so their number is capped; past the cap, or when
//! the kernel refuses, a body stays on the heap and is written with `writev`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

/// Below this a copy into the socket costs less than the extra `sendfile` call.
pub(crate) const MIN_BYTES: usize = 16 * 1024;
/// The kernel's default limit on mappings per process is 65,530; stay well under it.
pub(crate) const MAX_FILES: usize = 32 * 1024;

/// Files alive now (a file and its mapping live and die with their entry).
static LIVE: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicBool = AtomicBool::new(false);

/// A sealed, immutable file holding exactly one body.
#[derive(Debug)]
pub(crate) struct BodyFile {
    fd: OwnedFd,
    len: u64,
    /// The file mapped read-only: the body for every use but `sendfile`.
    mapped: Bytes,
}

impl BodyFile {
    /// `body` in a sealed file, mapped ([`BodyFile::bytes`]). `None` when the body is
    /// small, the cap is reached or the kernel refuses.
    pub(crate) fn store(body: &[u8]) -> Option<Arc<BodyFile>> {
        if body.len() < MIN_BYTES || LIVE.load(Ordering::Relaxed) >= cap() {
            return None;
        }
        match create(body) {
            Ok(stored) => {
                LIVE.fetch_add(1, Ordering::Relaxed);
                Some(stored)
            }
            Err(error) => {
                if !REFUSED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        %error,
                        live = LIVE.load(Ordering::Relaxed),
                        "cannot keep a large body in a memory file; such bodies stay on the heap \
                         and are copied into the socket (logged once)"
                    );
                }
                None
            }
        }
    }

    /// The body, read from the file's mapping (no copy).
    pub(crate) fn bytes(&self) -> &Bytes {
        &self.mapped
    }

    /// The body's length in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.len
    }

    /// What the file costs beyond its body's bytes: page rounding, and the kernel's
    /// inode, file and mapping (about a kilobyte).
    pub(crate) fn overhead(&self) -> usize {
        let len = usize::try_from(self.len).unwrap_or(usize::MAX);
        len.next_multiple_of(4096) - len + 1024
    }
}

impl AsFd for BodyFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for BodyFile {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The cap: [`MAX_FILES`], and half the descriptors this process may open.
fn cap() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let half = limit.map_or(usize::MAX, |n| usize::try_from(n / 2).unwrap_or(usize::MAX));
        half.min(MAX_FILES)
    })
}

#[cfg(target_os = "linux")]
fn create(body: &[u8]) -> std::io::Result<Arc<BodyFile>> {
    use rustix::fs::{MemfdFlags, SealFlags};
    use std::io::Write;

    let fd = rustix::fs::memfd_create(
        "corral-body",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(body)?;
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    // SAFETY: the file is sealed against writes and resizing, so the mapping can
    // neither change under a reader nor lose pages (no SIGBUS).
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let fd = OwnedFd::from(file);
    Ok(Arc::new(BodyFile {
        fd,
        len: body.len() as u64,
        mapped: Bytes::from_owner(map),
    }))
}

#[cfg(not(target_os = "linux"))]
fn create(_body: &[u8]) -> std::io::Result<Arc<BodyFile>> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_body_is_kept_once_in_a_sealed_file() {
        let body: Vec<u8> = (0..MIN_BYTES * 2).map(|i| (i % 251) as u8).collect();
        let file = BodyFile::store(&body).expect("a large body gets a file");
        assert_eq!(&file.bytes()[..], &body[..], "the mapping reads the body");
        assert_eq!(file.size(), body.len() as u64);
        // Sealed: nobody can write to it or shrink it.
        let dup = std::fs::File::from(file.fd.try_clone().unwrap());
        assert!(std::io::Write::write(&mut &dup, b"x").is_err());
        assert!(dup.set_len(1).is_err());
    }

    #[test]
    fn a_small_body_stays_on_the_heap() {
        assert!(BodyFile::store(&[0u8; MIN_BYTES - 1]).is_none());
    }
}
