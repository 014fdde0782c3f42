//! A pool directory and the volumes in it.
//!
//! Layout (all names derive from the 20-hex part of an ID, never from request text):
//! ```text
//! <pool>/.lock              flock'd by the one process managing volumes (controller, CLI)
//! <pool>/.node.lock         flock'd by the one node plugin staging this pool's volumes
//! <pool>/volumes/<hex>.json volume record (exists ⇔ the volume exists)
//! <pool>/volumes/<hex>.img  backing file
//! <pool>/tmp/               images being built; anything here after a crash is garbage
//! <pool>/node/              node-side state owned by the driver (staging records)
//! ```
//! Crash rules: an image is built in `tmp/`, synced, renamed into `volumes/`, and only then is
//! the record written (atomically). Deletion removes the record first. So after a crash an image
//! without a record is an unacknowledged create or a half-done delete and is removed at start.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

use crate::atomic;
use crate::capacity::Capacity;
use crate::copy;
use crate::error::IoContext;
use crate::ids::{self, Kind, VolumeId};
use crate::io_limits::IoLimitsChange;
use crate::keyed_lock::{KeyGuard, KeyedLocks};
use crate::params::{Allocation, VolumeParams};
use crate::record::{ContentSource, SnapshotRecord, VolumeRecord, RECORD_FORMAT};
use crate::size;
use crate::PoolError;

/// How long a computed reservation total may be reused. Creates adjust it in place, so the
/// cache only hides data written into thin volumes during that window.
const RESERVED_TTL: Duration = Duration::from_secs(2);

/// Free bytes below which the pool is full for practical purposes (health, doctor and copies
/// agree on this figure).
pub const FULL_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub dir: PathBuf,
    pub node_id: String,
    pub overcommit_ratio: f64,
    /// Manage volumes (create, delete, expand, repair at start). One process at a time.
    pub writer: bool,
    /// Stage this pool's volumes on the node. One process at a time. A node-only process
    /// reads records from disk on every lookup, so it sees what a separate controller
    /// process creates (a controller Deployment and a node DaemonSet can share a node).
    pub node: bool,
    /// Whether the node uses an image (the driver's block data path answers): a used image is
    /// never deleted.
    pub in_use: crate::InUse,
}

impl PoolOptions {
    /// The common case: one process that does everything.
    pub fn all(dir: impl Into<PathBuf>, node_id: impl Into<String>) -> Self {
        PoolOptions {
            dir: dir.into(),
            node_id: node_id.into(),
            overcommit_ratio: 1.0,
            writer: true,
            node: true,
            in_use: crate::InUse::nothing(),
        }
    }
}

/// A validated CreateVolume, in pool terms.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub required_bytes: i64,
    pub limit_bytes: i64,
    pub params: VolumeParams,
    /// True when some capability asks for a filesystem, so the fs minimum size applies.
    pub needs_filesystem: bool,
    pub source: Option<ContentSource>,
}

pub struct Pool {
    pub(crate) dir: PathBuf,
    node_id: String,
    overcommit_ratio: f64,
    volumes: RwLock<BTreeMap<String, VolumeRecord>>,
    pub(crate) snapshots: RwLock<BTreeMap<String, SnapshotRecord>>,
    pub(crate) locks: KeyedLocks,
    /// Serialises "check capacity, then allocate" so two creates cannot both take the last bytes.
    alloc: Mutex<()>,
    reserved_cache: Mutex<Option<(Instant, u64)>>,
    /// Whether the pool's filesystem can reflink, once probed.
    reflink: std::sync::OnceLock<bool>,
    pub(crate) writer: bool,
    in_use: crate::InUse,
    _locks: Vec<Flock<File>>,
}

impl Pool {
    /// Open (creating if needed) the pool at `opts.dir`, take its lock, repair what a crash left
    /// behind and load the volume records. Returns the repairs made, for the caller to log.
    pub fn open(opts: PoolOptions) -> Result<(Self, Vec<String>), PoolError> {
        ids::validate_node_id(&opts.node_id)?;
        if !(opts.overcommit_ratio.is_finite() && opts.overcommit_ratio >= 1.0) {
            return Err(PoolError::InvalidArgument(format!(
                "overcommit ratio must be a number ≥ 1.0, got {}",
                opts.overcommit_ratio
            )));
        }
        let dir = opts.dir.clone();
        for sub in ["", "volumes", "snapshots", "tmp", "node"] {
            let d = dir.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .ctx(|| format!("create pool directory {}", d.display()))?;
        }
        let mut locks = Vec::new();
        for (wanted, name) in [(opts.writer, ".lock"), (opts.node, ".node.lock")] {
            if wanted {
                locks.push(take_lock(&dir, name)?);
            }
        }
        let mut repairs = Vec::new();
        let (volumes, snapshots) = if opts.writer {
            clear_tmp(&dir, &mut repairs)?;
            let v: BTreeMap<String, VolumeRecord> =
                load_dir(&dir.join("volumes"), &opts.in_use, &mut repairs)?;
            let s: BTreeMap<String, SnapshotRecord> =
                load_dir(&dir.join("snapshots"), &opts.in_use, &mut repairs)?;
            (v, s)
        } else {
            (BTreeMap::new(), BTreeMap::new())
        };
        let pool = Pool {
            dir,
            node_id: opts.node_id,
            overcommit_ratio: opts.overcommit_ratio,
            volumes: RwLock::new(volumes),
            snapshots: RwLock::new(snapshots),
            locks: KeyedLocks::new(),
            alloc: Mutex::new(()),
            reserved_cache: Mutex::new(None),
            reflink: std::sync::OnceLock::new(),
            writer: opts.writer,
            in_use: opts.in_use,
            _locks: locks,
        };
        Ok((pool, repairs))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn overcommit_ratio(&self) -> f64 {
        self.overcommit_ratio
    }

    /// Whether this handle manages the records (controller, all): only then are the volume and
    /// snapshot maps in memory; a node-only handle reads records from disk on demand.
    pub fn is_writer(&self) -> bool {
        self.writer
    }

    /// Where node-side state lives; owned by the driver, kept inside the pool so it shares the
    /// pool's lifetime and lock.
    pub fn node_state_dir(&self) -> PathBuf {
        self.dir.join("node")
    }

    pub fn image_path(&self, hex: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{hex}.img"))
    }

    pub(crate) fn record_path(&self, hex: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{hex}.json"))
    }

    /// Check an ID from a request: unsafe text is INVALID_ARGUMENT; an ID we did not issue, or
    /// issued for another node, is `None` (the caller answers NOT_FOUND, or OK for deletes).
    pub fn parse_volume_id(&self, id: &str) -> Result<Option<VolumeId>, PoolError> {
        ids::validate_id("volume_id", id)?;
        Ok(VolumeId::parse(Kind::Volume, id).filter(|v| v.node == self.node_id))
    }

    /// Serialise operations on one volume. Keyed by the hex part, shared by name and ID paths.
    pub fn lock_volume(&self, hex: &str) -> KeyGuard {
        self.locks.lock(hex)
    }

    pub fn try_lock_volume(&self, hex: &str) -> Option<KeyGuard> {
        self.locks.try_lock(hex)
    }

    /// The record for an ID, or NOT_FOUND.
    pub fn get(&self, id: &str) -> Result<VolumeRecord, PoolError> {
        self.parse_volume_id(id)?
            .and_then(|v| self.get_hex(&v.hex))
            .ok_or_else(|| {
                PoolError::NotFound(format!(
                    "volume {id} does not exist on node {}",
                    self.node_id
                ))
            })
    }

    pub(crate) fn get_hex(&self, hex: &str) -> Option<VolumeRecord> {
        if !self.writer {
            // Another process manages the records: read the current one from disk.
            let bytes = fs::read(self.record_path(hex)).ok()?;
            return serde_json::from_slice(&bytes).ok();
        }
        self.volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(hex)
            .cloned()
    }

    pub(crate) fn require_writer(&self) -> Result<(), PoolError> {
        if self.writer {
            return Ok(());
        }
        Err(PoolError::FailedPrecondition(
            "this process only stages volumes; volumes are managed by the controller".into(),
        ))
    }

    /// Every volume that has IO limits, with them (for the metrics' per-volume gauges).
    pub fn io_limited(&self) -> Vec<(String, crate::IoLimits)> {
        self.volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|r| !r.io_limits.is_empty())
            .map(|r| (r.id.clone(), r.io_limits))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.volumes.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One page of volumes in ID order, starting after the volume whose hex is `after`. The token
    /// stays valid when that volume is deleted meanwhile, because it is a position, not a handle.
    pub fn list_page(
        &self,
        after: Option<&str>,
        max: usize,
    ) -> (Vec<VolumeRecord>, Option<String>) {
        use std::ops::Bound;
        let vols = self.volumes.read().unwrap_or_else(|e| e.into_inner());
        let start = match after {
            Some(a) => Bound::Excluded(a.to_string()),
            None => Bound::Unbounded,
        };
        let max = if max == 0 { usize::MAX } else { max };
        let mut iter = vols.range((start, Bound::Unbounded));
        let page: Vec<VolumeRecord> = iter.by_ref().take(max).map(|(_, r)| r.clone()).collect();
        let next = if iter.next().is_some() {
            page.last().map(|r| {
                VolumeId::parse(Kind::Volume, &r.id)
                    .map(|v| v.hex)
                    .unwrap_or_default()
            })
        } else {
            None
        };
        (page, next)
    }

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
        self.require_writer()?;
        ids::validate_name(&req.name)?;
        let id = VolumeId::from_name(Kind::Volume, &req.name, &self.node_id);
        let _guard = self.lock_volume(&id.hex);
        if let Some(existing) = self.get_hex(&id.hex) {
            return check_compatible(&existing, req);
        }
        let source = req
            .source
            .as_ref()
            .map(|s| self.resolve_source(s))
            .transpose()?;
        let mut params = req.params;
        let mut minimum = if req.needs_filesystem {
            params.fs_type.min_size()
        } else {
            0
        };
        if let Some(src) = &source {
            if params.fs_explicit && req.needs_filesystem && params.fs_type != src.fs_type {
                return Err(PoolError::InvalidArgument(format!(
                    "the source holds {}, not the requested {}",
                    src.fs_type, params.fs_type
                )));
            }
            params.fs_type = src.fs_type;
            if req.required_bytes > 0 && (req.required_bytes as u64) < src.size_bytes {
                return Err(PoolError::OutOfRange(format!(
                    "required_bytes {} is smaller than the source ({} bytes)",
                    req.required_bytes, src.size_bytes
                )));
            }
            minimum = minimum.max(src.size_bytes);
        }
        // With no size named, a copy is as big as its source (not the 1 GiB default).
        let required = match (&source, req.required_bytes) {
            (Some(src), 0) => src.size_bytes as i64,
            (_, r) => r,
        };
        let size = size::choose(required, req.limit_bytes, minimum)?;
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
                let _src_guard = src.lock_key.as_ref().map(|k| self.locks.lock(k));
                let from =
                    File::open(&src.image).ctx(|| format!("open {}", src.image.display()))?;
                // Quiesced only once the space is admitted and known to be there: a freeze
                // must not be spent on a copy that cannot fit, and a full pool makes the
                // freeze itself fail (the volume's dirty data cannot be written back).
                self.build_image(&self.image_path(&id.hex), &id.hex, size, params.allocation, |dst| {
                    self.ensure_room_for_copy(&src.image)?;
                    let method = copy_quiesced(quiesce, src.volume.as_ref(), &from, dst, "copy the source")?;
                    tracing::info!(volume_id = %record.id, method = method.as_str(), "volume content copied from its source");
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
        tracing::info!(volume_id = %record.id, volume_name = %record.name, size = size,
            allocation = record.allocation.as_str(), "volume created");
        Ok(record)
    }

    /// Find a content source in this pool.
    fn resolve_source(&self, source: &ContentSource) -> Result<Source, PoolError> {
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
            return Ok(false);
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
        tracing::info!(volume_id = %id, limits = %limits.describe(), "volume IO limits changed");
        Ok(record)
    }

    /// Current capacity of the pool.
    pub fn capacity(&self) -> Result<Capacity, PoolError> {
        let reserved = self.reserved_bytes();
        Capacity::measure(&self.dir, reserved, self.overcommit_ratio)
    }

    fn reserved_bytes(&self) -> u64 {
        let mut cache = self
            .reserved_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((at, v)) = *cache {
            if at.elapsed() < RESERVED_TTL {
                return v;
            }
        }
        let vols = self.volumes.read().unwrap_or_else(|e| e.into_inner());
        let total = vols
            .iter()
            .filter(|(_, r)| r.allocation == Allocation::Thin)
            .map(|(hex, r)| {
                let used = fs::metadata(self.image_path(hex))
                    .map(|m| m.blocks() * 512)
                    .unwrap_or(0);
                r.size_bytes.saturating_sub(used)
            })
            .sum();
        *cache = Some((Instant::now(), total));
        total
    }

    fn adjust_reserved(&self, allocation: Allocation, size: u64) {
        if allocation == Allocation::Thin {
            let mut cache = self
                .reserved_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((_, v)) = cache.as_mut() {
                *v += size;
            }
        }
    }

    fn invalidate_reserved(&self) {
        *self
            .reserved_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Refuse a copy of `image` that the pool's free space cannot hold, before anything is
    /// frozen. A sparse copy needs the image's allocated bytes; a reflink only metadata. Both
    /// keep [`FULL_BYTES`] free, below which the pool counts as full everywhere.
    pub fn ensure_room_for_copy(&self, image: &Path) -> Result<(), PoolError> {
        let available = Capacity::measure(&self.dir, 0, 1.0)?.available_bytes;
        let data = if self.reflinks() {
            0
        } else {
            fs::metadata(image).map(|m| m.blocks() * 512).unwrap_or(0)
        };
        let need = data + FULL_BYTES;
        if available < need {
            return Err(PoolError::ResourceExhausted(format!(
                "the pool on node {} has {available} bytes free; copying this volume needs \
                 {need}",
                self.node_id
            )));
        }
        Ok(())
    }

    /// Whether the pool's filesystem shares extents (FICLONE), probed once with two scratch
    /// files in `tmp/`.
    pub fn reflinks(&self) -> bool {
        *self.reflink.get_or_init(|| {
            let probe = || -> std::io::Result<bool> {
                let dir = self.dir.join("tmp");
                let name = |t: &str| dir.join(format!("reflink-probe-{}-{t}", std::process::id()));
                let (a, b) = (name("a"), name("b"));
                let result = (|| {
                    use std::io::Write;
                    let mut src = File::create(&a)?;
                    src.write_all(&[0x5a; 4096])?;
                    src.sync_all()?;
                    let dst = File::create(&b)?;
                    copy::reflink(&src, &dst)
                })();
                let _ = fs::remove_file(&a);
                let _ = fs::remove_file(&b);
                result
            };
            probe().unwrap_or(false)
        })
    }

    /// Bytes actually allocated to a volume's image (what it costs on disk).
    pub fn allocated_bytes(&self, hex: &str) -> Option<u64> {
        fs::metadata(self.image_path(hex))
            .ok()
            .map(|m| m.blocks() * 512)
    }
}

/// What a new volume is copied from.
struct Source {
    image: PathBuf,
    size_bytes: u64,
    fs_type: crate::params::FsType,
    lock_key: Option<String>,
    /// Set when the source is a live volume (it may need quiescing).
    volume: Option<VolumeRecord>,
}

/// A hook run right before a live volume is copied (the driver freezes its filesystem). Its
/// guard is released right after the copy; the copy counts only if the release succeeds.
pub type Quiesce<'a> = &'a dyn Fn(&VolumeRecord) -> Result<Box<dyn Quiesced>, PoolError>;

/// What a [`Quiesce`] hook holds while the copy runs. `release` reports whether the volume
/// really stayed still for the whole copy (a freeze lifted early by a watchdog or by hand makes
/// the copy a torn image, which must not become a snapshot or a clone). Dropping the guard
/// without releasing it still undoes the quiescing, for error paths and panics.
pub trait Quiesced {
    fn release(self: Box<Self>) -> Result<(), PoolError>;
}

impl Quiesced for () {
    fn release(self: Box<Self>) -> Result<(), PoolError> {
        Ok(())
    }
}

fn no_quiesce(_: &VolumeRecord) -> Result<Box<dyn Quiesced>, PoolError> {
    Ok(Box::new(()))
}

/// Copy `from` into `dst` with `what` quiesced by `quiesce`: the copy is only good if the
/// release says the source stayed still throughout.
pub(crate) fn copy_quiesced(
    quiesce: Quiesce<'_>,
    what: Option<&VolumeRecord>,
    from: &File,
    dst: &File,
    context: &str,
) -> Result<copy::CopyMethod, PoolError> {
    let guard = match what {
        Some(v) => Some(quiesce(v)?),
        None => None,
    };
    let copied = copy::copy(from, dst).map_err(|e| space_error(context, e));
    let released = guard.map_or(Ok(()), |g| g.release());
    let method = copied?;
    released?;
    Ok(method)
}

pub(crate) fn snapshot_lock_key(hex: &str) -> String {
    format!("snap-{hex}")
}

/// Running out of space while writing is the pool's RESOURCE_EXHAUSTED, not an I/O failure.
pub(crate) fn space_error(what: &str, e: std::io::Error) -> PoolError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            PoolError::ResourceExhausted(format!("not enough free space in the pool to {what}"))
        }
        _ => PoolError::io(what, e),
    }
}

fn take_lock(dir: &Path, name: &str) -> Result<Flock<File>, PoolError> {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .ctx(|| format!("open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| PoolError::PoolLocked(path))
}

fn check_compatible(
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
        return conflict(format!(
            "size {size}, outside the requested range [{}, {}]",
            req.required_bytes, req.limit_bytes
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
        return conflict(format!("content source {:?}", existing.source));
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

pub(crate) fn to_json(r: &impl serde::Serialize) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(r).expect("records always serialise");
    v.push(b'\n');
    v
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn is_hex_name(stem: &str) -> bool {
    stem.len() == 20 && stem.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn clear_tmp(dir: &Path, repairs: &mut Vec<String>) -> Result<(), PoolError> {
    let tmp = dir.join("tmp");
    for e in fs::read_dir(&tmp)
        .ctx(|| format!("read {}", tmp.display()))?
        .flatten()
    {
        let p = e.path();
        if fs::remove_file(&p).is_ok() {
            repairs.push(format!("removed unfinished image {}", p.display()));
        }
    }
    Ok(())
}

/// Read every record of a directory (volumes or snapshots) and bring it back to the invariant
/// "record ⇔ object, image ⇔ record", describing each repair in `repairs`.
fn load_dir<T: serde::de::DeserializeOwned>(
    dir: &Path,
    in_use: &crate::InUse,
    repairs: &mut Vec<String>,
) -> Result<BTreeMap<String, T>, PoolError> {
    let mut records = BTreeMap::new();
    let mut images = Vec::new();
    let mut digests = Vec::new();
    for e in fs::read_dir(dir)
        .ctx(|| format!("read {}", dir.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if atomic::is_temp_name(&name) {
            let _ = fs::remove_file(&path);
            repairs.push(format!(
                "removed interrupted record write {}",
                path.display()
            ));
        } else if let Some(stem) = name.strip_suffix(".json").filter(|s| is_hex_name(s)) {
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => {
                    records.insert(stem.to_string(), r);
                }
                Err(err) => {
                    // Atomic writes make this impossible short of disk corruption or a hand
                    // edit; keep the bytes for a human instead of deleting data.
                    let q = dir.join(format!("{name}.corrupt"));
                    fs::rename(&path, &q).ctx(|| format!("quarantine {}", path.display()))?;
                    repairs.push(format!(
                        "unreadable record {} moved to {} ({err})",
                        path.display(),
                        q.display()
                    ));
                }
            }
        } else if let Some(stem) = name.strip_suffix(".img").filter(|s| is_hex_name(s)) {
            images.push(stem.to_string());
        } else if let Some(stem) = name.strip_suffix(".chunks").filter(|s| is_hex_name(s)) {
            digests.push(stem.to_string());
        }
    }
    // Chunk digests (snapshot_metadata.rs) are written before their snapshot's record.
    for hex in digests.iter().filter(|h| !records.contains_key(*h)) {
        let p = dir.join(format!("{hex}.chunks"));
        fs::remove_file(&p).ctx(|| format!("remove orphan {}", p.display()))?;
        repairs.push(format!(
            "removed orphan chunk digests {} (no record: interrupted snapshot or delete)",
            p.display()
        ));
    }
    for hex in images {
        if !records.contains_key(&hex) {
            let p = dir.join(format!("{hex}.img"));
            if in_use.user_of(&p).is_none() {
                fs::remove_file(&p).ctx(|| format!("remove orphan {}", p.display()))?;
                repairs.push(format!(
                    "removed orphan image {} (no record: unacknowledged create or interrupted delete)",
                    p.display()
                ));
            } else {
                repairs.push(format!(
                    "orphan image {} is attached to a loop device; left in place",
                    p.display()
                ));
            }
        }
    }
    for hex in records.keys() {
        if !dir.join(format!("{hex}.img")).exists() {
            repairs.push(format!(
                "record {hex} in {} has no backing file; it is reported unhealthy",
                dir.display()
            ));
        }
    }
    atomic::sync_dir(dir).ctx(|| format!("fsync {}", dir.display()))?;
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::FsType;
    use crate::size::{GIB, MIB};

    fn open(dir: &Path) -> Pool {
        let (pool, _) = Pool::open(PoolOptions::all(dir, "node-a")).unwrap();
        pool
    }

    fn req(name: &str, required: i64, allocation: Allocation) -> CreateRequest {
        CreateRequest {
            name: name.into(),
            required_bytes: required,
            limit_bytes: 0,
            params: VolumeParams {
                fs_type: FsType::Ext4,
                allocation,
                fs_explicit: false,
                ..Default::default()
            },
            needs_filesystem: true,
            source: None,
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn create_is_idempotent_and_checks_compatibility() {
        let t = tempfile::tempdir().unwrap();
        let pool = open(t.path());
        let a = pool
            .create_volume(&req("pvc-1", 10 * MIB as i64, Allocation::Thin))
            .unwrap();
        assert_eq!(a.size_bytes, 10 * MIB);
        assert!(a.id.ends_with("@node-a"));
        let again = pool
            .create_volume(&req("pvc-1", 10 * MIB as i64, Allocation::Thin))
            .unwrap();
        assert_eq!(a, again);
        assert!(matches!(
            pool.create_volume(&req("pvc-1", 20 * MIB as i64, Allocation::Thin)),
            Err(PoolError::AlreadyExists(_))
        ));
        assert!(matches!(
            pool.create_volume(&req("pvc-1", 10 * MIB as i64, Allocation::Thick)),
            Err(PoolError::AlreadyExists(_))
        ));
        let hex = VolumeId::parse(Kind::Volume, &a.id).unwrap().hex;
        assert_eq!(
            files(&t.path().join("volumes")),
            vec![format!("{hex}.img"), format!("{hex}.json")]
        );
        let img = fs::metadata(pool.image_path(&hex)).unwrap();
        assert_eq!(img.len(), 10 * MIB);
        assert_eq!(img.blocks(), 0, "thin volumes start sparse");
    }

    #[test]
    fn thick_volumes_are_allocated_and_refused_when_too_big() {
        let t = tempfile::tempdir().unwrap();
        let pool = open(t.path());
        let v = pool
            .create_volume(&req("thick", 16 * MIB as i64, Allocation::Thick))
            .unwrap();
        let hex = VolumeId::parse(Kind::Volume, &v.id).unwrap().hex;
        assert!(pool.allocated_bytes(&hex).unwrap() >= 16 * MIB);
        let avail = pool.capacity().unwrap().available_bytes;
        let huge = (avail + GIB).min(size::MAX_SIZE) as i64;
        let err = pool
            .create_volume(&req("huge", huge, Allocation::Thick))
            .unwrap_err();
        assert!(matches!(err, PoolError::ResourceExhausted(_)), "{err}");
        assert!(files(&t.path().join("tmp")).is_empty());
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn delete_is_idempotent_and_removes_files() {
        let t = tempfile::tempdir().unwrap();
        let pool = open(t.path());
        let v = pool.create_volume(&req("d", 0, Allocation::Thin)).unwrap();
        assert_eq!(v.size_bytes, GIB);
        assert!(pool.delete_volume(&v.id).unwrap());
        assert!(!pool.delete_volume(&v.id).unwrap());
        assert!(!pool.delete_volume("fake-vol-id").unwrap());
        assert!(matches!(
            pool.delete_volume("../x"),
            Err(PoolError::InvalidArgument(_))
        ));
        assert!(files(&t.path().join("volumes")).is_empty());
        assert!(matches!(pool.get(&v.id), Err(PoolError::NotFound(_))));
    }

    #[test]
    fn ids_of_other_nodes_are_not_ours() {
        let t = tempfile::tempdir().unwrap();
        let pool = open(t.path());
        let v = pool.create_volume(&req("x", 0, Allocation::Thin)).unwrap();
        let other = v.id.replace("@node-a", "@node-b");
        assert!(matches!(pool.get(&other), Err(PoolError::NotFound(_))));
    }

    #[test]
    fn pages_cover_every_volume_once() {
        let t = tempfile::tempdir().unwrap();
        let pool = open(t.path());
        for i in 0..7 {
            pool.create_volume(&req(&format!("v{i}"), MIB as i64, Allocation::Thin))
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut token = None;
        loop {
            let (page, next) = pool.list_page(token.as_deref(), 3);
            assert!(page.len() <= 3);
            seen.extend(page.into_iter().map(|r| r.id));
            match next {
                Some(n) => token = Some(n),
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 7);
        assert_eq!(seen.len(), 7);
        assert_eq!(pool.list_page(None, 0).0.len(), 7);
    }

    #[test]
    fn restart_keeps_volumes_and_repairs_crash_leftovers() {
        let t = tempfile::tempdir().unwrap();
        let id = {
            let pool = open(t.path());
            pool.create_volume(&req("keep", MIB as i64, Allocation::Thin))
                .unwrap()
                .id
        };
        // What a crash can leave: a half-built image, an image whose record was never written,
        // an interrupted record write.
        fs::write(t.path().join("tmp/0123456789abcdef0123.img"), b"x").unwrap();
        fs::write(t.path().join("volumes/aaaaaaaaaaaaaaaaaaaa.img"), b"x").unwrap();
        fs::write(
            t.path().join("volumes/.bbbbbbbbbbbbbbbbbbbb.json.tmp"),
            b"{",
        )
        .unwrap();
        // Chunk digests of a snapshot whose record was never written.
        fs::write(t.path().join("snapshots/cccccccccccccccccccc.chunks"), b"x").unwrap();
        let (pool, repairs) = Pool::open(PoolOptions::all(t.path(), "node-a")).unwrap();
        assert_eq!(repairs.len(), 4, "{repairs:?}");
        assert!(files(&t.path().join("snapshots")).is_empty());
        assert_eq!(pool.get(&id).unwrap().name, "keep");
        assert!(files(&t.path().join("tmp")).is_empty());
        assert_eq!(files(&t.path().join("volumes")).len(), 2);
    }

    #[test]
    fn one_process_per_pool() {
        let t = tempfile::tempdir().unwrap();
        let _pool = open(t.path());
        let second = Pool::open(PoolOptions::all(t.path(), "node-a"));
        assert!(matches!(second, Err(PoolError::PoolLocked(_))));
    }

    #[test]
    fn expansion_grows_and_refuses_to_shrink() {
        let t = tempfile::tempdir().unwrap();
        let pool = open(t.path());
        let v = pool
            .create_volume(&req("grow", 16 * MIB as i64, Allocation::Thin))
            .unwrap();
        let g = pool.expand_volume(&v.id, (32 * MIB) as i64 - 5, 0).unwrap();
        assert_eq!(g.size_bytes, 32 * MIB);
        assert_eq!(
            pool.expand_volume(&v.id, (32 * MIB) as i64 - 5, 0)
                .unwrap()
                .size_bytes,
            32 * MIB
        );
        let hex = VolumeId::parse(Kind::Volume, &v.id).unwrap().hex;
        assert_eq!(fs::metadata(pool.image_path(&hex)).unwrap().len(), 32 * MIB);
        assert!(matches!(
            pool.expand_volume(&v.id, (8 * MIB) as i64, 0),
            Err(PoolError::OutOfRange(_))
        ));
        assert!(matches!(
            pool.expand_volume("vol-0123456789abcdef0123@node-a", MIB as i64, 0),
            Err(PoolError::NotFound(_))
        ));
        // Survives a restart.
        drop(pool);
        let pool = open(t.path());
        assert_eq!(pool.get(&v.id).unwrap().size_bytes, 32 * MIB);
        let thick = pool
            .create_volume(&req("thick", 16 * MIB as i64, Allocation::Thick))
            .unwrap();
        pool.expand_volume(&thick.id, (24 * MIB) as i64, 0).unwrap();
        let hex = VolumeId::parse(Kind::Volume, &thick.id).unwrap().hex;
        assert!(pool.allocated_bytes(&hex).unwrap() >= 24 * MIB);
    }

    #[test]
    fn a_controller_and_a_node_process_share_a_pool() {
        let t = tempfile::tempdir().unwrap();
        let role = |writer, node| PoolOptions {
            writer,
            node,
            ..PoolOptions::all(t.path(), "node-a")
        };
        let (controller, _) = Pool::open(role(true, false)).unwrap();
        let (node, _) = Pool::open(role(false, true)).unwrap();
        assert!(matches!(
            Pool::open(role(false, true)),
            Err(PoolError::PoolLocked(_))
        ));
        assert!(matches!(
            Pool::open(role(true, false)),
            Err(PoolError::PoolLocked(_))
        ));
        // The node sees volumes created after it started, and cannot create any itself.
        let v = controller
            .create_volume(&req("later", MIB as i64, Allocation::Thin))
            .unwrap();
        assert_eq!(node.get(&v.id).unwrap(), v);
        assert!(matches!(
            node.create_volume(&req("n", MIB as i64, Allocation::Thin)),
            Err(PoolError::FailedPrecondition(_))
        ));
        controller.delete_volume(&v.id).unwrap();
        assert!(matches!(node.get(&v.id), Err(PoolError::NotFound(_))));
    }

    #[test]
    fn concurrent_creates_of_one_name_make_one_volume() {
        let t = tempfile::tempdir().unwrap();
        let pool = std::sync::Arc::new(open(t.path()));
        let ids: Vec<String> = (0..16)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    pool.create_volume(&req("same", MIB as i64, Allocation::Thin))
                        .unwrap()
                        .id
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(files(&t.path().join("volumes")).len(), 2);
    }

    #[test]
    fn thin_reservations_limit_what_can_be_promised() {
        let t = tempfile::tempdir().unwrap();
        let pool = open(t.path());
        let before = pool.capacity().unwrap();
        pool.create_volume(&req("r", 64 * MIB as i64, Allocation::Thin))
            .unwrap();
        let after = pool.capacity().unwrap();
        assert_eq!(after.reserved_bytes, before.reserved_bytes + 64 * MIB);
        let too_big = (after.headroom() + GIB).min(size::MAX_SIZE) as i64;
        assert!(matches!(
            pool.create_volume(&req("r2", too_big, Allocation::Thin)),
            Err(PoolError::ResourceExhausted(_)) | Err(PoolError::OutOfRange(_))
        ));
    }
}
