//! The receiving job of a restore or clone from another node. CreateVolume on the target
//! node, with the source's pool API endpoint from the router, starts (or joins) a job that
//! outlives the call: the pool's transfer record holds its state
//! (provisioner/src/pool/transfers.rs), a thread of its own runs the writer, and every call of
//! the same name waits a moment for it, then answers ABORTED with its progress until the
//! volume is committed (csi-provisioner retries ABORTED with the same name).

use std::sync::Arc;
use std::time::{Duration, Instant};

use provisioner::pool::transfers::{Job, TransferRecord, TransferState};
use provisioner::pool::CreateRequest;
use provisioner::record::ContentSource;
use provisioner::transfer::{self, Header};
use provisioner::{Pool, VolumeParams, VolumeRecord};
use tonic::Streaming;

use super::client::{self, RemoteSource};
use crate::error::{Error, Result};
use crate::shared::units::bytes;
use crate::state::Driver;
use crate::transfer_api::ReadResponse;

/// How long one CreateVolume waits for a running job before answering ABORTED: a small
/// volume is done within the first call; a big one is followed by the CO's retries.
pub const JOIN_WAIT: Duration = Duration::from_secs(5);

fn source_id(s: &ContentSource) -> &str {
    match s {
        ContentSource::Snapshot(id) | ContentSource::Volume(id) => id,
    }
}

/// CreateVolume of `req` into pool `pool`, its content source on the node whose pool API is
/// `endpoint`: the volume once it is complete, else ABORTED with the copy's progress.
///
/// A new copy starts in the background: opening the source may take a while (a volume source
/// is first copied into a temporary snapshot on its node), and the CO's deadline must not cut
/// it short. Its refusals (no room here, a source that does not exist or cannot be reached)
/// come back to the next CreateVolume of the name.
pub async fn create(
    driver: &Arc<Driver>,
    pool: String,
    req: CreateRequest,
    endpoint: String,
) -> Result<VolumeRecord> {
    if req.source.is_none() {
        return Err(Error::InvalidArgument(
            "a transfer endpoint was given without a content source".into(),
        ));
    }
    let r = req.clone();
    let (target, state) = driver
        .blocking(move |d| Ok(d.pools.transfer_state(&pool, &r)?))
        .await?;
    let key = starting_key(&target, &req);
    match state {
        TransferState::Done(v) => return Ok(v),
        TransferState::Failed(e) => return Err(e.into()),
        TransferState::Running(_) => {}
        TransferState::Start => {
            let fresh = driver
                .transfer
                .starting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone());
            if fresh {
                let (d, t, r, key) = (driver.clone(), target.clone(), req.clone(), key.clone());
                tokio::spawn(async move {
                    if let Err(e) = start(&d, &t, &r, &endpoint, Some(&key)).await {
                        tracing::warn!(volume_name = %r.name, from = %endpoint, error = %e,
                            "transfer not started");
                        t.transfer_start_failed(&r, crate::error::to_pool_error(e));
                    }
                    d.transfer
                        .starting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                });
            }
        }
    }
    join(driver, &target, &req, &key).await
}

/// Open the source's stream, admit the copy (capacity, record) and run it, unless another
/// call of the same name got there first (then its job runs, not this one).
async fn start(
    driver: &Arc<Driver>,
    target: &Arc<Pool>,
    req: &CreateRequest,
    endpoint: &str,
    key: Option<&str>,
) -> Result<()> {
    let source = req.source.as_ref().map(source_id).unwrap_or_default();
    let tid = transfer::new_id();
    let tls = driver.transfer.client_tls.as_ref();
    let opened = client::open(endpoint, tls, source, &tid).await?;
    let header = opened.header.clone();
    let (t, r, ep, id) = (
        target.clone(),
        req.clone(),
        endpoint.to_string(),
        tid.clone(),
    );
    let key = key.map(str::to_string);
    let job = driver
        .blocking(move |d| {
            // A DeleteVolume while the stream was opened withdrew the key (`forget_start`).
            let wanted = || key.as_ref().is_none_or(|k| d.transfer.is_starting(k));
            Ok(t.begin_transfer(&r, &header, &ep, &id, &wanted)?)
        })
        .await?;
    if job.record.transfer_id == tid {
        spawn(driver, target.clone(), job, opened.header, opened.stream);
    }
    Ok(())
}

/// What names a copy being started (between the call that starts it and its admission): its
/// volume's hex, which derives from the name alone.
fn starting_key(target: &Pool, req: &CreateRequest) -> String {
    provisioner::VolumeId::from_name(provisioner::ids::Kind::Volume, &req.name, target.node_id())
        .hex
}

/// DeleteVolume of `volume_id`: a copy still opening its source is not admitted afterwards.
/// Called before the pool's delete takes the volume's lock, so a copy admitted first is then
/// found and cancelled by it.
pub fn forget_start(driver: &Driver, volume_id: &str) {
    if let Some(v) = provisioner::VolumeId::parse(provisioner::ids::Kind::Volume, volume_id) {
        driver
            .transfer
            .starting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&v.hex);
    }
}

/// Wait up to [`JOIN_WAIT`] for the copy of `req`, then say where it stands.
async fn join(
    driver: &Arc<Driver>,
    target: &Arc<Pool>,
    req: &CreateRequest,
    key: &str,
) -> Result<VolumeRecord> {
    let until = Instant::now() + JOIN_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Read before the state: a start that ends in between has left its outcome there.
        let starting = driver
            .transfer
            .starting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key);
        let (t, r) = (target.clone(), req.clone());
        let state = driver.blocking(move |_| Ok(t.transfer_state(&r)?)).await?;
        let late = Instant::now() >= until;
        match state {
            TransferState::Done(v) => return Ok(v),
            TransferState::Failed(e) => return Err(e.into()),
            TransferState::Running(job) if late => return Err(Error::Aborted(progress(&job))),
            TransferState::Start if starting && late => {
                return Err(Error::Aborted(format!(
                    "copying: 0 %, preparing (opening the source {} on its node); retry to \
                     follow the copy",
                    req.source
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                )))
            }
            TransferState::Start if !starting => {
                return Err(Error::Aborted(format!(
                    "the copy into {:?} ended without a volume (cancelled); retry to start \
                     again",
                    req.name
                )))
            }
            _ => {}
        }
    }
}

/// "copying: 45 %, 460.0 MiB of 1.0 GiB …": what a CreateVolume retry answers meanwhile.
pub fn progress(job: &Job) -> String {
    format!(
        "copying: {} %, {} of {} (volume {} from {}); retry to follow the copy",
        job.percent(),
        bytes(job.received()),
        bytes(job.data_bytes),
        job.record.volume.id,
        job.record.endpoint
    )
}

/// The request a pending record answers to (its own parameters), for taking it over.
fn request_of(r: &TransferRecord) -> CreateRequest {
    CreateRequest {
        name: r.volume.name.clone(),
        required_bytes: r.volume.size_bytes as i64,
        limit_bytes: 0,
        params: VolumeParams {
            fs_type: r.volume.fs_type,
            allocation: r.volume.allocation,
            io_limits: r.volume.io_limits,
            ..Default::default()
        },
        needs_filesystem: !r.volume.block_only,
        source: r.volume.source.clone(),
    }
}

/// Run `job` on a thread of its own (the writer blocks on disk and on the stream).
fn spawn(
    driver: &Arc<Driver>,
    target: Arc<Pool>,
    job: Arc<Job>,
    header: Header,
    stream: Streaming<ReadResponse>,
) {
    let limit = driver.transfer.limit.clone();
    let runtime = tokio::runtime::Handle::current();
    let span = tracing::Span::current();
    std::thread::spawn(move || {
        let _span = span.enter();
        let started = Instant::now();
        crate::metrics::transfer_started();
        let mut source = RemoteSource::start(stream, &runtime);
        let result = target.run_transfer(&job, &header, &mut source, &limit, &mut |n| {
            crate::metrics::count_transfer_bytes(n)
        });
        crate::metrics::transfer_finished();
        let secs = started.elapsed().as_secs_f64();
        let rate = job.received() as f64 / secs.max(0.001) / (1 << 20) as f64;
        let (v, r) = (&job.record.volume, &job.record);
        match result {
            Ok(_) => tracing::info!(volume_id = %v.id, transfer_id = %r.transfer_id,
                source = %v.source.as_ref().map(|s| s.to_string()).unwrap_or_default(),
                from = %r.endpoint, size_bytes = v.size_bytes, bytes_received = job.received(),
                seconds = format!("{secs:.2}"), rate_mib_s = format!("{rate:.1}"),
                "transfer finished: volume committed"),
            Err(e) => tracing::warn!(volume_id = %v.id, transfer_id = %r.transfer_id,
                from = %r.endpoint, size_bytes = v.size_bytes, bytes_received = job.received(),
                seconds = format!("{secs:.2}"), rate_mib_s = format!("{rate:.1}"), error = %e,
                "transfer failed: nothing kept"),
        }
    });
}

/// At start: resume every pending transfer from scratch (its source may answer again), or
/// drop it, keeping the error for its next CreateVolume, when the source cannot be reached.
pub fn resume_pending(driver: &Arc<Driver>) {
    for pool in driver.pools.iter() {
        for record in pool.pending_transfers() {
            let (driver, pool) = (driver.clone(), pool.clone());
            tokio::spawn(async move {
                let req = request_of(&record);
                if let Err(e) = start(&driver, &pool, &req, &record.endpoint, None).await {
                    tracing::warn!(volume_id = %record.volume.id, error = %e,
                        "pending transfer dropped: its source cannot be resumed");
                    let code = e.code();
                    let msg = format!("the copy into {} stopped: {e}", record.volume.id);
                    let err = if code == tonic::Code::NotFound {
                        provisioner::PoolError::NotFound(msg)
                    } else {
                        provisioner::PoolError::Unavailable(msg)
                    };
                    pool.drop_pending_transfer(&record, err);
                }
            });
        }
    }
}
