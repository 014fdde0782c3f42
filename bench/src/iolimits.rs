//! IO limits: what a volume's configured limit holds fio to, and how long a live change
//! (ControllerModifyVolume on a published volume) takes to be in force. fio runs inside a
//! cgroup the harness creates and names to a dedicated driver with `--io-cgroup`, the way a
//! pod's processes run in the pod's cgroup.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use provisioner::{Allocation, FsType};

use crate::csi_ops::{Csi, MountPaths};
use crate::driver::{Driver, Launch};
use crate::fio::{self, Job, Pattern};
use crate::load::blocking;
use crate::plan::{Plan, MIB};
use crate::results::{IoLimitRow, IoLimits};
use crate::workspace::Workspace;

const BLKIO: &str = "/sys/fs/cgroup/blkio";
const VOLUME_BYTES: u64 = 512 * MIB;
const FS: FsType = FsType::Ext4;

/// A cgroup of the harness's own, removed when dropped.
struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

struct Case {
    key: &'static str,
    /// `None`: the limit removed, for the unlimited baseline.
    value: Option<u64>,
    job: Job,
}

const RAND_READ_64K: Job = Job {
    name: "rand-read-64k",
    rw: "randread",
    block_size: "64k",
    iodepth: 16,
    pattern: Pattern::Sequential,
};
const SEQ_WRITE_64K: Job = Job {
    name: "seq-write-64k",
    rw: "write",
    block_size: "64k",
    iodepth: 16,
    pattern: Pattern::Sequential,
};

fn job(name: &str) -> Job {
    *fio::JOBS
        .iter()
        .find(|j| j.name == name)
        .expect("a standard job")
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            key: "writeIOPS",
            value: None,
            job: job("rand-write-4k"),
        },
        Case {
            key: "writeIOPS",
            value: Some(300),
            job: job("rand-write-4k"),
        },
        Case {
            key: "writeIOPS",
            value: Some(2000),
            job: job("rand-write-4k"),
        },
        Case {
            key: "readIOPS",
            value: Some(1000),
            job: job("rand-read-4k"),
        },
        Case {
            key: "readBPS",
            value: Some(16 * MIB),
            job: RAND_READ_64K,
        },
        Case {
            key: "writeBPS",
            value: Some(32 * MIB),
            job: SEQ_WRITE_64K,
        },
    ]
}

pub async fn run(plan: &Plan, ws: &Workspace, launch: &Launch) -> anyhow::Result<IoLimits> {
    anyhow::ensure!(
        Path::new(BLKIO)
            .join("blkio.throttle.write_iops_device")
            .exists(),
        "no cgroup v1 blkio hierarchy at {BLKIO}"
    );
    let cg = Cgroup(Path::new(BLKIO).join(format!("loopvol-bench-{}", std::process::id())));
    std::fs::create_dir(&cg.0).with_context(|| format!("create {}", cg.0.display()))?;
    let dir = ws.subdir("iolimits")?;
    let mut own = launch.clone();
    own.extra_args
        .extend(["--io-cgroup".to_string(), cg.0.display().to_string()]);
    let (mut drv, _) = Driver::start(
        &own,
        &dir.join("pool"),
        &dir.join("csi.sock"),
        &dir.join("driver.log"),
    )
    .await?;
    let csi = Csi::connect(&drv.socket).await?;
    let result = measure(plan, &dir, &csi, &cg.0).await;
    drv.stop().await?;
    result
}

async fn measure(plan: &Plan, dir: &Path, csi: &Csi, cg: &Path) -> anyhow::Result<IoLimits> {
    let engine = fio::engine();
    let id = csi
        .create("iolimits", VOLUME_BYTES, FS, Allocation::Thin)
        .await?;
    let paths = MountPaths::prepare(dir, "iolimits")?;
    csi.stage(&id, &paths.staging, FS).await?;
    csi.publish(&id, &paths.staging, &paths.target, FS).await?;
    let target = paths.target.clone();
    let size = plan.fio_file_mib;
    let rows = async {
        // Laid out from outside the cgroup, so the layout is not throttled.
        blocking(move || fio::lay_out(&target, engine, size)).await?;
        let mut rows = Vec::new();
        let mut set: Vec<&'static str> = Vec::new();
        for case in cases() {
            // Only this case's limit: the others are removed in the same change.
            let mut params: Vec<(String, String)> = set
                .iter()
                .filter(|k| **k != case.key)
                .map(|k| (k.to_string(), "unlimited".to_string()))
                .collect();
            params.push((
                case.key.to_string(),
                case.value.map_or("unlimited".into(), |v| v.to_string()),
            ));
            set.push(case.key);
            let started = Instant::now();
            csi.modify(&id, &params).await?;
            let modify_ms = started.elapsed().as_secs_f64() * 1e3;
            let (job, d, cg, runtime) = (
                case.job,
                paths.target.clone(),
                cg.to_path_buf(),
                plan.fio_runtime_s,
            );
            let f =
                blocking(move || fio::run_in(&job, &d, engine, size, runtime, Some(&cg))).await?;
            let (metric, measured) = if case.key.ends_with("IOPS") {
                ("IOPS", f.iops)
            } else {
                ("MiB/s", f.bw_mib_s)
            };
            let limit = case.value.map(|v| {
                if case.key.ends_with("IOPS") {
                    v as f64
                } else {
                    v as f64 / MIB as f64
                }
            });
            rows.push(IoLimitRow {
                key: case.key.to_string(),
                limit,
                job: case.job.name.to_string(),
                metric: metric.to_string(),
                measured,
                ratio: limit.map(|l| measured / l),
                modify_ms,
            });
        }
        anyhow::Ok(rows)
    }
    .await;
    let down = async {
        csi.unpublish(&id, &paths.target).await?;
        csi.unstage(&id, &paths.staging).await?;
        csi.delete(&id).await
    }
    .await;
    let rows = rows?;
    down?;
    Ok(IoLimits {
        volume: format!(
            "{} MiB {FS} thin volume, published; fio ({engine}, direct I/O, {} s per row) inside \
             the cgroup named by --io-cgroup (cgroup v1 blkio)",
            VOLUME_BYTES >> 20,
            plan.fio_runtime_s
        ),
        rows,
    })
}
