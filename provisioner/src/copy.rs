//! The copy engine behind snapshots and clones. Two paths, best first:
//! - reflink (FICLONE): the copy shares the source's extents; instant and free until either
//!   side is written (xfs with reflink, btrfs);
//! - sparse copy: only the data extents (found with SEEK_DATA/SEEK_HOLE) are copied, with
//!   copy_file_range so the kernel moves the bytes; holes stay holes, so a mostly empty thin
//!   volume costs what its data costs.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMethod {
    Reflink,
    SparseCopy,
}

impl CopyMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Reflink => "reflink",
            CopyMethod::SparseCopy => "sparse-copy",
        }
    }
}

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// How far a sparse copy has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Data bytes copied so far (holes are skipped, not counted).
    pub copied_bytes: u64,
    /// How far into the source the copy has got.
    pub offset: u64,
    /// Length of the source.
    pub total_bytes: u64,
}

/// The largest single copy_file_range call, so progress is seen at least this often.
const CHUNK: i64 = 256 << 20;
/// [`copy`] logs a sparse copy's progress each time this much more data has been copied: a
/// snapshot of a big, full volume takes minutes, and silence that long looks like a hang.
pub const LOG_EVERY: u64 = 1 << 30;

/// Copy all of `src` into the empty file `dst`, sharing extents when the filesystem can, and
/// logging the progress of a long sparse copy every [`LOG_EVERY`] bytes.
pub fn copy(src: &File, dst: &File) -> io::Result<CopyMethod> {
    if reflink(src, dst)? {
        return Ok(CopyMethod::Reflink);
    }
    sparse_copy(src, dst)?;
    Ok(CopyMethod::SparseCopy)
}

/// [`copy`], reporting a sparse copy's progress to `progress` (after every chunk) instead of
/// logging it; a reflink is instant and reports nothing.
pub fn copy_with_progress(
    src: &File,
    dst: &File,
    progress: &mut dyn FnMut(Progress),
) -> io::Result<CopyMethod> {
    if reflink(src, dst)? {
        return Ok(CopyMethod::Reflink);
    }
    sparse_copy_reporting(src, dst, progress)?;
    Ok(CopyMethod::SparseCopy)
}

/// Make `dst` share all of `src`'s extents (FICLONE). `Ok(false)` when the filesystem cannot
/// (no reflink support, or the files are on different filesystems).
pub fn reflink(src: &File, dst: &File) -> io::Result<bool> {
    match unsafe { ficlone(dst.as_raw_fd(), src.as_raw_fd() as u64) } {
        Ok(_) => Ok(true),
        Err(Errno::EOPNOTSUPP) | Err(Errno::EXDEV) | Err(Errno::EINVAL) | Err(Errno::ENOTTY) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

fn sparse_copy(src: &File, dst: &File) -> io::Result<()> {
    let started = std::time::Instant::now();
    let mut next_log = LOG_EVERY;
    sparse_copy_reporting(src, dst, &mut |p| {
        if p.copied_bytes >= next_log {
            next_log = (p.copied_bytes / LOG_EVERY + 1) * LOG_EVERY;
            tracing::info!(
                copied_bytes = p.copied_bytes,
                offset = p.offset,
                total_bytes = p.total_bytes,
                percent = p.offset * 100 / p.total_bytes.max(1),
                elapsed_s = started.elapsed().as_secs(),
                "sparse copy in progress"
            );
        }
    })
}

fn sparse_copy_reporting(
    src: &File,
    dst: &File,
    progress: &mut dyn FnMut(Progress),
) -> io::Result<()> {
    let len = src.metadata()?.len() as i64;
    let mut pos: i64 = 0;
    let mut copied: u64 = 0;
    while pos < len {
        let data = match lseek(src, pos, Whence::SeekData) {
            Ok(off) => off,
            // No data after `pos`: the rest is a hole.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src, data, Whence::SeekHole).map_err(io::Error::from)?;
        let mut off = data;
        while off < hole {
            let n = (hole - off).min(CHUNK);
            copy_range(src, dst, off, n)?;
            off += n;
            copied += n as u64;
            progress(Progress {
                copied_bytes: copied,
                offset: off as u64,
                total_bytes: len as u64,
            });
        }
        pos = hole;
    }
    dst.set_len(len as u64)
}

fn copy_range(src: &File, dst: &File, mut off: i64, mut remaining: i64) -> io::Result<()> {
    while remaining > 0 {
        let (mut so, mut doff) = (off, off);
        let n = nix::fcntl::copy_file_range(
            src,
            Some(&mut so),
            dst,
            Some(&mut doff),
            remaining as usize,
        )
        .map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank during copy",
            ));
        }
        off += n as i64;
        remaining -= n as i64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("s"))
            .unwrap();
        src.set_len(64 << 20).unwrap();
        src.seek(SeekFrom::Start(10 << 20)).unwrap();
        src.write_all(&[7u8; 1 << 20]).unwrap();
        src.seek(SeekFrom::Start(40 << 20)).unwrap();
        src.write_all(b"tail").unwrap();
        src.sync_all().unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("d"))
            .unwrap();
        sparse_copy(&src, &dst).unwrap();
        let m = dst.metadata().unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(
            m.blocks() * 512 < 4 << 20,
            "holes were filled: {} bytes",
            m.blocks() * 512
        );
        let mut back = Vec::new();
        File::open(dir.path().join("d"))
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        let mut orig = Vec::new();
        File::open(dir.path().join("s"))
            .unwrap()
            .read_to_end(&mut orig)
            .unwrap();
        assert!(back == orig);
    }

    #[test]
    fn progress_counts_data_not_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = File::create(dir.path().join("s")).unwrap();
        src.set_len(32 << 20).unwrap();
        src.seek(SeekFrom::Start(8 << 20)).unwrap();
        src.write_all(&[1u8; 1 << 20]).unwrap();
        src.sync_all().unwrap();
        let src = File::open(dir.path().join("s")).unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("d"))
            .unwrap();
        let mut seen = Vec::new();
        sparse_copy_reporting(&src, &dst, &mut |p| seen.push(p)).unwrap();
        let last = seen.last().expect("progress was reported");
        assert_eq!(last.copied_bytes, 1 << 20);
        assert_eq!(last.total_bytes, 32 << 20);
        assert_eq!(dst.metadata().unwrap().len(), 32 << 20);
    }
}
