//! The reading end of a transfer: an image's data ranges (SEEK_DATA/SEEK_HOLE, the extent map
//! the SnapshotMetadata service uses) cut into chunks of at most [`CHUNK`] bytes at
//! [`CHUNK`]-aligned offsets, each digested. Holes are never read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::{Chunk, ImageDigest, Trailer, CHUNK};
use crate::extents::{self, Range};

/// The data ranges of the first `len` bytes of `file` and the bytes inside them (what a
/// transfer of it sends).
pub fn data_of(file: &File, len: u64) -> io::Result<(Vec<Range>, u64)> {
    let ranges = extents::data_ranges(file, len)?;
    let bytes = ranges.iter().map(|r| r.len).sum();
    Ok((ranges, bytes))
}

/// Read the data of `ranges` (from [`data_of`]) out of `file`, an image of `len` bytes, handing
/// each chunk to `emit` in ascending order, and return the trailer. An error from `emit` (the
/// receiver went away) stops the read.
pub fn read_image(
    file: &File,
    len: u64,
    ranges: &[Range],
    emit: &mut dyn FnMut(Chunk) -> io::Result<()>,
) -> io::Result<Trailer> {
    let mut digest = ImageDigest::new(len);
    for r in ranges {
        let mut off = r.offset;
        while off < r.end() {
            // Cut at CHUNK-aligned offsets, so chunks are the same whatever the extent layout.
            let window_end = (off / CHUNK + 1) * CHUNK;
            let n = (r.end().min(window_end) - off) as usize;
            let mut data = vec![0u8; n];
            file.read_exact_at(&mut data, off).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "source shrank during transfer",
                    )
                } else {
                    e
                }
            })?;
            let chunk = Chunk::new(off, data);
            digest.add(chunk.offset, n as u64, &chunk.sha256);
            emit(chunk)?;
            off += n as u64;
        }
    }
    Ok(digest.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_data_only_and_are_aligned() {
        let t = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(t.path().join("img"))
            .unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&vec![7u8; 6 << 20], 2 << 20).unwrap();
        f.sync_all().unwrap();
        let (ranges, bytes) = data_of(&f, 64 << 20).unwrap();
        let mut seen = Vec::new();
        let trailer = read_image(&f, 64 << 20, &ranges, &mut |c| {
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
