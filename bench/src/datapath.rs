//! The data path: fio inside a published loopvol volume against fio in a plain directory on
//! the pool's own filesystem (the target), and against the same kind of volume set up by hand
//! with the floor's steps (losetup --direct-io=on, mkfs, mount, bind), which tells loopvol's
//! share of a gap from the loop device's own. Job by job, rotating which side goes first.

use std::path::{Path, PathBuf};

use provisioner::{Allocation, FsType};

use crate::csi_ops::{Csi, MountPaths};
use crate::fio::{self, Figures, Pattern, JOBS};
use crate::floor::{self, Mkfs};
use crate::load::blocking;
use crate::plan::{Plan, GIB};
use crate::results::{median_figures, DataPath, FioRow, Target};
use crate::stats::ratio;
use crate::workspace::Workspace;

pub const SEQUENTIAL_LIMIT: f64 = 0.95;
pub const RANDOM_LIMIT: f64 = 0.90;
const VOLUME_BYTES: u64 = GIB;
const FS: FsType = FsType::Ext4;

/// The three places fio runs, in the order of [`Runs`]' slots.
struct Sides {
    volume: PathBuf,
    plain: PathBuf,
    hand_made: PathBuf,
}

#[derive(Default, Clone)]
struct Runs {
    volume: Vec<Figures>,
    plain: Vec<Figures>,
    hand_made: Vec<Figures>,
}

async fn fio_job(
    job: fio::Job,
    dir: &Path,
    engine: &'static str,
    plan: &Plan,
) -> anyhow::Result<Figures> {
    let (size, runtime, dir) = (plan.fio_file_mib, plan.fio_runtime_s, dir.to_path_buf());
    blocking(move || fio::run(&job, &dir, engine, size, runtime)).await
}

pub async fn run(plan: &Plan, ws: &Workspace, csi: &Csi) -> anyhow::Result<DataPath> {
    let engine = fio::engine();
    let plain = ws.subdir("fio-plain")?;
    let id = csi
        .create("fio-volume", VOLUME_BYTES, FS, Allocation::Thin)
        .await?;
    let paths = MountPaths::prepare(&ws.subdir("fio-volume")?, "fio")?;
    csi.stage(&id, &paths.staging, FS).await?;
    csi.publish(&id, &paths.staging, &paths.target, FS).await?;

    let hand_root = ws.subdir("fio-hand-made")?;
    let hand = blocking(move || {
        let image = hand_root.join("volume.img");
        floor::sparse_image(&image, VOLUME_BYTES)?;
        let paths = MountPaths::prepare(&hand_root, "fio")?;
        let (mounted, _) = floor::stage_publish(&image, &paths, FS, &Mkfs::for_fs(FS)?)?;
        Ok((mounted, paths.target))
    })
    .await;

    let result = match &hand {
        Ok((_, hand_target)) => {
            let sides = Sides {
                volume: paths.target.clone(),
                plain,
                hand_made: hand_target.clone(),
            };
            measure(plan, engine, &sides).await
        }
        Err(e) => Err(anyhow::anyhow!("set up the hand-made loop volume: {e:#}")),
    };
    if let Ok((mounted, _)) = hand {
        blocking(move || floor::unpublish_unstage(&mounted).map(|_| ())).await?;
    }
    let down = async {
        csi.unpublish(&id, &paths.target).await?;
        csi.unstage(&id, &paths.staging).await?;
        csi.delete(&id).await
    }
    .await;
    let rows = result?;
    down?;
    Ok(DataPath {
        engine: engine.to_string(),
        file_mib: plan.fio_file_mib,
        runtime_s: plan.fio_runtime_s,
        repetitions: plan.fio_repetitions,
        volume: format!(
            "{} MiB {FS} thin volume, staged and published by loopvol (loop device with direct \
             I/O)",
            VOLUME_BYTES >> 20
        ),
        rows,
    })
}

async fn measure(plan: &Plan, engine: &'static str, sides: &Sides) -> anyhow::Result<Vec<FioRow>> {
    let dirs = [&sides.volume, &sides.plain, &sides.hand_made];
    for dir in dirs {
        let (d, size) = (dir.to_path_buf(), plan.fio_file_mib);
        blocking(move || fio::lay_out(&d, engine, size)).await?;
    }
    let mut runs = vec![Runs::default(); JOBS.len()];
    for rep in 0..plan.fio_repetitions {
        for (j, job) in JOBS.iter().enumerate() {
            eprintln!(
                "  {} (run {} of {})",
                job.name,
                rep + 1,
                plan.fio_repetitions
            );
            // Rotate which side goes first so drift does not favour one.
            for k in 0..dirs.len() {
                let slot = (k + rep + j) % dirs.len();
                let f = fio_job(*job, dirs[slot], engine, plan).await?;
                let r = &mut runs[j];
                [&mut r.volume, &mut r.plain, &mut r.hand_made][slot].push(f);
            }
        }
    }
    Ok(JOBS
        .iter()
        .zip(runs)
        .map(|(job, r)| {
            let (metric, limit) = match job.pattern {
                Pattern::Sequential => ("MiB/s", SEQUENTIAL_LIMIT),
                Pattern::Random => ("IOPS", RANDOM_LIMIT),
            };
            let mut row = FioRow {
                job: job.name.to_string(),
                pattern: Some(job.pattern),
                metric: metric.to_string(),
                volume: median_figures(&r.volume),
                plain: median_figures(&r.plain),
                hand_made: median_figures(&r.hand_made),
                volume_runs: r.volume,
                plain_runs: r.plain,
                hand_made_runs: r.hand_made,
                ..Default::default()
            };
            let vol = row.metric_of(&row.volume);
            row.target = Target::at_least(
                limit,
                "plain directory",
                ratio(vol, row.metric_of(&row.plain)),
            );
            row.ratio_to_hand_made = ratio(vol, row.metric_of(&row.hand_made));
            row
        })
        .collect())
}
