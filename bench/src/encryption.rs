//! Encryption at rest (issue 26): the four fio jobs on an `encryption: fscrypt` ext4 volume and
//! on an unencrypted one, side by side in one run, with what each GiB moved costs in CPU.
//!
//! Each job moves a fixed amount (one pass over the data file, not a time window) and ends
//! with an fsync when it writes, and the data file's page cache is dropped before each job: an
//! fscrypt file cannot do direct I/O without inline encryption (absent from this kernel), so
//! the kernel quietly serves its O_DIRECT through the page cache, where a time window would
//! count writes that were never encrypted yet and reads that never left memory. Throughput is
//! the bytes over fio's wall time. CPU is counted twice: fio's own (user + system, from
//! getrusage of the waited-for child), and the whole machine's busy time from /proc/stat over
//! the same interval, which is where the encryption is: reads decrypt, and writeback
//! encrypts, in kernel workers, not in fio. The machine figure includes anything else the
//! machine did meanwhile, so it is read as an upper bound.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use provisioner::{Allocation, FsType};
use serde::{Deserialize, Serialize};

use crate::csi_ops::{Csi, MountPaths};
use crate::fio::{self, Job, JOBS};
use crate::load::blocking;
use crate::plan::{Plan, MIB};
use crate::stats::median;
use crate::workspace::Workspace;

/// The Secret's key for the benchmark's volume (a benchmark key, not a secret).
const KEY: &str = "b3c1a9e7d5f30a8e6c4b2a09f7e5d3c1b3c1a9e7d5f30a8e6c4b2a09f7e5d3c1";
const FS: FsType = FsType::Ext4;

/// One side of one job: medians over the repetitions.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Cost {
    pub mib_s: f64,
    pub iops: f64,
    /// fio's own CPU seconds (user + system) per GiB moved.
    pub fio_cpu_s_per_gib: f64,
    /// The machine's busy CPU seconds (all cores) per GiB moved over the same interval.
    pub machine_cpu_s_per_gib: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EncryptionRow {
    pub job: String,
    pub plain: Cost,
    pub encrypted: Cost,
    pub plain_runs: Vec<Cost>,
    pub encrypted_runs: Vec<Cost>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Encryption {
    pub volume: String,
    pub file_mib: u64,
    pub repetitions: usize,
    pub rows: Vec<EncryptionRow>,
}

struct Side {
    id: String,
    paths: MountPaths,
}

async fn up(
    csi: &Csi,
    ws: &Workspace,
    tag: &str,
    encrypted: bool,
    bytes: u64,
) -> anyhow::Result<Side> {
    let mut params = HashMap::from([(
        "allocation".to_string(),
        Allocation::Thin.as_str().to_string(),
    )]);
    let mut secrets = HashMap::new();
    if encrypted {
        params.insert("encryption".into(), "fscrypt".into());
        secrets.insert("key".to_string(), KEY.to_string());
    }
    let id = csi
        .create_with(&format!("enc-bench-{tag}"), bytes, FS, params)
        .await?;
    let paths = MountPaths::prepare(&ws.subdir(&format!("enc-{tag}"))?, tag)?;
    csi.stage_with(&id, &paths.staging, FS, secrets).await?;
    csi.publish(&id, &paths.staging, &paths.target, FS).await?;
    Ok(Side { id, paths })
}

async fn down(csi: &Csi, s: &Side) -> anyhow::Result<()> {
    csi.unpublish(&s.id, &s.paths.target).await?;
    csi.unstage(&s.id, &s.paths.staging).await?;
    csi.delete(&s.id).await
}

pub async fn run(plan: &Plan, ws: &Workspace, csi: &Csi) -> anyhow::Result<Encryption> {
    let engine = fio::engine();
    // Big enough that one pass of 4 KiB random reads is seconds, not a blink.
    let file_mib = if plan.quick { 128 } else { 1024 };
    let bytes = (2 * file_mib + 256) * MIB;
    let plain = up(csi, ws, "plain", false, bytes).await?;
    let encrypted = match up(csi, ws, "fscrypt", true, bytes).await {
        Ok(s) => s,
        Err(e) => {
            let _ = down(csi, &plain).await;
            return Err(e);
        }
    };
    let result = measure(
        plan,
        engine,
        file_mib,
        &plain.paths.target,
        &encrypted.paths.target,
    )
    .await;
    let a = down(csi, &plain).await;
    let b = down(csi, &encrypted).await;
    let rows = result?;
    a?;
    b?;
    Ok(Encryption {
        volume: format!(
            "{} MiB ext4 thin volumes staged and published by loopvol, one with `encryption: \
             fscrypt` (AES-256-XTS contents, AES-256-CTS names), fio engine {engine}",
            bytes >> 20
        ),
        file_mib,
        repetitions: plan.fio_repetitions.min(3),
        rows,
    })
}

async fn measure(
    plan: &Plan,
    engine: &'static str,
    file_mib: u64,
    plain: &Path,
    encrypted: &Path,
) -> anyhow::Result<Vec<EncryptionRow>> {
    for dir in [plain, encrypted] {
        let d = dir.to_path_buf();
        blocking(move || fio::lay_out(&d, engine, file_mib)).await?;
    }
    let reps = plan.fio_repetitions.min(3);
    let mut rows = Vec::new();
    for job in JOBS {
        let mut runs: [Vec<Cost>; 2] = [Vec::new(), Vec::new()];
        for rep in 0..reps {
            eprintln!("  {} (run {} of {reps})", job.name, rep + 1);
            for k in 0..2 {
                let slot = (k + rep) % 2;
                let dir = [plain, encrypted][slot].to_path_buf();
                let c = blocking(move || one_pass(&job, &dir, engine, file_mib)).await?;
                runs[slot].push(c);
            }
        }
        let [p, e] = runs;
        rows.push(EncryptionRow {
            job: job.name.to_string(),
            plain: median_cost(&p),
            encrypted: median_cost(&e),
            plain_runs: p,
            encrypted_runs: e,
        });
    }
    Ok(rows)
}

/// One pass of `job` over the data file, with its costs.
fn one_pass(job: &Job, dir: &Path, engine: &str, file_mib: u64) -> anyhow::Result<Cost> {
    let mut args = vec![
        "--name=bench".to_string(),
        format!("--directory={}", dir.display()),
        format!("--filename={}", fio::DATA_FILE),
        format!("--size={file_mib}m"),
        format!("--ioengine={engine}"),
        "--direct=1".into(),
        "--fallocate=none".into(),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.block_size),
        format!("--iodepth={}", job.iodepth),
        "--randrepeat=0".into(),
        "--output-format=json".into(),
    ];
    if !job.is_read() {
        args.push("--end_fsync=1".into());
    }
    drop_cache(&dir.join(fio::DATA_FILE))?;
    let (busy0, fio0) = (machine_busy_s()?, children_cpu_s());
    let started = Instant::now();
    crate::tools::run("fio", &args)
        .with_context(|| format!("fio {} in {}", job.name, dir.display()))?;
    let wall = started.elapsed().as_secs_f64();
    let (busy1, fio1) = (machine_busy_s()?, children_cpu_s());
    let gib = file_mib as f64 / 1024.0;
    let block = if job.block_size == "4k" {
        4096.0
    } else {
        MIB as f64
    };
    Ok(Cost {
        mib_s: file_mib as f64 / wall,
        iops: (file_mib * MIB) as f64 / block / wall,
        fio_cpu_s_per_gib: (fio1 - fio0) / gib,
        machine_cpu_s_per_gib: (busy1 - busy0) / gib,
    })
}

/// Write back and drop the data file's page cache (fio's own `invalidate` skips O_DIRECT
/// files, but an fscrypt file's O_DIRECT reads are served from that cache).
fn drop_cache(file: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?;
    f.sync_all()?;
    // SAFETY: an advisory call on a descriptor we hold.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(rc == 0, "posix_fadvise {}: error {rc}", file.display());
    // The premise of every read figure: nothing of the file is left in memory.
    let resident = crate::tools::run(
        "fincore",
        [
            "--bytes".as_ref(),
            "--noheadings".as_ref(),
            "--output".as_ref(),
            "RES".as_ref(),
            file.as_os_str(),
        ],
    )?;
    let resident: u64 = resident.trim().parse().unwrap_or(u64::MAX);
    anyhow::ensure!(
        resident <= MIB,
        "{} still has {resident} bytes in the page cache after dropping it",
        file.display()
    );
    Ok(())
}

fn median_cost(runs: &[Cost]) -> Cost {
    let m = |f: fn(&Cost) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
    Cost {
        mib_s: m(|c| c.mib_s),
        iops: m(|c| c.iops),
        fio_cpu_s_per_gib: m(|c| c.fio_cpu_s_per_gib),
        machine_cpu_s_per_gib: m(|c| c.machine_cpu_s_per_gib),
    }
}

/// User + system CPU seconds of this process's waited-for children (fio).
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given and nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Busy CPU seconds of the whole machine since boot (all cores): user, nice, system, irq,
/// softirq and steal from /proc/stat's `cpu` line, in USER_HZ (100 per second).
fn machine_busy_s() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|s| s.parse().unwrap_or(0.0))
        .collect();
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| v.get(i).copied().unwrap_or(0.0))
        .sum::<f64>();
    Ok(busy / 100.0)
}
