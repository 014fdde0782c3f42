//! The reading end of a transfer: an image's data ranges (SEEK_DATA/SEEK_HOLE, the extent map
//! the SnapshotMetadata service uses) cut into chunks of at most [`CHUNK`] bytes at
//! [`CHUNK`]-aligned offsets, each digested. Holes are never read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{Chunk, ChunkDigest, ImageDigest, Trailer, CHUNK};
use crate::extents::{self, Range};

/// The data ranges of the first `len` bytes of `file` and the bytes inside them (what a
/// transfer of it sends).
pub fn data_of(file: &File, len: u64) -> io::Result<(Vec<Range>, u64)> {
    let ranges = extents::data_ranges(file, len)?;
    let bytes = ranges.iter().map(|r| r.len).sum();
    Ok((ranges, bytes))
}

/// Read the data of `ranges` (from [`data_of`]) out of `file`, an image of `len` bytes, handing
/// each chunk, digested by `kind`, to `emit` in ascending order, and return the trailer. An
/// error from `emit` (the receiver went away) stops the read.
pub fn read_image(
    file: &File,
    len: u64,
    ranges: &[Range],
    kind: ChunkDigest,
    emit: &mut dyn FnMut(Chunk) -> io::Result<()>,
) -> io::Result<Trailer> {
    let mut digest = ImageDigest::new(kind, len);
    let buffers = Recycler::default();
    for r in ranges {
        let mut off = r.offset;
        while off < r.end() {
            // Cut at CHUNK-aligned offsets, so chunks are the same whatever the extent layout.
            let window_end = (off / CHUNK + 1) * CHUNK;
            let n = (r.end().min(window_end) - off) as usize;
            let mut data = buffers.take();
            file.read_exact_at(&mut data[..n], off).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "source shrank during transfer",
                    )
                } else {
                    e
                }
            })?;
            let chunk = Chunk::new(kind, off, buffers.bytes(data, n));
            digest.add(chunk.offset, n as u64, &chunk.digest);
            emit(chunk)?;
            off += n as u64;
        }
    }
    Ok(digest.finish())
}

/// Buffers a stream reuses: a chunk's buffer comes back when the last holder of its bytes (the
/// writer, or the gRPC encoder that copied it into a message) lets go. Fresh 4 MiB allocations
/// per chunk meant page faults and zeroing for every chunk, and the kernel's copy into never-
/// touched memory was a third of the source's CPU in a cross-node restore here.
#[derive(Clone, Default)]
struct Recycler(Arc<Mutex<Vec<Vec<u8>>>>);

/// More than a stream has in flight (a few chunks queued, one being encoded, one being read).
const KEEP: usize = 8;

impl Recycler {
    fn take(&self) -> Vec<u8> {
        let back = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        back.unwrap_or_else(|| vec![0; CHUNK as usize])
    }

    /// The first `len` bytes of `buf`, handing `buf` back here when they are dropped.
    fn bytes(&self, buf: Vec<u8>, len: usize) -> Bytes {
        Bytes::from_owner(Recycled {
            buf,
            len,
            home: self.clone(),
        })
    }
}

struct Recycled {
    buf: Vec<u8>,
    len: usize,
    home: Recycler,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let mut kept = self.home.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEEP {
            kept.push(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_data_only_and_are_aligned() {
        let (_t, f) = crate::transfer::test_image(64 << 20);
        f.write_all_at(&vec![7u8; 6 << 20], 2 << 20).unwrap();
        f.sync_all().unwrap();
        let (ranges, bytes) = data_of(&f, 64 << 20).unwrap();
        let mut seen = Vec::new();
        let trailer = read_image(&f, 64 << 20, &ranges, ChunkDigest::Xxh128, &mut |c| {
            seen.push((c.offset, c.data.len() as u64));
            Ok(())
        })
        .unwrap();
        assert_eq!(trailer.data_bytes, bytes);
        assert_eq!(trailer.chunks as usize, seen.len());
        assert!((6 << 20..16 << 20).contains(&bytes), "{bytes}");
        for (off, n) in &seen {
            assert!(*n <= CHUNK);
            assert_eq!(
                off / CHUNK,
                (off + n - 1) / CHUNK,
                "chunk crosses a boundary"
            );
        }
    }
}
