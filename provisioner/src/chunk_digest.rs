//! Per-chunk digests of a snapshot image, recorded when the snapshot is taken on a pool without
//! reflink. Extent maps cannot tell what changed there (every sparse copy has its own blocks),
//! so a delta between two such snapshots compares their digests instead: two small files are
//! read, not two images. SHA-256 because it is already a dependency and runs at GB/s with the
//! SHA extensions this machine class has; a chunk that is entirely a hole is recorded as a hole
//! without reading it. The digests stay true because snapshot images are never written again.
//!
//! File format (`snapshots/<hex>.chunks`, written atomically): the magic `LVCHUNK1`, the chunk
//! size and the image length as little-endian u64, then per chunk one byte (0 hole, 1 data)
//! and, for data, its 32-byte SHA-256.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::extents::{self, push_merged, Range};

/// 1 MiB: a 4 KiB change then costs a backup 1 MiB, and the digests cost 33 bytes per MiB of
/// data (0.003 %; a hole chunk costs one byte).
pub const CHUNK: u64 = 1 << 20;
const MAGIC: &[u8; 8] = b"LVCHUNK1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkDigests {
    pub chunk: u64,
    pub len: u64,
    /// One entry per chunk; `None` is a chunk with no data (reads as zeros).
    pub digests: Vec<Option<[u8; 32]>>,
}

/// Digest the first `len` bytes of `f`, reading only chunks that hold data.
pub fn compute(f: &File, len: u64) -> io::Result<ChunkDigests> {
    let data = extents::data_ranges(f, len)?;
    let n = len.div_ceil(CHUNK) as usize;
    let mut digests = vec![None; n];
    let mut buf = vec![0u8; CHUNK as usize];
    let mut last_done: Option<usize> = None;
    for r in &data {
        let first = (r.offset / CHUNK) as usize;
        let last = ((r.end() - 1) / CHUNK) as usize;
        for (i, slot) in digests.iter_mut().enumerate().take(last + 1).skip(first) {
            if last_done.is_some_and(|d| d >= i) {
                continue;
            }
            let off = i as u64 * CHUNK;
            let want = CHUNK.min(len - off) as usize;
            f.read_exact_at(&mut buf[..want], off)?;
            *slot = Some(Sha256::digest(&buf[..want]).into());
            last_done = Some(i);
        }
    }
    Ok(ChunkDigests {
        chunk: CHUNK,
        len,
        digests,
    })
}

pub fn encode(d: &ChunkDigests) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + d.digests.len() * 33);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&d.chunk.to_le_bytes());
    out.extend_from_slice(&d.len.to_le_bytes());
    for x in &d.digests {
        match x {
            None => out.push(0),
            Some(h) => {
                out.push(1);
                out.extend_from_slice(h);
            }
        }
    }
    out
}

pub fn decode(b: &[u8]) -> Option<ChunkDigests> {
    let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
    if b.get(..8)? != MAGIC {
        return None;
    }
    let (chunk, len) = (u64_at(8)?, u64_at(16)?);
    if chunk == 0 {
        return None;
    }
    let n = len.div_ceil(chunk) as usize;
    let mut digests = Vec::with_capacity(n);
    let mut i = 24;
    for _ in 0..n {
        match *b.get(i)? {
            0 => {
                digests.push(None);
                i += 1;
            }
            1 => {
                digests.push(Some(b.get(i + 1..i + 33)?.try_into().ok()?));
                i += 33;
            }
            _ => return None,
        }
    }
    (i == b.len()).then_some(ChunkDigests {
        chunk,
        len,
        digests,
    })
}

/// The digests recorded at `path`; `None` when there are none (a snapshot taken before digests
/// were recorded, or on a reflink pool) or they cannot be trusted (a damaged file).
pub fn load(path: &Path) -> Option<ChunkDigests> {
    let bytes = std::fs::read(path).ok()?;
    let d = decode(&bytes);
    if d.is_none() {
        tracing::warn!(path = %path.display(), "unreadable chunk digests ignored");
    }
    d
}

/// The chunks of `[0, len)` whose digests differ. Chunks past the end of `base` (a volume grown
/// between the snapshots) compare as holes, which is what a restored, grown base reads as.
/// `None` when the two were recorded with different chunk sizes.
pub fn changed_between(base: &ChunkDigests, target: &ChunkDigests, len: u64) -> Option<Vec<Range>> {
    if base.chunk != target.chunk {
        return None;
    }
    let chunk = target.chunk;
    let mut out = Vec::new();
    for i in 0..len.div_ceil(chunk) as usize {
        let b = if (i as u64) * chunk < base.len {
            base.digests.get(i).copied().flatten()
        } else {
            None
        };
        let t = target.digests.get(i).copied().flatten();
        // A partial last chunk of a base that later grew digests fewer bytes than the same
        // chunk of the target, so its digest cannot match: it is reported, as it must be.
        if b != t {
            let start = i as u64 * chunk;
            push_merged(&mut out, start, (start + chunk).min(len));
        }
    }
    Some(out)
}

/// Compare two images byte by byte, chunk by chunk, skipping chunks that are holes in both:
/// the fallback for snapshots without digests. It reads the data of both images.
pub fn compare_files(
    base: &File,
    base_len: u64,
    target: &File,
    len: u64,
) -> io::Result<Vec<Range>> {
    let mut data = extents::data_ranges(base, base_len.min(len))?;
    data.extend(extents::data_ranges(target, len)?);
    let mut marked = vec![false; len.div_ceil(CHUNK) as usize];
    for r in &data {
        for m in marked
            .iter_mut()
            .take(((r.end() - 1) / CHUNK) as usize + 1)
            .skip((r.offset / CHUNK) as usize)
        {
            *m = true;
        }
    }
    let (mut a, mut b) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut out = Vec::new();
    for (i, _) in marked.iter().enumerate().filter(|(_, m)| **m) {
        let off = i as u64 * CHUNK;
        let want = CHUNK.min(len - off) as usize;
        target.read_exact_at(&mut b[..want], off)?;
        a[..want].fill(0);
        if off < base_len {
            let have = (base_len - off).min(want as u64) as usize;
            base.read_exact_at(&mut a[..have], off)?;
        }
        if a[..want] != b[..want] {
            push_merged(&mut out, off, off + want as u64);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn digests_round_trip_and_find_the_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(8 * CHUNK + 123).unwrap();
        f.seek(SeekFrom::Start(2 * CHUNK - 10)).unwrap();
        f.write_all(&[9u8; 20]).unwrap();
        let a = compute(&f, 8 * CHUNK + 123).unwrap();
        assert_eq!(a.digests.len(), 9);
        assert!(a.digests[1].is_some() && a.digests[2].is_some());
        assert!(a.digests[0].is_none() && a.digests[8].is_none());
        assert_eq!(decode(&encode(&a)).unwrap(), a);
        assert!(decode(&encode(&a)[..30]).is_none());

        f.seek(SeekFrom::Start(8 * CHUNK + 100)).unwrap();
        f.write_all(b"x").unwrap();
        let b = compute(&f, 8 * CHUNK + 123).unwrap();
        assert_eq!(
            changed_between(&a, &b, b.len).unwrap(),
            vec![Range {
                offset: 8 * CHUNK,
                len: 123
            }]
        );
        let base = File::open(&p).unwrap();
        assert!(compare_files(&base, b.len, &f, b.len).unwrap().is_empty());
    }
}
