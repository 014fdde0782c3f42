//! Creating (blank, or a copy of a snapshot or volume), deleting, expanding and modifying
//! volumes.

use super::*;

impl Pool {
    /// Create a volume, or return the existing one if `req` is compatible with it (CSI name
    /// idempotency). Safe to call concurrently with the same name: callers are serialised.
    pub fn create_volume(&self, req: &CreateRequest) -> Result<VolumeRecord, PoolError> {
        self.create_volume_with(req, &no_quiesce)
    }

    /// [`Pool::create_volume`], calling `quiesce` on a source volume right before copying it
    /// (the driver freezes its filesystem when it is mounted here) and dropping its guard after.
    pub fn create_volume_with(
        &self,
        req: &CreateRequest,
        quiesce: Quiesce<'_>,
    ) -> Result<VolumeRecord, PoolError> {
        self.create_volume_from(req, quiesce, self)
    }

    /// [`Pool::create_volume_with`], with the content source (if any) found in `source_pool`,
    /// another pool of this node or this one. Between two pools the copy is a
    /// [`crate::transfer`]: sparse, never a reflink.
    pub fn create_volume_from(
        &self,
        req: &CreateRequest,
        quiesce: Quiesce<'_>,
        source_pool: &Pool,
    ) -> Result<VolumeRecord, PoolError> {
        self.require_writer()?;
        ids::validate_name(&req.name)?;
        let id = self.mint(Kind::Volume, &req.name);
        let _guard = self.lock_volume(&id.hex);
        if let Some(existing) = self.get_hex(&id.hex) {
            return check_compatible(&existing, req);
        }
        // A copy from another node is filling this name: never a second image beside it.
        if let Some(filling) = self.pending_transfer(&id.hex) {
            check_compatible(&filling.volume, req)?;
            return Err(PoolError::Aborted(format!(
                "volume {id} is being filled by a copy from {}; retry",
                filling.endpoint
            )));
        }
        let source = req
            .source
            .as_ref()
            .map(|s| source_pool.resolve_source(s))
            .transpose()?;
        let (size, fs_type) = match &source {
            Some(src) => plan_copy(req, src.size_bytes, src.fs_type)?,
            None => {
                let minimum = if req.needs_filesystem {
                    req.params.fs_type.min_size()
                } else {
                    0
                };
                let size = size::choose(req.required_bytes, req.limit_bytes, minimum)?;
                (size, req.params.fs_type)
            }
        };
        let params = crate::params::VolumeParams {
            fs_type,
            ..req.params
        };
        let record = VolumeRecord {
            format: RECORD_FORMAT,
            id: id.to_string(),
            name: req.name.clone(),
            size_bytes: size,
            fs_type: params.fs_type,
            allocation: params.allocation,
            created_unix: unix_now(),
            source: req.source.clone(),
            io_limits: params.io_limits,
            block_only: !req.needs_filesystem,
        };
        match &source {
            None => self.build_image(
                &self.image_path(&id.hex),
                &id.hex,
                size,
                params.allocation,
                |_| Ok(()),
            )?,
            Some(src) => {
                // Hold the source still (no delete/expand) while it is copied.
                let _src_guard = src.lock_key.as_ref().map(|k| source_pool.locks.lock(k));
                let same_pool = std::ptr::eq(self, source_pool);
                let from =
                    File::open(&src.image).ctx(|| format!("open {}", src.image.display()))?;
                // Quiesced only once the space is admitted and known to be there: a freeze
                // must not be spent on a copy that cannot fit, and a full pool makes the
                // freeze itself fail (the volume's dirty data cannot be written back).
                self.build_image(&self.image_path(&id.hex), &id.hex, size, params.allocation, |dst| {
                    self.ensure_room_for_copy(&src.image, same_pool)?;
                    let method = if same_pool {
                        copy_quiesced(quiesce, src.volume.as_ref(), &from, dst, "copy the source")?.as_str()
                    } else {
                        transfer_quiesced(quiesce, src.volume.as_ref(), &from, dst)?.as_str()
                    };
                    tracing::info!(volume_id = %record.id, method, "volume content copied from its source");
                    Ok(())
                })?
            }
        }
        if let Err(e) = atomic::write_file(&self.record_path(&id.hex), &to_json(&record)) {
            // Without a record the image is an orphan: remove it now rather than at next start.
            let _ = atomic::remove_file(&self.image_path(&id.hex));
            return Err(PoolError::io("write volume record", e));
        }
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.hex.clone(), record.clone());
        self.changed();
        tracing::info!(volume_id = %record.id, volume_name = %record.name, size = size,
            allocation = record.allocation.as_str(), "volume created");
        Ok(record)
    }

    /// Find a content source in this pool.
    pub(super) fn resolve_source(&self, source: &ContentSource) -> Result<Source, PoolError> {
        match source {
            ContentSource::Snapshot(sid) => {
                let snap = self.get_snapshot(sid)?;
                let hex = VolumeId::parse(Kind::Snapshot, sid)
                    .map(|v| v.hex)
                    .unwrap_or_default();
                Ok(Source {
                    image: self.snapshot_image_path(&hex),
                    size_bytes: snap.size_bytes,
                    fs_type: snap.fs_type,
                    lock_key: Some(snapshot_lock_key(&hex)),
                    volume: None,
                })
            }
            ContentSource::Volume(vid) => {
                let vol = self.get(vid)?;
                let hex = VolumeId::parse(Kind::Volume, vid)
                    .map(|v| v.hex)
                    .unwrap_or_default();
                Ok(Source {
                    image: self.image_path(&hex),
                    size_bytes: vol.size_bytes,
                    fs_type: vol.fs_type,
                    lock_key: Some(hex),
                    volume: Some(vol),
                })
            }
        }
    }

    /// Build `dest` of `size` bytes via `tmp/`, with `fill` writing initial content into the
    /// temp file. Admission against capacity happens under one lock; the (possibly long) fill
    /// runs outside it so other creates are not held up by a big copy.
    pub(crate) fn build_image(
        &self,
        dest: &Path,
        hex: &str,
        size: u64,
        allocation: Allocation,
        fill: impl FnOnce(&File) -> Result<(), PoolError>,
    ) -> Result<(), PoolError> {
        let tmp = self.dir.join("tmp").join(format!("{hex}.img"));
        let result = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .ctx(|| format!("create {}", tmp.display()))?;
            {
                let _alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
                let cap = self.capacity()?;
                let room = cap.for_allocation(allocation);
                if size > room {
                    return Err(PoolError::ResourceExhausted(format!(
                        "pool on node {} can provide {room} more bytes of {} storage; \
                         {size} were requested",
                        self.node_id,
                        allocation.as_str()
                    )));
                }
                self.adjust_reserved(allocation, size);
            }
            fill(&file)?;
            if file
                .metadata()
                .ctx(|| format!("stat {}", tmp.display()))?
                .len()
                < size
            {
                file.set_len(size)
                    .ctx(|| format!("size {}", tmp.display()))?;
            }
            if allocation == Allocation::Thick {
                fallocate_all(&file, size)?;
            }
            file.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
            fs::rename(&tmp, dest).ctx(|| format!("move image into {}", dest.display()))?;
            let dir = dest.parent().unwrap_or(&self.dir);
            atomic::sync_dir(dir).ctx(|| format!("fsync {}", dir.display()))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
            self.invalidate_reserved();
        }
        result
    }

    /// Delete a volume. `Ok(false)` when it did not exist (DeleteVolume is idempotent).
    pub fn delete_volume(&self, id: &str) -> Result<bool, PoolError> {
        self.require_writer()?;
        let Some(vid) = self.parse_volume_id(id)? else {
            return Ok(false);
        };
        let _guard = self.lock_volume(&vid.hex);
        let Some(record) = self.get_hex(&vid.hex) else {
            // A volume still being filled by a transfer: cancel it, leave nothing behind.
            return self.cancel_transfer(&vid.hex);
        };
        let image = self.image_path(&vid.hex);
        if let Some(user) = self.in_use.user_of(&image) {
            return Err(PoolError::FailedPrecondition(format!(
                "volume {id} is still attached to {user} on node {}; unstage it before deleting",
                self.node_id
            )));
        }
        // What this volume still had reserved, taken off the cached total below instead of
        // forcing the next create to stat every thin image under the allocation lock.
        let released = match record.allocation {
            Allocation::Thin => record
                .size_bytes
                .saturating_sub(self.allocated_bytes(&vid.hex).unwrap_or(0)),
            Allocation::Thick => 0,
        };
        atomic::remove_file(&self.record_path(&vid.hex))
            .ctx(|| format!("remove record of {id}"))?;
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vid.hex);
        self.changed();
        atomic::remove_file(&image).ctx(|| format!("remove image of {id}"))?;
        if let Some((_, v)) = self
            .reserved_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            *v = v.saturating_sub(released);
        }
        tracing::info!(volume_id = %record.id, volume_name = %record.name, "volume deleted");
        Ok(true)
    }

    /// Grow a volume's backing file to at least `required` bytes (whole MiB, at most `limit`).
    /// Growing to the current size again is a no-op (retries are safe); shrinking is refused.
    pub fn expand_volume(
        &self,
        id: &str,
        required: i64,
        limit: i64,
    ) -> Result<VolumeRecord, PoolError> {
        self.require_writer()?;
        let vid = self.parse_volume_id(id)?.ok_or_else(|| {
            PoolError::NotFound(format!(
                "volume {id} does not exist on node {}",
                self.node_id
            ))
        })?;
        let _guard = self.lock_volume(&vid.hex);
        let mut record = self.get_hex(&vid.hex).ok_or_else(|| {
            PoolError::NotFound(format!(
                "volume {id} does not exist on node {}",
                self.node_id
            ))
        })?;
        if required <= 0 {
            return Err(PoolError::InvalidArgument(
                "capacity_range.required_bytes must be positive for an expansion".into(),
            ));
        }
        let new = size::choose(required, limit, 0)?;
        let old = record.size_bytes;
        if new < old {
            return Err(PoolError::OutOfRange(format!(
                "volume {id} is {old} bytes; shrinking to {new} is not supported"
            )));
        }
        if new == old {
            // A retry of an expansion that already happened.
            return Ok(record);
        }
        let image = self.image_path(&vid.hex);
        {
            let _alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            let room = self.capacity()?.for_allocation(record.allocation);
            if new - old > room {
                return Err(PoolError::ResourceExhausted(format!(
                    "growing {id} by {} bytes needs more than the {room} bytes the pool can provide",
                    new - old
                )));
            }
            let file = OpenOptions::new()
                .write(true)
                .open(&image)
                .ctx(|| format!("open {}", image.display()))?;
            let grown = match record.allocation {
                Allocation::Thin => file
                    .set_len(new)
                    .ctx(|| format!("grow {}", image.display())),
                Allocation::Thick => fallocate_all(&file, new),
            };
            if let Err(e) =
                grown.and_then(|()| file.sync_all().ctx(|| format!("fsync {}", image.display())))
            {
                // Give back whatever a failed fallocate grabbed.
                let _ = file.set_len(old);
                return Err(e);
            }
            self.invalidate_reserved();
        }
        record.size_bytes = new;
        atomic::write_file(&self.record_path(&vid.hex), &to_json(&record))
            .ctx(|| format!("write record of {id}"))?;
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vid.hex.clone(), record.clone());
        self.changed();
        tracing::info!(volume_id = %id, old, new, "volume expanded");
        Ok(record)
    }

    /// Apply `change` to a volume's IO limits and write its record atomically. Keys the change
    /// does not name keep their value, and an empty change is a no-op (retries are safe).
    pub fn modify_volume(
        &self,
        id: &str,
        change: &IoLimitsChange,
    ) -> Result<VolumeRecord, PoolError> {
        self.require_writer()?;
        let not_found = || {
            PoolError::NotFound(format!(
                "volume {id} does not exist on node {}",
                self.node_id
            ))
        };
        let vid = self.parse_volume_id(id)?.ok_or_else(not_found)?;
        let _guard = self.lock_volume(&vid.hex);
        let mut record = self.get_hex(&vid.hex).ok_or_else(not_found)?;
        let limits = record.io_limits.with(change);
        if limits == record.io_limits {
            return Ok(record);
        }
        record.io_limits = limits;
        atomic::write_file(&self.record_path(&vid.hex), &to_json(&record))
            .ctx(|| format!("write record of {id}"))?;
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vid.hex.clone(), record.clone());
        self.changed();
        tracing::info!(volume_id = %id, limits = %limits.describe(), "volume IO limits changed");
        Ok(record)
    }
}

/// The size and filesystem of a copy of a source of `src_size` bytes holding `src_fs`: the
/// source's filesystem (one named otherwise is refused), at least the source's size, and with
/// no size named, as big as the source (not the 1 GiB default). Shared by local copies and
/// transfers from other nodes.
pub(crate) fn plan_copy(
    req: &CreateRequest,
    src_size: u64,
    src_fs: crate::params::FsType,
) -> Result<(u64, crate::params::FsType), PoolError> {
    let params = &req.params;
    if params.fs_explicit && req.needs_filesystem && params.fs_type != src_fs {
        return Err(PoolError::InvalidArgument(format!(
            "the source holds {src_fs}, not the requested {}",
            params.fs_type
        )));
    }
    if req.required_bytes > 0 && (req.required_bytes as u64) < src_size {
        return Err(PoolError::OutOfRange(format!(
            "required_bytes {} is smaller than the source ({src_size} bytes)",
            req.required_bytes
        )));
    }
    let mut minimum = src_size;
    if req.needs_filesystem {
        minimum = minimum.max(src_fs.min_size());
    }
    let required = match req.required_bytes {
        0 => src_size as i64,
        r => r,
    };
    Ok((size::choose(required, req.limit_bytes, minimum)?, src_fs))
}

/// What a new volume is copied from.
pub(super) struct Source {
    image: PathBuf,
    size_bytes: u64,
    fs_type: crate::params::FsType,
    lock_key: Option<String>,
    /// Set when the source is a live volume (it may need quiescing).
    volume: Option<VolumeRecord>,
}

pub(crate) fn check_compatible(
    existing: &VolumeRecord,
    req: &CreateRequest,
) -> Result<VolumeRecord, PoolError> {
    let conflict = |what: String| {
        Err(PoolError::AlreadyExists(format!(
            "volume {:?} already exists as {} with {what}",
            req.name, existing.id
        )))
    };
    let size = existing.size_bytes;
    if (req.required_bytes > 0 && size < req.required_bytes as u64)
        || (req.limit_bytes > 0 && size > req.limit_bytes as u64)
    {
        // A limit of 0 means none (CSI), which "[5368709120, 0]" hid.
        let limit = match req.limit_bytes {
            0 => "no upper limit".to_string(),
            l => format!("at most {l}"),
        };
        return conflict(format!(
            "size {size} bytes, outside the requested range (at least {} bytes, {limit})",
            req.required_bytes
        ));
    }
    if existing.allocation != req.params.allocation {
        return conflict(format!("allocation {}", existing.allocation.as_str()));
    }
    // A restored or cloned volume takes its source's filesystem unless one was named.
    let fs_matters = req.params.fs_explicit || req.source.is_none();
    if req.needs_filesystem && fs_matters && existing.fs_type != req.params.fs_type {
        return conflict(format!("filesystem {}", existing.fs_type));
    }
    if existing.source != req.source {
        return conflict(match &existing.source {
            Some(s) => format!("content source {s}"),
            None => "no content source (a blank volume)".to_string(),
        });
    }
    if existing.io_limits != req.params.io_limits {
        return conflict(format!("IO limits {}", existing.io_limits.describe()));
    }
    Ok(existing.clone())
}

/// Allocate `size` bytes of `file`. One fallocate call, which for a big thick volume can take
/// a while on some filesystems, so it is logged before and after with its duration.
pub(crate) fn fallocate_all(file: &File, size: u64) -> Result<(), PoolError> {
    use nix::errno::Errno;
    use nix::fcntl::{fallocate, FallocateFlags};
    let started = Instant::now();
    tracing::info!(bytes = size, "allocating a thick volume");
    match fallocate(file.as_fd(), FallocateFlags::empty(), 0, size as i64) {
        Ok(()) => {
            tracing::info!(
                bytes = size,
                ms = started.elapsed().as_millis() as u64,
                "thick volume allocated"
            );
            Ok(())
        }
        Err(Errno::ENOSPC) | Err(Errno::EDQUOT) => Err(PoolError::ResourceExhausted(format!(
            "not enough free space in the pool to allocate {size} bytes"
        ))),
        Err(Errno::EOPNOTSUPP) => Err(PoolError::FailedPrecondition(
            "the pool filesystem does not support fallocate; thick volumes are unavailable".into(),
        )),
        Err(e) => Err(PoolError::io("fallocate", e.into())),
    }
}
