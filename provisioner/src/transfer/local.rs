//! A transfer between two pools of one node: the [`reader`](super::reader) runs on a thread
//! and feeds the [`Writer`] through a bounded channel, so a local copy is checked exactly as a
//! copy between nodes is (each chunk's digest, then the whole image's), and holes stay holes.
//! Two pools are usually two filesystems, where a reflink is impossible and
//! `copy_file_range` may refuse (EXDEV between filesystems of different types).

use std::fs::File;
use std::io;
use std::sync::mpsc;

use super::{reader, Chunk, ChunkDigest, Header, TransferError, Writer};
use crate::copy::Progress;
use crate::extents::Range;
use crate::params::FsType;

/// Chunks in flight between the reader thread and the writer: enough to keep both busy, few
/// enough that a local copy holds at most this many 4 MiB buffers.
const IN_FLIGHT: usize = 4;

/// How the bytes moved (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Chunks read on one thread, verified and written on another.
    Stream,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Stream => "transfer-stream",
        }
    }
}

/// What a finished transfer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The source's data extents, as copied.
    pub extents: Vec<Range>,
    /// Bytes inside those extents (what was read and checked).
    pub data_bytes: u64,
    /// The length given to the sink (the source's length).
    pub total_bytes: u64,
    pub method: Method,
}

/// Copy `source` into `sink` (an empty file), sparse and verified, reporting progress after
/// every chunk. The sink gets the source's length.
pub fn copy(source: &File, sink: &File, progress: &mut dyn FnMut(Progress)) -> io::Result<Report> {
    let total = source.metadata()?.len();
    let (ranges, data_bytes) = reader::data_of(source, total)?;
    // Full length first: writes then never extend the file, and xfs gives no speculative
    // preallocation past EOF that a later extension would turn into allocated blocks (measured:
    // 3 MiB of data became 6 MiB allocated when the length was set last).
    sink.set_len(total)?;
    let header = Header {
        image_bytes: total,
        size_bytes: total,
        fs_type: FsType::Ext4,
        data_bytes,
        encryption: None,
        digest: ChunkDigest::default(),
    };
    let mut writer = Writer::new(sink, total, &header).map_err(to_io)?;
    let (tx, rx) = mpsc::sync_channel::<Chunk>(IN_FLIGHT);
    let trailer = std::thread::scope(|s| {
        let read = s.spawn(|| {
            let tx = tx;
            reader::read_image(source, total, &ranges, header.digest, &mut |c| {
                tx.send(c)
                    .map_err(|_| io::Error::other("the transfer's writer stopped"))
            })
        });
        let written = (|| {
            for c in rx.iter() {
                writer.chunk(&c)?;
                progress(Progress {
                    copied_bytes: writer.received,
                    offset: c.offset + c.data.len() as u64,
                    total_bytes: total,
                });
            }
            Ok::<(), TransferError>(())
        })();
        // A failed writer drops the receiver, which stops the reader at its next chunk.
        drop(rx);
        let read = read
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the transfer's reader panicked")));
        written.map_err(to_io)?;
        read
    })?;
    writer.finish(&trailer).map_err(to_io)?;
    Ok(Report {
        extents: ranges,
        data_bytes,
        total_bytes: total,
        method: Method::Stream,
    })
}

/// The local copy's callers speak `io::Error`; a full pool stays ENOSPC, so it is still
/// RESOURCE_EXHAUSTED to them.
fn to_io(e: TransferError) -> io::Error {
    match e {
        TransferError::Pool(crate::PoolError::ResourceExhausted(_)) => {
            io::Error::from_raw_os_error(libc::ENOSPC)
        }
        TransferError::Pool(crate::PoolError::Io { source, .. }) => source,
        e => io::Error::other(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

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
    fn zero_blocks_stay_holes_and_a_corrupt_chunk_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let src = sparse_source(t.path());
        // An allocated run of zeros: data to SEEK_DATA, nothing to write.
        src.write_all_at(&vec![0u8; 1 << 20], 8 << 20).unwrap();
        src.sync_all().unwrap();
        let dst = sink(t.path());
        copy(&src, &dst, &mut |_| {}).unwrap();
        same_bytes(&src, &dst);
        let allocated = dst.metadata().unwrap().blocks() * 512;
        assert!(allocated <= 64 << 10, "sink allocated {allocated} bytes");

        // A chunk whose bytes changed after it was digested is never written.
        let total = src.metadata().unwrap().len();
        let header = Header {
            image_bytes: total,
            size_bytes: total,
            fs_type: FsType::Ext4,
            data_bytes: 0,
            encryption: None,
            digest: ChunkDigest::Xxh128,
        };
        let other = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(t.path().join("other"))
            .unwrap();
        other.set_len(total).unwrap();
        let mut w = Writer::new(&other, total, &header).unwrap();
        let mut c = Chunk::new(ChunkDigest::Xxh128, 1 << 20, vec![0xab; 8192]);
        let mut flipped = c.data.to_vec();
        flipped[7] ^= 1;
        c.data = flipped.into();
        assert!(matches!(w.chunk(&c), Err(TransferError::Corrupt(_))));
        assert_eq!(other.metadata().unwrap().blocks(), 0, "nothing written");
        // Out of order, past the end, or a trailer that does not match: refused as well.
        let good = Chunk::new(ChunkDigest::Xxh128, 1 << 20, vec![0xab; 8192]);
        w.chunk(&good).unwrap();
        assert!(w
            .chunk(&Chunk::new(ChunkDigest::Xxh128, 0, vec![1; 10]))
            .is_err());
        assert!(w
            .chunk(&Chunk::new(ChunkDigest::Xxh128, total, vec![1; 10]))
            .is_err());
        let wrong = crate::transfer::ImageDigest::new(ChunkDigest::Xxh128, total).finish();
        assert!(matches!(w.finish(&wrong), Err(TransferError::Corrupt(_))));
    }
}
