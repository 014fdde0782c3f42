//! Copies of an image from one pool to another: the seed of the transfer engine that design
//! §2 (docs/design-pools-transfer.md) grows into copies between nodes. A copy inside one pool
//! stays [`crate::copy`] (reflink, else sparse `copy_file_range`); two pools are usually two
//! filesystems, where a reflink is impossible and `copy_file_range` may refuse (EXDEV between
//! filesystems of different types), so this module moves the data extents itself.
//!
//! The job: the **source** file's data extents ([`extents::data_ranges`], SEEK_DATA/SEEK_HOLE)
//! are copied into the **sink** file at the same offsets, holes are never read or written (the
//! sink stays as sparse as the source), and the sink gets the source's length. Each extent
//! goes by `copy_file_range` while the kernel accepts it across the two files, else by
//! `pread`/`pwrite` in [`BLOCK`]-sized pieces, where a piece that reads back all zero is skipped
//! too (a thin image's allocated-but-zero blocks stay unallocated in the sink).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;

use crate::copy::Progress;
use crate::extents::{self, Range};

/// The most one `copy_file_range` call or one read/write piece moves, so progress is reported
/// (and a cancelled job could stop) at least this often.
pub const CHUNK: u64 = 4 << 20;
/// The unit the read/write path tests for zeros: a page, the unit the filesystem allocates.
pub const BLOCK: usize = 4096;

/// How the bytes moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The kernel copied between the files (`copy_file_range`).
    CopyFileRange,
    /// The kernel refused a cross-filesystem copy: read and written here, zeros skipped.
    ReadWrite,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::CopyFileRange => "copy-file-range",
            Method::ReadWrite => "read-write",
        }
    }
}

/// What a finished transfer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The source's data extents, as copied.
    pub extents: Vec<Range>,
    /// Bytes inside those extents (what was read; zero pieces of the read/write path included).
    pub data_bytes: u64,
    /// The length given to the sink (the source's length).
    pub total_bytes: u64,
    pub method: Method,
}

/// Copy `source` into `sink` (an empty file, or one whose data is to be overwritten at the
/// source's data offsets), sparse, reporting progress after every chunk.
pub fn copy(source: &File, sink: &File, progress: &mut dyn FnMut(Progress)) -> io::Result<Report> {
    let total = source.metadata()?.len();
    let ranges = extents::data_ranges(source, total)?;
    // Full length first: writes then never extend the file, and xfs gives no speculative
    // preallocation past EOF that a later extension would turn into allocated blocks (measured:
    // 3 MiB of data became 6 MiB allocated when the length was set last).
    sink.set_len(total)?;
    let mut method = Method::CopyFileRange;
    let mut copied = 0u64;
    for r in &ranges {
        let mut off = r.offset;
        while off < r.end() {
            let n = (r.end() - off).min(CHUNK);
            if method == Method::CopyFileRange && !kernel_copy(source, sink, off, n)? {
                tracing::debug!(
                    offset = off,
                    "copy_file_range refused between these files; copying by read/write"
                );
                method = Method::ReadWrite;
            }
            if method == Method::ReadWrite {
                read_write(source, sink, off, n)?;
            }
            off += n;
            copied += n;
            progress(Progress {
                copied_bytes: copied,
                offset: off,
                total_bytes: total,
            });
        }
    }
    Ok(Report {
        extents: ranges,
        data_bytes: copied,
        total_bytes: total,
        method,
    })
}

/// `copy_file_range` of `[off, off + len)`. `Ok(false)` when the kernel will not copy between
/// these two files at all (nothing was copied then: the refusal comes before the first byte).
fn kernel_copy(src: &File, dst: &File, off: u64, len: u64) -> io::Result<bool> {
    let (mut done, mut first) = (0u64, true);
    while done < len {
        let (mut so, mut doff) = ((off + done) as i64, (off + done) as i64);
        match nix::fcntl::copy_file_range(
            src,
            Some(&mut so),
            dst,
            Some(&mut doff),
            (len - done) as usize,
        ) {
            Ok(0) => return Err(short_source()),
            Ok(n) => done += n as u64,
            Err(Errno::EXDEV | Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) if first => {
                return Ok(false)
            }
            Err(e) => return Err(e.into()),
        }
        first = false;
    }
    Ok(true)
}

/// Read `[off, off + len)` and write it back at the same offset, skipping all-zero blocks.
fn read_write(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; len as usize];
    src.read_exact_at(&mut buf, off).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            short_source()
        } else {
            e
        }
    })?;
    for (i, block) in buf.chunks(BLOCK).enumerate() {
        if block.iter().any(|&b| b != 0) {
            dst.write_all_at(block, off + (i * BLOCK) as u64)?;
        }
    }
    Ok(())
}

fn short_source() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "source shrank during copy")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sparse_source(dir: &std::path::Path) -> File {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("src"))
            .unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[0xab; 8192], 1 << 20).unwrap();
        f.write_all_at(&[0xcd; 4096], 40 << 20).unwrap();
        f.sync_all().unwrap();
        f
    }

    fn sink(dir: &std::path::Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("dst"))
            .unwrap()
    }

    fn same_bytes(a: &File, b: &File) {
        let len = a.metadata().unwrap().len();
        assert_eq!(b.metadata().unwrap().len(), len);
        let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        for off in (0..len).step_by(1 << 20) {
            a.read_exact_at(&mut x, off).unwrap();
            b.read_exact_at(&mut y, off).unwrap();
            assert!(x == y, "differ in the MiB at {off}");
        }
    }

    #[test]
    fn copies_data_keeps_holes_and_reports_progress() {
        let t = tempfile::tempdir().unwrap();
        let src = sparse_source(t.path());
        let dst = sink(t.path());
        let mut seen = Vec::new();
        let report = copy(&src, &dst, &mut |p| seen.push(p)).unwrap();
        same_bytes(&src, &dst);
        assert_eq!(report.total_bytes, 64 << 20);
        assert!(
            report.data_bytes >= 12288 && report.data_bytes < 1 << 20,
            "{report:?}"
        );
        assert_eq!(seen.last().map(|p| p.copied_bytes), Some(report.data_bytes));
        let allocated = dst.metadata().unwrap().blocks() * 512;
        assert!(allocated < 1 << 20, "sink allocated {allocated} bytes");
    }

    #[test]
    fn read_write_path_skips_holes_and_zero_blocks() {
        let t = tempfile::tempdir().unwrap();
        let src = sparse_source(t.path());
        // An allocated run of zeros: data to SEEK_DATA, nothing to write.
        src.write_all_at(&vec![0u8; 1 << 20], 8 << 20).unwrap();
        src.sync_all().unwrap();
        let dst = sink(t.path());
        let total = src.metadata().unwrap().len();
        for r in extents::data_ranges(&src, total).unwrap() {
            read_write(&src, &dst, r.offset, r.len).unwrap();
        }
        dst.set_len(total).unwrap();
        same_bytes(&src, &dst);
        let allocated = dst.metadata().unwrap().blocks() * 512;
        assert!(allocated <= 64 << 10, "sink allocated {allocated} bytes");
    }
}
