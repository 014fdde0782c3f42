//! Snapshots in the pool: `snapshots/<hex>.img` (a reflink or sparse copy of a volume's image)
//! and `snapshots/<hex>.json`, under the same crash rules as volumes: the image is built in
//! `tmp/` and renamed into place before the record is written; deletion removes the record first.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::atomic;
use crate::copy::CopyMethod;
use crate::error::IoContext;
use crate::ids::{self, Kind, VolumeId};
use crate::pool::{copy_quiesced, snapshot_lock_key, to_json, Pool, Quiesce};
use crate::record::{SnapshotRecord, RECORD_FORMAT};
use crate::PoolError;

impl Pool {
    pub fn snapshot_image_path(&self, hex: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{hex}.img"))
    }

    pub(crate) fn snapshot_record_path(&self, hex: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{hex}.json"))
    }

    /// Check a snapshot ID from a request, like [`Pool::parse_volume_id`].
    pub fn parse_snapshot_id(&self, id: &str) -> Result<Option<VolumeId>, PoolError> {
        ids::validate_id("snapshot_id", id)?;
        Ok(VolumeId::parse(Kind::Snapshot, id).filter(|v| self.owns(v)))
    }

    pub fn get_snapshot(&self, id: &str) -> Result<SnapshotRecord, PoolError> {
        self.parse_snapshot_id(id)?
            .and_then(|v| {
                self.snapshots
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&v.hex)
                    .cloned()
            })
            .ok_or_else(|| {
                PoolError::NotFound(format!(
                    "snapshot {id} does not exist on node {}",
                    self.node_id()
                ))
            })
    }

    /// Snapshot `source_volume_id` as `name` (idempotent by name). `quiesce` runs right
    /// before the copy; its guard is dropped right after (the driver freezes a mounted
    /// filesystem there so the snapshot mounts cleanly).
    pub fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        quiesce: Quiesce<'_>,
    ) -> Result<SnapshotRecord, PoolError> {
        self.require_writer()?;
        ids::validate_name(name)?;
        let src = self.parse_volume_id(source_volume_id)?.ok_or_else(|| {
            PoolError::NotFound(format!(
                "source volume {source_volume_id} does not exist on node {}",
                self.node_id()
            ))
        })?;
        let id = self.mint(Kind::Snapshot, name);
        let _guard = self.locks.lock(&snapshot_lock_key(&id.hex));
        if let Some(existing) = self
            .snapshots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id.hex)
        {
            if existing.source_volume_id == source_volume_id {
                return Ok(existing.clone());
            }
            return Err(PoolError::AlreadyExists(format!(
                "snapshot {name:?} already exists for volume {}",
                existing.source_volume_id
            )));
        }
        let _src_guard = self.lock_volume(&src.hex);
        let volume = self.get_hex(&src.hex).ok_or_else(|| {
            PoolError::NotFound(format!(
                "source volume {source_volume_id} does not exist on node {}",
                self.node_id()
            ))
        })?;
        let from_path = self.image_path(&src.hex);
        let from = File::open(&from_path).ctx(|| format!("open {}", from_path.display()))?;
        let tmp = self.dir.join("tmp").join(format!("snap-{}.img", id.hex));
        let dest = self.snapshot_image_path(&id.hex);
        let started = std::time::Instant::now();
        let result = (|| {
            // 0600 like volume images: a snapshot holds the same tenant data.
            let dst = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .ctx(|| format!("create {}", tmp.display()))?;
            // Before freezing: a freeze on a full pool fails with EIO (the volume's dirty data
            // cannot be written back), and a copy that cannot fit is not worth a freeze.
            self.ensure_room_for_copy(&from_path, true)?;
            let method = copy_quiesced(
                quiesce,
                Some(&volume),
                &from,
                &dst,
                "copy the volume into a snapshot",
            )?;
            dst.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
            // After the thaw: digesting must not lengthen the freeze (snapshot_metadata.rs).
            self.record_chunk_digests(&id.hex, method, &dst, volume.size_bytes)?;
            std::fs::rename(&tmp, &dest)
                .ctx(|| format!("move snapshot into {}", dest.display()))?;
            atomic::sync_dir(&self.dir.join("snapshots")).ctx(|| "fsync snapshots dir".into())?;
            Ok::<CopyMethod, PoolError>(method)
        })();
        let method = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let record = SnapshotRecord {
            format: RECORD_FORMAT,
            id: id.to_string(),
            name: name.to_string(),
            source_volume_id: source_volume_id.to_string(),
            size_bytes: volume.size_bytes,
            fs_type: volume.fs_type,
            created_unix_nanos: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            method,
            group_snapshot_id: None,
            encryption: volume.encryption.clone(),
        };
        if let Err(e) = atomic::write_file(&self.snapshot_record_path(&id.hex), &to_json(&record)) {
            let _ = atomic::remove_file(&dest);
            return Err(PoolError::io("write snapshot record", e));
        }
        self.snapshots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.hex.clone(), record.clone());
        self.changed();
        tracing::info!(snapshot_id = %record.id, source = %source_volume_id, method = method.as_str(),
            ms = started.elapsed().as_millis() as u64, "snapshot created");
        Ok(record)
    }

    /// Delete a snapshot; `Ok(false)` when it did not exist. Volumes restored from it are
    /// independent copies and stay.
    pub fn delete_snapshot(&self, id: &str) -> Result<bool, PoolError> {
        self.require_writer()?;
        let Some(sid) = self.parse_snapshot_id(id)? else {
            return Ok(false);
        };
        let _guard = self.locks.lock(&snapshot_lock_key(&sid.hex));
        let group = match self
            .snapshots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sid.hex)
        {
            None => return Ok(false),
            Some(r) => r.group_snapshot_id.clone(),
        };
        // CSI v1.11+: a member of a group snapshot "CAN NOT be deleted stand alone"; the spec's
        // code for that is INVALID_ARGUMENT, and the caller deletes the whole group instead.
        if let Some(group) = group {
            return Err(PoolError::InvalidArgument(format!(
                "snapshot {id} is a member of group snapshot {group} and cannot be deleted on \
                 its own: delete the group snapshot (DeleteVolumeGroupSnapshot)"
            )));
        }
        atomic::remove_file(&self.snapshot_record_path(&sid.hex))
            .ctx(|| format!("remove record of {id}"))?;
        self.snapshots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sid.hex);
        self.changed();
        atomic::remove_file(&self.snapshot_image_path(&sid.hex))
            .ctx(|| format!("remove image of {id}"))?;
        self.remove_chunk_digests(&sid.hex);
        tracing::info!(snapshot_id = %id, "snapshot deleted");
        Ok(true)
    }

    /// One page of snapshots in ID order, optionally only those of one source volume.
    pub fn list_snapshots(
        &self,
        source_volume_id: Option<&str>,
        after: Option<&str>,
        max: usize,
    ) -> (Vec<SnapshotRecord>, Option<String>) {
        use std::ops::Bound;
        let snaps = self.snapshots.read().unwrap_or_else(|e| e.into_inner());
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_string()));
        let max = if max == 0 { usize::MAX } else { max };
        let mut matching = snaps
            .range((start, Bound::Unbounded))
            .filter(|(_, r)| source_volume_id.is_none_or(|s| r.source_volume_id == s));
        let page: Vec<(String, SnapshotRecord)> = matching
            .by_ref()
            .take(max)
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        let next = if matching.next().is_some() {
            page.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        (page.into_iter().map(|(_, r)| r).collect(), next)
    }

    /// How many snapshots the pool holds (for metrics).
    pub fn snapshot_count(&self) -> usize {
        self.snapshots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Bytes a snapshot's image really occupies.
    pub fn snapshot_allocated_bytes(&self, hex: &str) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.snapshot_image_path(hex))
            .ok()
            .map(|m| m.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use crate::params::{Allocation, FsType, VolumeParams};
    use crate::pool::{CreateRequest, Pool, PoolOptions};
    use crate::record::ContentSource;
    use crate::size::MIB;
    use crate::PoolError;
    use std::io::{Seek, SeekFrom, Write};

    fn no_quiesce(_: &crate::VolumeRecord) -> Result<Box<dyn crate::pool::Quiesced>, PoolError> {
        Ok(Box::new(()))
    }

    fn req(name: &str, required: u64, source: Option<ContentSource>) -> CreateRequest {
        CreateRequest {
            name: name.into(),
            required_bytes: required as i64,
            limit_bytes: 0,
            params: VolumeParams {
                fs_type: FsType::Ext4,
                allocation: Allocation::Thin,
                fs_explicit: false,
                ..Default::default()
            },
            needs_filesystem: true,
            source,
        }
    }

    fn image_of(pool: &Pool, id: &str) -> std::path::PathBuf {
        let v = crate::VolumeId::parse(crate::ids::Kind::Volume, id).unwrap();
        pool.image_path(&v.hex)
    }

    #[test]
    fn snapshot_restore_clone_and_delete() {
        let t = tempfile::tempdir().unwrap();
        let (pool, _) = Pool::open(PoolOptions::all(t.path(), "n1")).unwrap();
        let v = pool.create_volume(&req("src", 32 * MIB, None)).unwrap();
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(image_of(&pool, &v.id))
                .unwrap();
            f.seek(SeekFrom::Start(5 * MIB)).unwrap();
            f.write_all(b"snapshot me").unwrap();
        }
        let s = pool.create_snapshot("snap-1", &v.id, &no_quiesce).unwrap();
        assert_eq!(s.size_bytes, 32 * MIB);
        assert_eq!(
            pool.create_snapshot("snap-1", &v.id, &no_quiesce).unwrap(),
            s
        );
        let other = pool.create_volume(&req("other", 8 * MIB, None)).unwrap();
        assert!(matches!(
            pool.create_snapshot("snap-1", &other.id, &no_quiesce),
            Err(PoolError::AlreadyExists(_))
        ));
        assert!(matches!(
            pool.create_snapshot("x", "vol-0123456789abcdef0123@n1", &no_quiesce),
            Err(PoolError::NotFound(_))
        ));

        // Deleting the source leaves the snapshot usable.
        assert!(pool.delete_volume(&v.id).unwrap());
        let restored = pool
            .create_volume(&req(
                "restored",
                0,
                Some(ContentSource::Snapshot(s.id.clone())),
            ))
            .unwrap();
        assert_eq!(restored.size_bytes, 32 * MIB);
        let data = std::fs::read(image_of(&pool, &restored.id)).unwrap();
        assert_eq!(
            &data[5 * MIB as usize..5 * MIB as usize + 11],
            b"snapshot me"
        );
        assert!(matches!(
            pool.create_volume(&req(
                "too-small",
                8 * MIB,
                Some(ContentSource::Snapshot(s.id.clone()))
            )),
            Err(PoolError::OutOfRange(_))
        ));
        let bigger = pool
            .create_volume(&req(
                "bigger",
                64 * MIB,
                Some(ContentSource::Snapshot(s.id.clone())),
            ))
            .unwrap();
        assert_eq!(
            std::fs::metadata(image_of(&pool, &bigger.id))
                .unwrap()
                .len(),
            64 * MIB
        );
        let clone = pool
            .create_volume(&req(
                "clone",
                0,
                Some(ContentSource::Volume(restored.id.clone())),
            ))
            .unwrap();
        let cdata = std::fs::read(image_of(&pool, &clone.id)).unwrap();
        assert!(cdata == data);

        let (all, next) = pool.list_snapshots(None, None, 0);
        assert_eq!(all.len(), 1);
        assert!(next.is_none());
        assert!(pool.list_snapshots(Some(&other.id), None, 0).0.is_empty());
        assert!(pool.delete_snapshot(&s.id).unwrap());
        assert!(!pool.delete_snapshot(&s.id).unwrap());
        assert!(matches!(
            pool.create_volume(&req("gone", 0, Some(ContentSource::Snapshot(s.id.clone())))),
            Err(PoolError::NotFound(_))
        ));
        // Snapshots survive a restart.
        let s2 = pool
            .create_snapshot("snap-2", &clone.id, &no_quiesce)
            .unwrap();
        drop(pool);
        let (pool, _) = Pool::open(PoolOptions::all(t.path(), "n1")).unwrap();
        assert_eq!(pool.get_snapshot(&s2.id).unwrap(), s2);
    }
}
