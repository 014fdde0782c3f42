//! Scale: many small volumes created, staged and published at once (bounded client
//! concurrency), then all torn down, checking that every loop device was released. The driver
//! is also restarted with all of them in its pool, to time a start over a full pool.

use std::future::Future;
use std::sync::{Arc, Mutex};

use provisioner::{Allocation, FsType};

use crate::csi_ops::{Csi, MountPaths};
use crate::driver::Driver;
use crate::load::{self, Batch};
use crate::plan::Plan;
use crate::results::{Scale, ScalePhase};
use crate::stats::Summary;
use crate::workspace::Workspace;

/// The volumes of the run: IDs once created, and where kubelet would mount each.
struct Vols {
    ids: Mutex<Vec<Option<String>>>,
    paths: Vec<MountPaths>,
}

impl Vols {
    fn live(&self) -> Vec<(String, MountPaths)> {
        let ids = self.ids.lock().unwrap();
        ids.iter()
            .zip(&self.paths)
            .filter_map(|(id, p)| Some((id.clone()?, p.clone())))
            .collect()
    }
}

fn phase(name: &str, b: &Batch) -> ScalePhase {
    // Calls by start order: the first tenth ran with few volumes attached, the last with
    // nearly all (or the reverse, for teardown); their p50s show whether a call's cost grows
    // with the number of volumes on the node.
    let tenth = (b.outcomes.len() / 10).max(1);
    let p50 = |o: &[load::Outcome]| {
        let ok: Vec<_> = o
            .iter()
            .filter(|o| o.error.is_none())
            .map(|o| o.latency)
            .collect();
        Summary::of_samples(&ok).p50_ms
    };
    let n = b.outcomes.len();
    ScalePhase {
        name: name.to_string(),
        summary: b.summary(),
        p50_first_tenth_ms: p50(&b.outcomes[..tenth.min(n)]),
        p50_last_tenth_ms: p50(&b.outcomes[n.saturating_sub(tenth)..]),
        errors: b.errors(5),
    }
}

/// Run `op` over every created volume, `concurrency` at a time.
async fn each_volume<F, Fut>(csi: &Csi, vols: &Vols, concurrency: usize, op: F) -> Batch
where
    F: Fn(Csi, String, MountPaths) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let live = Arc::new(vols.live());
    let csi = csi.clone();
    load::run(live.len(), concurrency, move |k| {
        let (id, paths) = live[k].clone();
        op(csi.clone(), id, paths)
    })
    .await
}

fn ours(ws: &Workspace, driver: &Driver) -> (usize, usize) {
    let (mounts, _) = ws.leftovers();
    let loops = loopvol::datapath::loop_device::loops_under(&driver.pool).len();
    (loops, mounts.len())
}

pub async fn run(
    plan: &Plan,
    ws: &Workspace,
    driver: &mut Driver,
    csi: &mut Csi,
) -> anyhow::Result<Scale> {
    let n = plan.scale_volumes;
    let c = plan.scale_concurrency;
    let bytes = plan.small_volume_bytes;
    let fs = FsType::Ext4;
    let root = ws.subdir("scale")?;
    let vols = Arc::new(Vols {
        ids: Mutex::new(vec![None; n]),
        paths: (0..n)
            .map(|i| MountPaths::prepare(&root, &format!("s{i}")))
            .collect::<anyhow::Result<_>>()?,
    });
    let (before_loops, before_mounts) = ours(ws, driver);
    let nodes_before = crate::workspace::loop_nodes();
    let mut phases = Vec::new();

    eprintln!("  creating {n} volumes");
    let (cs, vs) = (csi.clone(), vols.clone());
    let b = load::run(n, c, move |i| {
        let (csi, vols) = (cs.clone(), vs.clone());
        async move {
            let id = csi
                .create(&format!("scale-{i}"), bytes, fs, Allocation::Thin)
                .await?;
            vols.ids.lock().unwrap()[i] = Some(id);
            Ok(())
        }
    })
    .await;
    phases.push(phase("CreateVolume", &b));

    eprintln!("  staging and publishing them");
    let b = each_volume(csi, &vols, c, move |csi, id, p| async move {
        csi.stage(&id, &p.staging, fs).await?;
        csi.publish(&id, &p.staging, &p.target, fs).await
    })
    .await;
    phases.push(phase("NodeStage+NodePublish", &b));
    let (loops_when_published, mounts_when_published) = ours(ws, driver);
    let loop_nodes_added = crate::workspace::loop_nodes()
        .difference(&nodes_before)
        .count();
    let rss_published_bytes = driver.memory().map(|m| m.rss_bytes).unwrap_or(0);

    eprintln!("  unpublishing and unstaging them");
    let b = each_volume(csi, &vols, c, |csi, id, p| async move {
        csi.unpublish(&id, &p.target).await?;
        csi.unstage(&id, &p.staging).await
    })
    .await;
    phases.push(phase("NodeUnpublish+NodeUnstage", &b));
    let (loops_after_teardown, mounts_after_teardown) = ours(ws, driver);
    let mem = driver.memory().unwrap_or_default();

    eprintln!("  restarting the driver over the full pool");
    let mut start_with_volumes = Vec::new();
    for _ in 0..plan.restart_repetitions {
        start_with_volumes.push(driver.restart().await?);
    }
    *csi = Csi::connect(&driver.socket).await?;

    eprintln!("  deleting them");
    let b = each_volume(
        csi,
        &vols,
        c,
        |csi, id, _| async move { csi.delete(&id).await },
    )
    .await;
    phases.push(phase("DeleteVolume", &b));
    let (loops_end, _) = ours(ws, driver);
    let loop_nodes_left = crate::workspace::loop_nodes()
        .difference(&nodes_before)
        .count();
    let loop_nodes_removed = crate::workspace::remove_new_loop_nodes(&nodes_before);

    Ok(Scale {
        volumes: n,
        concurrency: c,
        volume_bytes: bytes,
        phases,
        loops_when_published: loops_when_published.saturating_sub(before_loops),
        mounts_when_published: mounts_when_published.saturating_sub(before_mounts),
        loops_after_teardown,
        mounts_after_teardown: mounts_after_teardown.saturating_sub(before_mounts),
        all_released: loops_after_teardown == 0 && loops_end == 0,
        rss_published_bytes,
        rss_after_teardown_bytes: mem.rss_bytes,
        peak_rss_bytes: mem.peak_rss_bytes,
        start_with_volumes,
        loop_nodes_added,
        loop_nodes_left,
        loop_nodes_removed,
    })
}
