//! The sink side of a transfer between nodes: a background job of the target pool that turns
//! a stream of frames into a volume, and outlives any one CreateVolume call.
//!
//! Durable state: `<pool>/transfers/<hex>.json` (a [`TransferRecord`], written atomically) is
//! the job's only record; its image is built in `tmp/<hex>-<transfer id>.img`. While the record
//! exists its volume's whole size counts as reserved (less what the temp image already holds),
//! so capacity promised to a transfer is never promised twice. The job commits with the pool's
//! crash rule: image synced and renamed into `volumes/`, then the volume record, then the
//! transfer record removed. After a crash: a transfer record whose volume record exists is
//! removed (it committed); one without is *pending* and is resumed from scratch by the driver
//! at start (chunks are cheap to read again), or dropped if its source cannot be reached; the
//! start-up clear of `tmp/` removes every temp image.
//!
//! A job that fails removes its temp image and its record at once (nothing stays promised to
//! a dead transfer) and leaves its error for the next CreateVolume of that name to report; the
//! retry after that starts a new transfer. DeleteVolume of the name cancels the job.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::error::IoContext;
use crate::ids::Kind;
use crate::pool::{
    check_compatible, encryption_of, fallocate_all, plan_copy, to_json, unix_now, FULL_BYTES,
};
use crate::record::{VolumeRecord, RECORD_FORMAT};
use crate::transfer::{Frame, FrameSource, Header, RateLimit, TransferError, Writer};
use crate::{CreateRequest, Pool, PoolError};

pub use super::filling::{filling, Filling};

/// A transfer's durable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRecord {
    pub format: u32,
    pub transfer_id: String,
    /// The volume being filled, as its record will be once committed.
    pub volume: VolumeRecord,
    /// The source node's pool API (`https://host:port`), to resume from.
    pub endpoint: String,
    pub started_unix: u64,
    /// Bytes the source sends (its data ranges), for progress.
    #[serde(default)]
    pub data_bytes: u64,
}

/// A running job: its progress, and the flag DeleteVolume raises.
#[derive(Debug)]
pub struct Job {
    pub record: TransferRecord,
    /// Bytes the source will send (its data ranges).
    pub data_bytes: u64,
    received: AtomicU64,
    cancelled: AtomicBool,
}

impl Job {
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Percent of the data received (100 only when all of it is in).
    pub fn percent(&self) -> u64 {
        match self.data_bytes {
            0 => 100,
            d => (self.received() * 100 / d).min(100),
        }
    }
}

/// What a CreateVolume of a name finds.
#[derive(Debug)]
pub enum TransferState {
    /// The volume exists.
    Done(VolumeRecord),
    /// A job is filling it.
    Running(Arc<Job>),
    /// The last attempt failed: its error, reported once; the next call starts anew.
    Failed(PoolError),
    /// Nothing runs: start (or, for a pending record, resume) a transfer.
    Start,
}

/// The pool's transfers, under one lock.
#[derive(Debug, Default)]
pub struct Table {
    /// Records on disk, by hex.
    pending: BTreeMap<String, TransferRecord>,
    jobs: BTreeMap<String, Arc<Job>>,
    failed: BTreeMap<String, PoolError>,
}

pub(super) fn transfers_dir(pool_dir: &Path) -> PathBuf {
    pool_dir.join("transfers")
}

pub(super) fn temp_image(pool_dir: &Path, hex: &str, transfer_id: &str) -> PathBuf {
    pool_dir
        .join("tmp")
        .join(format!("{hex}-{transfer_id}.img"))
}

fn hex_of(r: &TransferRecord) -> String {
    crate::VolumeId::parse(Kind::Volume, &r.volume.id)
        .map(|v| v.hex)
        .unwrap_or_default()
}

/// Start-up: the records of unfinished transfers. A record whose volume exists committed
/// before the crash and is removed; the rest stay pending (their capacity reserved) until the
/// driver resumes or drops them.
pub(crate) fn load(
    pool_dir: &Path,
    volumes: &BTreeMap<String, VolumeRecord>,
    repairs: &mut Vec<String>,
) -> Result<Table, PoolError> {
    let dir = transfers_dir(pool_dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .ctx(|| format!("create {}", dir.display()))?;
    let mut table = Table::default();
    for e in fs::read_dir(&dir)
        .ctx(|| format!("read {}", dir.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let Some(hex) = name
            .strip_suffix(".json")
            .filter(|s| crate::ids::is_hex_id(s))
        else {
            if atomic::is_temp_name(&name) {
                let _ = fs::remove_file(&path);
            }
            continue;
        };
        let rec = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<TransferRecord>(&b).ok());
        match rec {
            Some(_) if volumes.contains_key(hex) => {
                atomic::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
                repairs.push(format!("removed the record of committed transfer {hex}"));
            }
            Some(r) => {
                repairs.push(format!(
                    "transfer of {} from {} is pending: it resumes from scratch",
                    r.volume.id, r.endpoint
                ));
                table.pending.insert(hex.to_string(), r);
            }
            None => {
                let q = dir.join(format!("{name}.corrupt"));
                fs::rename(&path, &q).ctx(|| format!("quarantine {}", path.display()))?;
                repairs.push(format!(
                    "unreadable transfer record moved to {}",
                    q.display()
                ));
            }
        }
    }
    Ok(table)
}

impl Pool {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.transfers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a CreateVolume of `req` (a content source on another node) finds here.
    pub fn transfer_state(&self, req: &CreateRequest) -> Result<TransferState, PoolError> {
        self.require_writer()?;
        crate::ids::validate_name(&req.name)?;
        let id = self.mint(Kind::Volume, &req.name);
        let _guard = self.lock_volume(&id.hex);
        if let Some(existing) = self.get_hex(&id.hex) {
            return check_compatible(&existing, req).map(TransferState::Done);
        }
        let mut t = self.table();
        if let Some(p) = t.pending.get(&id.hex) {
            check_compatible(&p.volume, req)?;
        }
        if let Some(job) = t.jobs.get(&id.hex) {
            return Ok(TransferState::Running(job.clone()));
        }
        if let Some(e) = t.failed.remove(&id.hex) {
            return Ok(TransferState::Failed(e));
        }
        Ok(TransferState::Start)
    }

    /// Admit a transfer whose stream has started with `header`: size the volume, check and
    /// reserve capacity, write the transfer record, and register the job. A pending record of
    /// the same name (a restart) is taken over. A job that started meanwhile is returned as is.
    /// `wanted` is asked under the volume's lock: false when a DeleteVolume came while the
    /// stream was being opened (the copy is then not admitted).
    pub fn begin_transfer(
        &self,
        req: &CreateRequest,
        header: &Header,
        endpoint: &str,
        transfer_id: &str,
        wanted: &dyn Fn() -> bool,
    ) -> Result<Arc<Job>, PoolError> {
        self.require_writer()?;
        let id = self.mint(Kind::Volume, &req.name);
        let _guard = self.lock_volume(&id.hex);
        if !wanted() {
            return Err(PoolError::Aborted(format!(
                "volume {id} was deleted while its copy was starting"
            )));
        }
        if self.get_hex(&id.hex).is_some() {
            return Err(PoolError::Aborted(format!(
                "volume {} was completed meanwhile; retry",
                id
            )));
        }
        if let Some(job) = self.table().jobs.get(&id.hex) {
            return Ok(job.clone());
        }
        let pending = self.table().pending.get(&id.hex).cloned();
        let record = match pending {
            Some(mut p) => {
                check_compatible(&p.volume, req)?;
                if header.image_bytes > p.volume.size_bytes {
                    return Err(PoolError::FailedPrecondition(format!(
                        "the source of pending transfer {} grew past the volume's {} bytes",
                        p.transfer_id, p.volume.size_bytes
                    )));
                }
                p.transfer_id = transfer_id.to_string();
                p.endpoint = endpoint.to_string();
                p.data_bytes = header.data_bytes;
                p
            }
            None => {
                let (size, fs_type) = plan_copy(req, header.size_bytes, header.fs_type)?;
                let encryption = encryption_of(req, Some(header.encryption.as_ref()))?;
                TransferRecord {
                    format: RECORD_FORMAT,
                    transfer_id: transfer_id.to_string(),
                    volume: VolumeRecord {
                        format: RECORD_FORMAT,
                        id: id.to_string(),
                        name: req.name.clone(),
                        size_bytes: size,
                        fs_type,
                        allocation: req.params.allocation,
                        created_unix: unix_now(),
                        source: req.source.clone(),
                        io_limits: req.params.io_limits,
                        block_only: !req.needs_filesystem,
                        encryption,
                    },
                    endpoint: endpoint.to_string(),
                    started_unix: unix_now(),
                    data_bytes: header.data_bytes,
                }
            }
        };
        self.admit_transfer(&id.hex, &record, header)?;
        let job = Arc::new(Job {
            record,
            data_bytes: header.data_bytes,
            received: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
        });
        self.table().jobs.insert(id.hex.clone(), job.clone());
        Ok(job)
    }

    /// Check capacity (logical and physical) and write the record, under the pool's
    /// allocation lock so two admissions cannot both take the last bytes.
    fn admit_transfer(
        &self,
        hex: &str,
        record: &TransferRecord,
        header: &Header,
    ) -> Result<(), PoolError> {
        let _alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        // A pending record of this name already counts; it is being taken over, not added.
        let already = self.table().pending.remove(hex);
        let result = (|| {
            self.invalidate_reserved();
            let cap = self.capacity()?;
            let size = record.volume.size_bytes;
            let room = cap.for_allocation(record.volume.allocation);
            let need = header.data_bytes + FULL_BYTES;
            if size > room || cap.available_bytes < need {
                return Err(PoolError::ResourceExhausted(format!(
                    "pool {} on node {} can provide {room} more bytes of {} storage and has {} \
                     bytes free; a copy of {size} bytes with {} bytes of data was requested",
                    self.name(),
                    self.node_id(),
                    record.volume.allocation.as_str(),
                    cap.available_bytes,
                    header.data_bytes
                )));
            }
            let path = transfers_dir(&self.dir).join(format!("{hex}.json"));
            atomic::write_file(&path, &to_json(record))
                .ctx(|| format!("write transfer record {}", path.display()))
        })();
        let mut t = self.table();
        match &result {
            Ok(()) => {
                t.pending.insert(hex.to_string(), record.clone());
            }
            Err(_) => {
                if let Some(p) = already {
                    t.pending.insert(hex.to_string(), p);
                }
            }
        }
        drop(t);
        self.invalidate_reserved();
        result
    }

    /// Run `job` to its end: read frames from `source` (its header already taken), write and
    /// verify, commit the volume. Blocking; the driver runs it on a thread of its own.
    /// `on_chunk` is told every chunk's size (metrics). Whatever happens, the job is over
    /// when this returns: committed, or cleaned up with its error kept for the next call.
    pub fn run_transfer(
        &self,
        job: &Arc<Job>,
        header: &Header,
        source: &mut dyn FrameSource,
        limit: &RateLimit,
        on_chunk: &mut dyn FnMut(u64),
    ) -> Result<VolumeRecord, PoolError> {
        let hex = hex_of(&job.record);
        let tmp = temp_image(&self.dir, &hex, &job.record.transfer_id);
        let result = self.fill_and_commit(job, header, source, limit, on_chunk, &tmp, &hex);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        let _guard = self.lock_volume(&hex);
        let mut t = self.table();
        // Only this job's own entries: a DeleteVolume may have removed them already, and a
        // new transfer of the name may have started since.
        if t.jobs.get(&hex).is_some_and(|j| Arc::ptr_eq(j, job)) {
            t.jobs.remove(&hex);
        }
        let result = match result {
            Ok(v) => Ok(v),
            Err(TransferError::Cancelled) => Err(PoolError::Aborted(format!(
                "the transfer into {} was cancelled",
                job.record.volume.id
            ))),
            Err(e) => {
                let ours = t
                    .pending
                    .get(&hex)
                    .is_some_and(|p| p.transfer_id == job.record.transfer_id);
                if ours && !job.is_cancelled() {
                    t.pending.remove(&hex);
                    let path = transfers_dir(&self.dir).join(format!("{hex}.json"));
                    let _ = atomic::remove_file(&path);
                    t.failed.insert(hex.clone(), failure(&job.record, &e));
                }
                Err(failure(&job.record, &e))
            }
        };
        drop(t);
        self.invalidate_reserved();
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn fill_and_commit(
        &self,
        job: &Arc<Job>,
        header: &Header,
        source: &mut dyn FrameSource,
        limit: &RateLimit,
        on_chunk: &mut dyn FnMut(u64),
        tmp: &Path,
        hex: &str,
    ) -> Result<VolumeRecord, TransferError> {
        let vol = &job.record.volume;
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp)
            .ctx(|| format!("create {}", tmp.display()))?;
        file.set_len(vol.size_bytes)
            .ctx(|| format!("size {}", tmp.display()))?;
        let mut writer = Writer::new(&file, vol.size_bytes, header)?;
        let trailer = loop {
            if job.is_cancelled() {
                return Err(TransferError::Cancelled);
            }
            match source.next_frame()? {
                Some(Frame::Chunk(c)) => {
                    limit.take(c.data.len() as u64);
                    writer.chunk(&c)?;
                    job.received.store(writer.received, Ordering::Relaxed);
                    on_chunk(c.data.len() as u64);
                }
                Some(Frame::Trailer(t)) => break t,
                Some(Frame::Header(_)) => {
                    return Err(TransferError::Corrupt("a second header".into()))
                }
                None => {
                    return Err(TransferError::SourceGone(
                        "the stream ended before its trailer".into(),
                    ))
                }
            }
        };
        writer.finish(&trailer)?;
        let _guard = self.lock_volume(hex);
        if job.is_cancelled() {
            return Err(TransferError::Cancelled);
        }
        if vol.allocation == crate::Allocation::Thick {
            fallocate_all(&file, vol.size_bytes)?;
        }
        file.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
        let dest = self.image_path(hex);
        fs::rename(tmp, &dest).ctx(|| format!("move image into {}", dest.display()))?;
        atomic::sync_dir(&self.dir.join("volumes")).ctx(|| "fsync volumes dir".into())?;
        if let Err(e) = atomic::write_file(&self.record_path(hex), &to_json(vol)) {
            let _ = atomic::remove_file(&dest);
            return Err(PoolError::io("write volume record", e).into());
        }
        self.insert_volume(hex, vol.clone());
        self.changed();
        let path = transfers_dir(&self.dir).join(format!("{hex}.json"));
        atomic::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
        self.table().pending.remove(hex);
        Ok(vol.clone())
    }

    /// DeleteVolume of a name being filled: cancel its job, remove its temp image and record.
    /// The caller holds the volume's lock. `true` when there was a transfer.
    pub(crate) fn cancel_transfer(&self, hex: &str) -> Result<bool, PoolError> {
        let mut t = self.table();
        let failed = t.failed.remove(hex).is_some();
        let job = t.jobs.remove(hex);
        let pending = t.pending.remove(hex);
        drop(t);
        if let Some(j) = &job {
            j.cancelled.store(true, Ordering::Relaxed);
            let _ = fs::remove_file(temp_image(&self.dir, hex, &j.record.transfer_id));
        }
        if let Some(p) = &pending {
            let path = transfers_dir(&self.dir).join(format!("{hex}.json"));
            atomic::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
            let _ = fs::remove_file(temp_image(&self.dir, hex, &p.transfer_id));
            tracing::info!(volume_id = %p.volume.id, transfer_id = %p.transfer_id,
                "transfer cancelled by DeleteVolume");
        }
        self.invalidate_reserved();
        Ok(failed || job.is_some() || pending.is_some())
    }

    /// The transfer filling volume `hex`, if one is pending or running.
    pub(crate) fn pending_transfer(&self, hex: &str) -> Option<TransferRecord> {
        self.table().pending.get(hex).cloned()
    }

    /// Transfers with a record and no job (pending after a restart): the driver resumes them.
    pub fn pending_transfers(&self) -> Vec<TransferRecord> {
        let t = self.table();
        t.pending
            .iter()
            .filter(|(hex, _)| !t.jobs.contains_key(*hex))
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// A copy of `req` that could not start (its source refused or could not be reached, no
    /// room here): `error` is what the next CreateVolume of the name answers.
    pub fn transfer_start_failed(&self, req: &CreateRequest, error: PoolError) {
        let hex = self.mint(Kind::Volume, &req.name).hex;
        let _guard = self.lock_volume(&hex);
        let mut t = self.table();
        if !t.jobs.contains_key(&hex) && !t.pending.contains_key(&hex) {
            t.failed.insert(hex, error);
        }
    }

    /// Drop a pending transfer that cannot be resumed (its source is gone), keeping `error`
    /// for the next CreateVolume of its name.
    pub fn drop_pending_transfer(&self, record: &TransferRecord, error: PoolError) {
        let hex = hex_of(record);
        let _guard = self.lock_volume(&hex);
        let mut t = self.table();
        if t.jobs.contains_key(&hex) || t.pending.get(&hex) != Some(record) {
            return;
        }
        t.pending.remove(&hex);
        let _ = atomic::remove_file(&transfers_dir(&self.dir).join(format!("{hex}.json")));
        t.failed.insert(hex, error);
        drop(t);
        self.invalidate_reserved();
    }

    /// What the pending transfers still hold in reserve: each volume's size less what its
    /// temp image already took (that is counted by the filesystem's free space).
    pub(crate) fn transfer_reserved_bytes(&self) -> (u64, u64) {
        let t = self.table();
        let mut reserved = 0;
        let mut provisioned = 0;
        for (hex, r) in &t.pending {
            let used = fs::metadata(temp_image(&self.dir, hex, &r.transfer_id))
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            reserved += r.volume.size_bytes.saturating_sub(used);
            provisioned += r.volume.size_bytes;
        }
        (reserved, provisioned)
    }
}

/// A failed job's error as the next CreateVolume reports it: a source out of reach is
/// UNAVAILABLE (the CO retries); a bad stream is ABORTED (the retry copies again).
fn failure(r: &TransferRecord, e: &TransferError) -> PoolError {
    let what = format!("the copy into {} from {}", r.volume.id, r.endpoint);
    match e {
        TransferError::SourceGone(m) => PoolError::Unavailable(format!(
            "{what} stopped: the source cannot be reached ({m}); nothing was kept, a retry \
             copies again"
        )),
        TransferError::Corrupt(m) => PoolError::Aborted(format!(
            "{what} failed verification ({m}); nothing was kept, a retry copies again"
        )),
        TransferError::Cancelled => PoolError::Aborted(format!("{what} was cancelled")),
        TransferError::Pool(p) => clone_error(p),
    }
}

/// Pool errors carry an `io::Error`, which is not `Clone`: the same kind and message.
fn clone_error(p: &PoolError) -> PoolError {
    match p {
        PoolError::InvalidArgument(m) => PoolError::InvalidArgument(m.clone()),
        PoolError::NotFound(m) => PoolError::NotFound(m.clone()),
        PoolError::AlreadyExists(m) => PoolError::AlreadyExists(m.clone()),
        PoolError::OutOfRange(m) => PoolError::OutOfRange(m.clone()),
        PoolError::ResourceExhausted(m) => PoolError::ResourceExhausted(m.clone()),
        PoolError::FailedPrecondition(m) => PoolError::FailedPrecondition(m.clone()),
        PoolError::Aborted(m) => PoolError::Aborted(m.clone()),
        PoolError::Unavailable(m) => PoolError::Unavailable(m.clone()),
        other => PoolError::Aborted(format!("transfer failed: {other}")),
    }
}
