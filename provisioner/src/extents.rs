//! Where a file's bytes live: its data ranges (SEEK_DATA/SEEK_HOLE, which every pool filesystem
//! answers) and its physical extents (FIEMAP, which tells reflink-shared blocks apart). These
//! maps are what changed-block tracking is built from; byte ranges here are file offsets, which
//! for a snapshot image are the volume's block-device offsets.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

/// A half-open byte range `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

impl Range {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Append `[start, end)` to ascending `out`, merging it into the last range when they touch, so
/// streams stay as compact as the file's layout allows.
pub fn push_merged(out: &mut Vec<Range>, start: u64, end: u64) {
    if end <= start {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.end() >= start {
            last.len = last.len.max(end - last.offset);
            return;
        }
    }
    out.push(Range {
        offset: start,
        len: end - start,
    });
}

/// The ranges of ascending `ranges` at or after `start`, the first one cut at `start`: a stream
/// resumed at any offset then yields exactly the rest of the union, never a byte twice.
pub fn from_offset(ranges: &[Range], start: u64) -> Vec<Range> {
    ranges
        .iter()
        .filter(|r| r.end() > start)
        .map(|r| {
            let s = r.offset.max(start);
            Range {
                offset: s,
                len: r.end() - s,
            }
        })
        .collect()
}

/// The union of two ascending range lists, ascending and merged.
pub fn union(a: &[Range], b: &[Range]) -> Vec<Range> {
    let mut all: Vec<Range> = a.iter().chain(b).copied().collect();
    all.sort_unstable_by_key(|r| r.offset);
    let mut out = Vec::with_capacity(all.len());
    for r in all {
        push_merged(&mut out, r.offset, r.end());
    }
    out
}

/// The intersection of two ascending, non-overlapping range lists.
pub fn intersect(a: &[Range], b: &[Range]) -> Vec<Range> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let start = a[i].offset.max(b[j].offset);
        let end = a[i].end().min(b[j].end());
        push_merged(&mut out, start, end);
        if a[i].end() < b[j].end() {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The ranges of the first `len` bytes of `f` that hold data (everything else reads as zeros).
/// Unwritten (preallocated) extents count as data here: SEEK_DATA reports them on some
/// filesystems, and over-reporting is always safe.
pub fn data_ranges(f: &File, len: u64) -> io::Result<Vec<Range>> {
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let data = match lseek(f, pos as i64, Whence::SeekData) {
            Ok(off) => off as u64,
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= len {
            break;
        }
        let hole =
            (lseek(f, data as i64, Whence::SeekHole).map_err(io::Error::from)? as u64).min(len);
        push_merged(&mut out, data, hole);
        pos = hole;
    }
    Ok(out)
}

/// One FIEMAP extent: `len` bytes at logical `logical` live at physical byte `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    pub flags: u32,
}

pub const FIEMAP_EXTENT_LAST: u32 = 0x1;
pub const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
pub const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
pub const FIEMAP_EXTENT_ENCODED: u32 = 0x8;
pub const FIEMAP_EXTENT_DATA_ENCRYPTED: u32 = 0x80;
pub const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
pub const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
pub const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x400;
pub const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;

/// Flags under which `physical` does not identify the bytes: no location yet (delalloc,
/// unknown), or data stored transformed or packed with other data. Such extents never count as
/// unchanged.
pub const FIEMAP_UNRELIABLE: u32 = FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL;

const FIEMAP_FLAG_SYNC: u32 = 0x1;
/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const BATCH: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct RawFiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [RawExtent; BATCH],
}

/// Every extent of the first `len` bytes of `f`, in logical order. FIEMAP_FLAG_SYNC flushes
/// dirty pages first, so no extent is reported as delalloc without a location.
/// `Err(Unsupported)` when the filesystem has no FIEMAP.
pub fn fiemap(f: &File, len: u64) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    while start < len {
        let mut req = Box::new(RawFiemap {
            fm_start: start,
            fm_length: len - start,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_mapped_extents: 0,
            fm_extent_count: BATCH as u32,
            fm_reserved: 0,
            fm_extents: [RawExtent::default(); BATCH],
        });
        // SAFETY: `req` is a properly sized `struct fiemap` with room for `fm_extent_count`
        // extents, and stays alive for the call.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => {
                    io::Error::new(io::ErrorKind::Unsupported, "FIEMAP is not supported")
                }
                _ => e,
            });
        }
        let n = req.fm_mapped_extents as usize;
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &req.fm_extents[..n] {
            out.push(Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                len: e.fe_length,
                flags: e.fe_flags,
            });
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        let e = &req.fm_extents[n - 1];
        let next = e.fe_logical + e.fe_length;
        if last || next <= start {
            break;
        }
        start = next;
    }
    Ok(out)
}

/// The ranges of `[0, len)` where `target` may hold different bytes from `base`, judged from
/// their extent maps alone. A range is unchanged only where both are holes, or where both map
/// it to the same physical bytes with reliable, equally-(un)written extents. This is sound only
/// because snapshot images are immutable: a copy-on-write filesystem never rewrites a block
/// that two files share, and since neither file is ever written after it is made, a physical
/// block both reference at the same logical offset holds the same bytes in both.
pub fn changed_between(base: &[Extent], target: &[Extent], len: u64) -> Vec<Range> {
    // The breakpoints of both maps; between two of them, each file is one hole or one extent.
    let mut points: Vec<u64> = vec![0, len];
    for e in base.iter().chain(target) {
        points.push(e.logical.min(len));
        points.push((e.logical + e.len).min(len));
    }
    points.sort_unstable();
    points.dedup();
    let (mut bi, mut ti) = (0usize, 0usize);
    let mut out = Vec::new();
    for w in points.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a >= b {
            continue;
        }
        let bx = covering(base, &mut bi, a);
        let tx = covering(target, &mut ti, a);
        let unchanged = match (bx, tx) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                (x.flags | y.flags) & FIEMAP_UNRELIABLE == 0
                    && (x.flags & FIEMAP_EXTENT_UNWRITTEN) == (y.flags & FIEMAP_EXTENT_UNWRITTEN)
                    && x.physical + (a - x.logical) == y.physical + (a - y.logical)
            }
            _ => false,
        };
        if !unchanged {
            push_merged(&mut out, a, b);
        }
    }
    out
}

/// The extent of ascending `map` covering `at`, advancing `i` (calls come with rising `at`).
fn covering<'a>(map: &'a [Extent], i: &mut usize, at: u64) -> Option<&'a Extent> {
    while *i < map.len() && map[*i].logical + map[*i].len <= at {
        *i += 1;
    }
    map.get(*i).filter(|e| e.logical <= at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn ext(logical: u64, physical: u64, len: u64) -> Extent {
        Extent {
            logical,
            physical,
            len,
            flags: 0,
        }
    }

    #[test]
    fn data_ranges_find_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = File::create(dir.path().join("f")).unwrap();
        f.set_len(16 << 20).unwrap();
        f.seek(SeekFrom::Start(4 << 20)).unwrap();
        f.write_all(&[1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let r = data_ranges(&f, 16 << 20).unwrap();
        let total: u64 = r.iter().map(|r| r.len).sum();
        assert!((1 << 20..=2 << 20).contains(&total), "{r:?}");
        assert!(r.iter().all(|r| r.offset < 6 << 20 && r.end() > 3 << 20));
        let ext = fiemap(&f, 16 << 20).unwrap();
        assert!(!ext.is_empty());
    }

    #[test]
    fn shared_extents_are_unchanged_and_holes_that_appear_are_changed() {
        let base = [ext(0, 1000, 100), ext(200, 5000, 100)];
        // Same first extent; second one moved; a new extent at 400.
        let target = [ext(0, 1000, 50), ext(50, 9000, 50), ext(400, 7000, 10)];
        let c = changed_between(&base, &target, 500);
        assert_eq!(
            c,
            vec![
                Range {
                    offset: 50,
                    len: 50
                },
                Range {
                    offset: 200,
                    len: 100
                },
                Range {
                    offset: 400,
                    len: 10
                }
            ]
        );
        let mut unwritten = target;
        unwritten[0].flags = FIEMAP_EXTENT_UNWRITTEN;
        assert_eq!(changed_between(&base, &unwritten, 500)[0].offset, 0);
    }

    #[test]
    fn resuming_cuts_the_first_range() {
        let r = [
            Range { offset: 0, len: 10 },
            Range {
                offset: 20,
                len: 10,
            },
        ];
        assert_eq!(from_offset(&r, 25), vec![Range { offset: 25, len: 5 }]);
        assert!(from_offset(&r, 30).is_empty());
        let b = [Range { offset: 5, len: 20 }];
        assert_eq!(
            intersect(&r, &b),
            vec![Range { offset: 5, len: 5 }, Range { offset: 20, len: 5 }]
        );
        assert_eq!(union(&r, &b), vec![Range { offset: 0, len: 30 }]);
    }
}
