//! Group snapshot figures for docs/benchmarks-group.md (linked from docs/benchmarks.md): on an
//! ext4 pool (no reflink: members are sparse copies) and on an xfs pool (reflink), each a fresh
//! filesystem on its own loop device, groups of 2 and 8 staged ext4 volumes, each holding
//! `--data-mib` of written data, are snapshotted together. Prints, per case, the median time of
//! CreateVolumeGroupSnapshot over the socket, the median freeze window (first freeze to last
//! thaw, from the driver's log), and a single CreateSnapshot of one member for comparison. Root.
//!
//! `cargo build --release -p loopvol-driver --bin loopvol && cargo run -p bench --release --bin group`

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::group_controller_client::GroupControllerClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::volume_capability::{access_mode, AccessMode, AccessType, MountVolume};
use loopvol::csi::*;

const MIB: u64 = 1 << 20;

#[derive(Parser)]
struct Args {
    /// The loopvol binary (default: next to this one).
    #[arg(long)]
    loopvol: Option<PathBuf>,
    /// Parent of the private temp dir holding both pool filesystems' images.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// Data written into each member before the snapshots, in MiB.
    #[arg(long, default_value_t = 64)]
    data_mib: u64,
    /// Group snapshots per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

#[path = "../side.rs"]
mod side;
use side::PoolFs;

struct Case {
    pool: &'static str,
    members: usize,
    method: String,
    group: Duration,
    frozen_ms: u64,
    single: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
    }
}

/// The `frozen_ms` of every "group snapshot created" line in the driver's log, in order.
fn freeze_windows(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("group snapshot created"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("frozen_ms="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

async fn run_pool(
    args: &Args,
    bin: &Path,
    dir: &Path,
    fs: &'static str,
) -> anyhow::Result<Vec<Case>> {
    // 8 volumes of 256 MiB plus one group of copies at a time, with room to spare.
    let pool_fs = PoolFs::new(dir, fs, 6 << 30)?;
    let pool = pool_fs.mount.join("pool");
    let sock = dir.join(format!("{fs}.sock"));
    let log_path = dir.join(format!("{fs}.log"));
    let log = File::create(&log_path)?;
    let (_driver, ch) = side::serve(
        bin,
        &pool,
        &sock,
        log,
        &["--allowed-root".as_ref(), dir.as_os_str()],
    )
    .await?;
    let mut c = ControllerClient::new(ch.clone());
    let mut n = NodeClient::new(ch.clone());
    let mut g = GroupControllerClient::new(ch);
    let mut vols = Vec::new();
    let mut staged = Vec::new();
    for i in 0..8 {
        let id = c
            .create_volume(CreateVolumeRequest {
                name: format!("m{i}"),
                capacity_range: Some(CapacityRange {
                    required_bytes: (256 * MIB) as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap()],
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .context("no volume")?
            .volume_id;
        let staging = dir.join(format!("{fs}-staging-{i}"));
        std::fs::create_dir_all(&staging)?;
        n.node_stage_volume(NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into_owned(),
            volume_capability: Some(cap()),
            ..Default::default()
        })
        .await?;
        let mut f = File::create(staging.join("data"))?;
        let chunk: Vec<u8> = (0..MIB).map(|b| (b as u8) ^ (i as u8)).collect();
        for _ in 0..args.data_mib {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        staged.push((id.clone(), staging));
        vols.push(id);
    }
    let mut cases = Vec::new();
    for members in [2usize, 8] {
        let sources = vols[..members].to_vec();
        let mut times = Vec::new();
        let before = freeze_windows(&log_path).len();
        let mut method = String::new();
        for rep in 0..args.reps {
            let started = Instant::now();
            let gs = g
                .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
                    name: format!("g{members}-{rep}"),
                    source_volume_ids: sources.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .group_snapshot
                .context("no group")?;
            times.push(started.elapsed());
            if method.is_empty() {
                let hex = gs.snapshots[0]
                    .snapshot_id
                    .split_once('-')
                    .and_then(|(_, r)| r.split_once('@'))
                    .map(|(h, _)| h.to_string())
                    .context("snapshot id")?;
                let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(
                    pool.join("snapshots").join(format!("{hex}.json")),
                )?)?;
                method = rec["method"].as_str().unwrap_or("?").to_string();
            }
            g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: gs.group_snapshot_id.clone(),
                snapshot_ids: gs.snapshots.iter().map(|s| s.snapshot_id.clone()).collect(),
                ..Default::default()
            })
            .await?;
        }
        let mut windows: Vec<u64> = freeze_windows(&log_path)[before..].to_vec();
        windows.sort();
        let frozen_ms = windows.get(windows.len() / 2).copied().unwrap_or(0);
        // One member on its own, for comparison.
        let mut singles = Vec::new();
        for rep in 0..args.reps {
            let started = Instant::now();
            let s = c
                .create_snapshot(CreateSnapshotRequest {
                    name: format!("s{members}-{rep}"),
                    source_volume_id: sources[0].clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .context("no snapshot")?;
            singles.push(started.elapsed());
            c.delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: s.snapshot_id,
                ..Default::default()
            })
            .await?;
        }
        cases.push(Case {
            pool: fs,
            members,
            method,
            group: median(times),
            frozen_ms,
            single: median(singles),
        });
    }
    for (id, staging) in &staged {
        n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into_owned(),
        })
        .await?;
    }
    Ok(cases)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = side::loopvol_bin(args.loopvol.as_deref())?;
    let dir = tempfile::Builder::new()
        .prefix("loopvol-group-")
        .tempdir_in(&args.work_dir)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut cases = Vec::new();
    for fs in ["ext4", "xfs"] {
        cases.extend(run_pool(&args, &bin, dir.path(), fs).await?);
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "Staged ext4 volumes of 256 MiB, {} MiB written in each; median of {} runs. Load \
         average before: {}; after: {}.\n",
        args.data_mib,
        args.reps,
        load.trim(),
        load_after.trim()
    );
    println!("| pool | members | copy method | CreateVolumeGroupSnapshot | freeze window (first freeze → last thaw) | CreateSnapshot of one member |");
    println!("|---|---|---|---|---|---|");
    for c in &cases {
        println!(
            "| {} | {} | {} | {:.0} ms | {} ms | {:.0} ms |",
            c.pool,
            c.members,
            c.method,
            c.group.as_secs_f64() * 1000.0,
            c.frozen_ms,
            c.single.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}
