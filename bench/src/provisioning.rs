//! CreateVolume / DeleteVolume throughput and latency at several concurrencies, thin and
//! thick, on an empty pool and on one already holding `plan.prefill` volumes, each batch next
//! to the same file operations done directly (the floor).
//!
//! Four sides run every configuration one after the other, rotating which goes first: loopvol
//! on an empty pool, a second loopvol process on a full pool, and the floor in an empty and in
//! a full directory. So "empty vs full" is compared seconds apart, like "loopvol vs floor",
//! not in two halves of the run minutes apart on a shared machine.

use std::sync::{Arc, Mutex};

use provisioner::{Allocation, FsType};

use crate::csi_ops::Csi;
use crate::driver::{Driver, Launch};
use crate::floor::FloorPool;
use crate::load::{self, blocking, Batch};
use crate::plan::Plan;
use crate::results::{Compared, Flatness, Provisioning, ProvisioningRow, Target};
use crate::stats::ratio;
use crate::workspace::Workspace;

/// Flat means loopvol's p50 with a full pool is within this factor of its p50 with an empty
/// one, measured side by side.
pub const FLATNESS_LIMIT: f64 = 1.25;

const PREFILL_CONCURRENCY: usize = 32;

/// Who performs a batch.
#[derive(Clone)]
enum Actor {
    Loopvol(Box<Csi>),
    Floor(Arc<FloorPool>),
}

/// What one batch asks for.
#[derive(Clone, Copy)]
struct Job<'a> {
    prefix: &'a str,
    n: usize,
    concurrency: usize,
    bytes: u64,
    allocation: Allocation,
}

/// Create the batch; the batch and the handles (volume IDs or floor names) of those created.
async fn create(actor: &Actor, job: Job<'_>) -> (Batch, Vec<String>) {
    let Job {
        n,
        concurrency,
        bytes,
        allocation,
        ..
    } = job;
    let handles = Arc::new(Mutex::new(vec![None; n]));
    let (actor2, slots, prefix) = (actor.clone(), handles.clone(), job.prefix.to_string());
    let batch = load::run(n, concurrency, move |i| {
        let (actor, slots, name) = (actor2.clone(), slots.clone(), format!("{prefix}-{i}"));
        async move {
            let handle = match actor {
                Actor::Loopvol(csi) => csi.create(&name, bytes, FsType::Ext4, allocation).await?,
                Actor::Floor(fl) => {
                    let name2 = name.clone();
                    blocking(move || fl.create(&name2, bytes, allocation)).await?;
                    name
                }
            };
            slots.lock().unwrap()[i] = Some(handle);
            Ok(())
        }
    })
    .await;
    let handles = handles.lock().unwrap().iter().flatten().cloned().collect();
    (batch, handles)
}

async fn delete(actor: &Actor, handles: Vec<String>, concurrency: usize) -> Batch {
    let (actor, handles) = (actor.clone(), Arc::new(handles));
    load::run(handles.len(), concurrency, move |i| {
        let (actor, handles) = (actor.clone(), handles.clone());
        async move {
            match actor {
                Actor::Loopvol(csi) => csi.delete(&handles[i]).await,
                Actor::Floor(fl) => blocking(move || fl.delete(&handles[i])).await,
            }
        }
    })
    .await
}

/// Create a batch, then delete it: at most one batch of thick volumes holds disk space.
async fn cycle(actor: &Actor, job: Job<'_>) -> (Batch, Batch) {
    let (created, handles) = create(actor, job).await;
    (created, delete(actor, handles, job.concurrency).await)
}

fn row(op: &str, job: &Job, prefilled: usize, lv: &Batch, fl: &Batch) -> ProvisioningRow {
    let mut errors = lv.errors(3);
    errors.extend(fl.errors(3).into_iter().map(|e| format!("floor: {e}")));
    ProvisioningRow {
        op: op.to_string(),
        allocation: job.allocation.as_str().to_string(),
        prefilled,
        concurrency: job.concurrency,
        figures: Compared::new(lv.summary(), fl.summary()),
        errors,
    }
}

pub async fn run(
    plan: &Plan,
    ws: &Workspace,
    launch: &Launch,
    csi: &Csi,
) -> anyhow::Result<Provisioning> {
    let bytes = plan.small_volume_bytes;
    let full_dir = ws.subdir("provisioning-full")?;
    let (mut full_driver, _) = Driver::start(
        launch,
        &full_dir.join("pool"),
        &full_dir.join("csi.sock"),
        &full_dir.join("driver.log"),
    )
    .await?;
    // Order of the sides: loopvol empty, loopvol full, floor empty, floor full.
    let sides = [
        Actor::Loopvol(Box::new(csi.clone())),
        Actor::Loopvol(Box::new(Csi::connect(&full_driver.socket).await?)),
        Actor::Floor(Arc::new(FloorPool::new(&ws.subdir("floor-empty")?)?)),
        Actor::Floor(Arc::new(FloorPool::new(&ws.subdir("floor-full")?)?)),
    ];

    eprintln!(
        "  filling the full pool and the full floor directory with {} volumes",
        plan.prefill
    );
    let fill = Job {
        prefix: "fill",
        n: plan.prefill,
        concurrency: PREFILL_CONCURRENCY,
        bytes,
        allocation: Allocation::Thin,
    };
    let (lv_fill, lv_fill_ids) = create(&sides[1], fill).await;
    let (fl_fill, fl_fill_names) = create(&sides[3], fill).await;
    anyhow::ensure!(
        lv_fill.failures() == 0 && fl_fill.failures() == 0,
        "filling failed: {:?} {:?}",
        lv_fill.errors(3),
        fl_fill.errors(3)
    );

    let mut rows = Vec::new();
    let mut round = 0;
    for allocation in [Allocation::Thin, Allocation::Thick] {
        for &c in &plan.concurrencies {
            let prefix = format!("{}-c{c}", allocation.as_str());
            let job = Job {
                prefix: &prefix,
                n: plan.ops_at(c),
                concurrency: c,
                bytes,
                allocation,
            };
            eprintln!(
                "  {prefix}: {} creates and deletes on each of 4 sides",
                job.n
            );
            let mut out: [Option<(Batch, Batch)>; 4] = Default::default();
            for k in 0..sides.len() {
                let slot = (k + round) % sides.len();
                out[slot] = Some(cycle(&sides[slot], job).await);
            }
            round += 1;
            let [Some(lv_e), Some(lv_f), Some(fl_e), Some(fl_f)] = out else {
                unreachable!("every side ran");
            };
            for (prefilled, lv, fl) in [(0, lv_e, fl_e), (plan.prefill, lv_f, fl_f)] {
                rows.push(row("CreateVolume", &job, prefilled, &lv.0, &fl.0));
                rows.push(row("DeleteVolume", &job, prefilled, &lv.1, &fl.1));
            }
        }
    }

    eprintln!("  emptying the full pool");
    let b = delete(&sides[1], lv_fill_ids, PREFILL_CONCURRENCY).await;
    anyhow::ensure!(
        b.failures() == 0,
        "deleting the fill failed: {:?}",
        b.errors(3)
    );
    delete(&sides[3], fl_fill_names, PREFILL_CONCURRENCY).await;
    full_driver.stop().await?;

    rows.sort_by_key(|r| (r.prefilled, r.op != "CreateVolume", r.allocation != "thin"));
    Ok(Provisioning {
        volume_bytes: bytes,
        fs: FsType::Ext4.as_str().to_string(),
        prefill: plan.prefill,
        flatness: flatness(&rows, plan.prefill),
        rows,
        prefill_create: Some(lv_fill.summary()),
    })
}

/// Pair each empty-pool row with its full-pool twin.
fn flatness(rows: &[ProvisioningRow], prefill: usize) -> Vec<Flatness> {
    rows.iter()
        .filter(|r| r.prefilled == 0)
        .filter_map(|empty| {
            let full = rows.iter().find(|r| {
                r.prefilled == prefill
                    && r.op == empty.op
                    && r.allocation == empty.allocation
                    && r.concurrency == empty.concurrency
            })?;
            let (e, f) = (&empty.figures, &full.figures);
            let loopvol_ratio = ratio(f.loopvol.p50_ms, e.loopvol.p50_ms);
            Some(Flatness {
                op: empty.op.clone(),
                allocation: empty.allocation.clone(),
                concurrency: empty.concurrency,
                loopvol_p50_empty_ms: e.loopvol.p50_ms,
                loopvol_p50_full_ms: f.loopvol.p50_ms,
                floor_p50_empty_ms: e.floor.p50_ms,
                floor_p50_full_ms: f.floor.p50_ms,
                loopvol_ratio,
                floor_ratio: ratio(f.floor.p50_ms, e.floor.p50_ms),
                target: Target::at_most(FLATNESS_LIMIT, "empty pool", loopvol_ratio),
            })
        })
        .collect()
}
