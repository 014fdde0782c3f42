//! Changed-block tracking over the pool's snapshots (the CSI SnapshotMetadata service): which
//! ranges of a snapshot hold data, and which ranges may differ between two snapshots of one
//! volume. A snapshot image is an image of the volume's block device, so file offsets are
//! volume offsets.
//!
//! Everything here relies on snapshot images being immutable: nothing writes an image after it
//! is renamed into `snapshots/`, so its extent map and its recorded chunk digests stay true.

use std::fs::File;
use std::path::PathBuf;

use crate::chunk_digest;
use crate::copy::CopyMethod;
use crate::error::IoContext;
use crate::extents::{self, Range};
use crate::ids::{self, Kind, VolumeId};
use crate::pool::Pool;
use crate::record::SnapshotRecord;
use crate::PoolError;

/// How a delta was worked out (logged, and shown by the CLI), cheapest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaMethod {
    /// Base and target are the same snapshot: nothing differs.
    Same,
    /// Reflink pool: FIEMAP maps of both images compared; reads no data.
    Extents,
    /// Chunk digests recorded at snapshot time compared; reads no data.
    Digests,
    /// Both images read and compared (snapshots without digests).
    Compare,
}

impl DeltaMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaMethod::Same => "same",
            DeltaMethod::Extents => "extents",
            DeltaMethod::Digests => "digests",
            DeltaMethod::Compare => "compare",
        }
    }
}

/// Ranges of one snapshot, ascending and non-overlapping, within `capacity` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRanges {
    pub capacity: u64,
    pub ranges: Vec<Range>,
}

impl Pool {
    pub(crate) fn chunk_digest_path(&self, hex: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{hex}.chunks"))
    }

    /// Record chunk digests of the snapshot image `image` (not yet in place) for snapshot
    /// `hex`. A stale digest file left by a crash is removed first, and failing to remove it
    /// fails the snapshot: stale digests would make deltas miss changes. Failing to compute or
    /// write new digests only costs speed (deltas then compare the images), so it is a warning.
    pub(crate) fn record_chunk_digests(
        &self,
        hex: &str,
        method: CopyMethod,
        image: &File,
        len: u64,
    ) -> Result<(), PoolError> {
        let path = self.chunk_digest_path(hex);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(PoolError::io(format!("remove stale {}", path.display()), e)),
        }
        // Reflink pools compare extent maps instead, which costs nothing at snapshot time.
        if method != CopyMethod::SparseCopy {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let written = chunk_digest::compute(image, len)
            .and_then(|d| crate::atomic::write_file(&path, &chunk_digest::encode(&d)));
        match written {
            Ok(()) => tracing::debug!(
                snapshot = hex,
                ms = started.elapsed().as_millis() as u64,
                "chunk digests recorded"
            ),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                tracing::warn!(snapshot = hex, error = %e,
                    "chunk digests not recorded; deltas against this snapshot will read both images");
            }
        }
        Ok(())
    }

    /// Remove the digests of a deleted snapshot (best effort: an orphan is harmless, because
    /// a new snapshot of the same name removes it before recording its own).
    pub(crate) fn remove_chunk_digests(&self, hex: &str) {
        let _ = std::fs::remove_file(self.chunk_digest_path(hex));
    }

    fn open_snapshot(&self, rec: &SnapshotRecord) -> Result<File, PoolError> {
        let v = VolumeId::parse(Kind::Snapshot, &rec.id)
            .ok_or_else(|| PoolError::NotFound(format!("snapshot {} has a bad ID", rec.id)))?;
        let path = self.snapshot_image_path(&v.hex);
        File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => PoolError::NotFound(format!(
                "snapshot {} has no image (deleted meanwhile, or lost)",
                rec.id
            )),
            _ => PoolError::io(format!("open {}", path.display()), e),
        })
    }

    /// The ranges of snapshot `id` that hold data; the rest reads as zeros.
    pub fn snapshot_allocated(&self, id: &str) -> Result<SnapshotRanges, PoolError> {
        let rec = self.get_snapshot(id)?;
        let f = self.open_snapshot(&rec)?;
        let ranges = extents::data_ranges(&f, rec.size_bytes)
            .ctx(|| format!("map the data of snapshot {id}"))?;
        Ok(SnapshotRanges {
            capacity: rec.size_bytes,
            ranges,
        })
    }

    /// The ranges where snapshot `target_id` may differ from `base_id`: never missing a
    /// changed byte, sometimes reporting unchanged ones (a rewrite with the same bytes on a
    /// reflink pool; whole 1 MiB chunks with digests). FAILED_PRECONDITION unless both are
    /// snapshots of the same volume on this node, base not newer than target.
    pub fn snapshot_delta(
        &self,
        base_id: &str,
        target_id: &str,
    ) -> Result<(SnapshotRanges, DeltaMethod), PoolError> {
        ids::validate_id("base_snapshot_id", base_id)?;
        ids::validate_id("target_snapshot_id", target_id)?;
        if let (Some(b), Some(t)) = (
            VolumeId::parse(Kind::Snapshot, base_id),
            VolumeId::parse(Kind::Snapshot, target_id),
        ) {
            if b.node != t.node {
                return Err(PoolError::FailedPrecondition(format!(
                    "snapshots {base_id} and {target_id} are on different nodes ({} and {}): \
                     they are not snapshots of one volume",
                    b.node, t.node
                )));
            }
        }
        let base = self.get_snapshot(base_id)?;
        let target = self.get_snapshot(target_id)?;
        if base.source_volume_id != target.source_volume_id {
            return Err(PoolError::FailedPrecondition(format!(
                "{base_id} is a snapshot of {} but {target_id} is a snapshot of {}: \
                 only snapshots of one volume can be compared",
                base.source_volume_id, target.source_volume_id
            )));
        }
        if base.created_unix_nanos > target.created_unix_nanos {
            return Err(PoolError::FailedPrecondition(format!(
                "base snapshot {base_id} is newer than target {target_id}"
            )));
        }
        let len = target.size_bytes;
        let done = |ranges, m| {
            Ok((
                SnapshotRanges {
                    capacity: len,
                    ranges,
                },
                m,
            ))
        };
        if base.id == target.id {
            return done(Vec::new(), DeltaMethod::Same);
        }
        let (bf, tf) = (self.open_snapshot(&base)?, self.open_snapshot(&target)?);
        if base.method == CopyMethod::Reflink && target.method == CopyMethod::Reflink {
            match (
                extents::fiemap(&bf, base.size_bytes.min(len)),
                extents::fiemap(&tf, len),
            ) {
                (Ok(b), Ok(t)) => {
                    return done(extents::changed_between(&b, &t, len), DeltaMethod::Extents)
                }
                (Err(e), _) | (_, Err(e)) if e.kind() != std::io::ErrorKind::Unsupported => {
                    return Err(PoolError::io("FIEMAP a snapshot image", e))
                }
                _ => {}
            }
        }
        let hex = |r: &SnapshotRecord| VolumeId::parse(Kind::Snapshot, &r.id).map(|v| v.hex);
        let digests = |r: &SnapshotRecord| {
            hex(r)
                .and_then(|h| chunk_digest::load(&self.chunk_digest_path(&h)))
                .filter(|d| d.len == r.size_bytes)
        };
        // Chunks are coarse: a 4 KiB write into a hole would cost a backup 1 MiB. Bytes that
        // are holes in both images read as zeros in both, so only the chunks' parts that hold
        // data in either can have changed (SEEK_DATA maps: cheap, no data read).
        let data = {
            let b = extents::data_ranges(&bf, base.size_bytes.min(len))
                .ctx(|| format!("map the data of snapshot {base_id}"))?;
            let t = extents::data_ranges(&tf, len)
                .ctx(|| format!("map the data of snapshot {target_id}"))?;
            extents::union(&b, &t)
        };
        if let (Some(b), Some(t)) = (digests(&base), digests(&target)) {
            if let Some(ranges) = chunk_digest::changed_between(&b, &t, len) {
                return done(extents::intersect(&ranges, &data), DeltaMethod::Digests);
            }
        }
        let ranges = chunk_digest::compare_files(&bf, base.size_bytes, &tf, len)
            .ctx(|| format!("compare snapshots {base_id} and {target_id}"))?;
        done(extents::intersect(&ranges, &data), DeltaMethod::Compare)
    }
}
