//! A pool directory and the volumes in it.
//!
//! Layout (all names derive from the 20-hex part of an ID, never from request text):
//! ```text
//! <pool>/.lock              flock'd by the one process managing volumes (controller, CLI)
//! <pool>/.node.lock         flock'd by the one node plugin staging this pool's volumes
//! <pool>/.node-id           the node ID the pool belongs to (identity.rs); openers of another refused
//! <pool>/.node-id.rekey     journal of an unfinished `loopvol pool set-node-id` (rekey.rs)
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

mod filling;
pub mod group_snapshot;
pub mod identity;
#[cfg(test)]
mod identity_tests;
mod quiesce;
pub mod rekey;
mod repair;
mod space;
#[cfg(test)]
mod tests;
mod transfer_source;
#[cfg(test)]
mod transfer_tests;
pub mod transfers;
mod volumes;

pub(crate) use crate::error::space_error;
use quiesce::no_quiesce;
pub(crate) use quiesce::{copy_quiesced, snapshot_lock_key, transfer_quiesced};
pub use quiesce::{Quiesce, Quiesced};
use repair::{clear_tmp, load_dir};
pub use transfer_source::SourceImage;
pub(crate) use volumes::{check_compatible, fallocate_all, plan_copy};

/// How long a computed reservation total may be reused. Creates adjust it in place, so the
/// cache only hides data written into thin volumes during that window.
const RESERVED_TTL: Duration = Duration::from_secs(2);

/// Free bytes below which the pool is full for practical purposes (health, doctor and copies
/// agree on this figure).
pub const FULL_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub dir: PathBuf,
    /// The pool's name ([`ids::DEFAULT_POOL`] for `--pool-dir`); it is part of the IDs of the
    /// pool's objects unless it is the default.
    pub name: String,
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
            name: ids::DEFAULT_POOL.to_string(),
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
    name: String,
    node_id: String,
    overcommit_ratio: f64,
    volumes: RwLock<BTreeMap<String, VolumeRecord>>,
    pub(crate) snapshots: RwLock<BTreeMap<String, SnapshotRecord>>,
    pub(crate) locks: KeyedLocks,
    /// Serialises "check capacity, then allocate" so two creates cannot both take the last bytes.
    pub(crate) alloc: Mutex<()>,
    reserved_cache: Mutex<Option<(Instant, u64)>>,
    /// Whether the pool's filesystem can reflink, once probed.
    reflink: std::sync::OnceLock<bool>,
    /// `--max-pool-bytes`: the most all volumes together may be provisioned.
    max_bytes: Option<u64>,
    pub(crate) writer: bool,
    in_use: crate::InUse,
    /// Bumped by every change to the records (create, delete, expand, modify, snapshot):
    /// whoever reports on the pool (the LoopPool publisher) polls it, an atomic load, instead
    /// of being called from the request path.
    changes: std::sync::atomic::AtomicU64,
    /// Transfers filling volumes of this pool from another node (transfer/sink.rs).
    pub(crate) transfers: Mutex<transfers::Table>,
    _locks: Vec<Flock<File>>,
}

impl Pool {
    /// Open (creating if needed) the pool at `opts.dir`, take its lock, check that it belongs to
    /// `opts.node_id` (identity.rs), repair what a crash left behind and load the volume records. Returns the repairs made, for the caller to log.
    pub fn open(opts: PoolOptions) -> Result<(Self, Vec<String>), PoolError> {
        ids::validate_node_id(&opts.node_id)?;
        ids::validate_pool_name(&opts.name)?;
        ids::check_fits(&opts.name, &opts.node_id)?;
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
        // Under the lock (a re-key holds both) and before any repair: a refused opener changes
        // nothing.
        identity::check_owner(&dir, &opts.node_id)?;
        let mut repairs = Vec::new();
        let (volumes, snapshots, transfers) = if opts.writer {
            clear_tmp(&dir, &mut repairs)?;
            let v: BTreeMap<String, VolumeRecord> =
                load_dir(&dir.join("volumes"), &opts.in_use, &mut repairs)?;
            let s: BTreeMap<String, SnapshotRecord> =
                load_dir(&dir.join("snapshots"), &opts.in_use, &mut repairs)?;
            let t = transfers::load(&dir, &v, &mut repairs)?;
            (v, s, t)
        } else {
            (BTreeMap::new(), BTreeMap::new(), Default::default())
        };
        let pool = Pool {
            dir,
            name: opts.name,
            node_id: opts.node_id,
            overcommit_ratio: opts.overcommit_ratio,
            volumes: RwLock::new(volumes),
            snapshots: RwLock::new(snapshots),
            locks: KeyedLocks::new(),
            alloc: Mutex::new(()),
            reserved_cache: Mutex::new(None),
            reflink: std::sync::OnceLock::new(),
            max_bytes: None,
            writer: opts.writer,
            in_use: opts.in_use,
            changes: std::sync::atomic::AtomicU64::new(0),
            transfers: Mutex::new(transfers),
            _locks: locks,
        };
        if pool.writer {
            crate::group_snapshot::recover(&pool, &mut repairs)?;
        }
        Ok((pool, repairs))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many times the pool's records changed since it was opened (see `changes`).
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Count a change to the records; called after the in-memory map is updated.
    pub(crate) fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The pool's name (see [`PoolOptions::name`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The ID `name` gets in this pool.
    pub(crate) fn mint(&self, kind: Kind, name: &str) -> VolumeId {
        VolumeId::from_name_in(kind, name, &self.name, &self.node_id)
    }

    /// Whether `id` designates an object of this pool (right node, right pool).
    pub fn owns(&self, id: &VolumeId) -> bool {
        id.node == self.node_id && id.pool_name() == self.name
    }

    /// Whether this pool holds a volume record for `hex` (one lookup; used to find a name in
    /// any pool of the node).
    pub fn has_volume(&self, hex: &str) -> bool {
        self.get_hex(hex).is_some()
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
        Ok(VolumeId::parse(Kind::Volume, id).filter(|v| self.owns(v)))
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

    /// Make a committed record visible (a transfer's commit).
    pub(crate) fn insert_volume(&self, hex: &str, record: VolumeRecord) {
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hex.to_string(), record);
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
    ids::is_hex_id(stem)
}
