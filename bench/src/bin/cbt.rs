//! Changed-block tracking figures for docs/benchmarks.md: on an ext4 pool (chunk digests) and on
//! an xfs reflink pool (extent maps), each on a fresh filesystem of its own loop device, a
//! 10 GiB thin volume holding `--data` bytes gets 1 % of its capacity rewritten between two
//! snapshots, clustered (64 KiB writes) and scattered (4 KiB writes). Prints, per case, what a
//! full and an incremental backup read and how long the snapshot and the delta took. Root.
//!
//! `cargo build --release -p loopvol-driver --bin loopvol && cargo run -p bench --release --bin cbt`

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::snapshot_metadata_client::SnapshotMetadataClient;
use loopvol::csi::volume_capability::{access_mode, AccessMode, AccessType, BlockVolume};
use loopvol::csi::*;
use tonic::transport::Channel;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

#[derive(Parser)]
struct Args {
    /// The loopvol binary (default: next to this one).
    #[arg(long)]
    loopvol: Option<PathBuf>,
    /// Parent of the private temp dir holding both pool filesystems' images.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// Volume size in GiB.
    #[arg(long, default_value_t = 10)]
    size_gib: u64,
    /// Data written before the first snapshot, in MiB (spread over the volume).
    #[arg(long, default_value_t = 1024)]
    data_mib: u64,
}

#[path = "../side.rs"]
mod side;
use side::PoolFs;

struct Case {
    pool: &'static str,
    pattern: &'static str,
    snapshot: Duration,
    allocated_bytes: u64,
    delta_bytes: u64,
    delta_ranges: usize,
    delta_time: Duration,
    method: String,
}

async fn delta(
    m: &mut SnapshotMetadataClient<Channel>,
    base: &str,
    target: &str,
) -> anyhow::Result<(u64, usize, Duration)> {
    let t = Instant::now();
    let mut s = m
        .get_metadata_delta(GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let (mut bytes, mut n) = (0, 0);
    while let Some(msg) = s.message().await? {
        n += msg.block_metadata.len();
        bytes += msg
            .block_metadata
            .iter()
            .map(|b| b.size_bytes as u64)
            .sum::<u64>();
    }
    Ok((bytes, n, t.elapsed()))
}

async fn allocated(m: &mut SnapshotMetadataClient<Channel>, id: &str) -> anyhow::Result<u64> {
    let mut s = m
        .get_metadata_allocated(GetMetadataAllocatedRequest {
            snapshot_id: id.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut bytes = 0;
    while let Some(msg) = s.message().await? {
        bytes += msg
            .block_metadata
            .iter()
            .map(|b| b.size_bytes as u64)
            .sum::<u64>();
    }
    Ok(bytes)
}

/// xorshift: cheap, reproducible offsets and bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Rewrite `total` bytes of `img` in `piece`-sized writes at random aligned offsets.
fn scatter(img: &File, size: u64, total: u64, piece: u64, rng: &mut Rng) -> anyhow::Result<()> {
    let mut buf = vec![0u8; piece as usize];
    for _ in 0..total / piece {
        let off = rng.next() % (size / piece) * piece;
        rng.fill(&mut buf);
        img.write_all_at(&buf, off)?;
    }
    img.sync_all()?;
    Ok(())
}

async fn run_pool(
    args: &Args,
    bin: &Path,
    dir: &Path,
    fs: &'static str,
) -> anyhow::Result<Vec<Case>> {
    let size = args.size_gib * GIB;
    let pool_fs = PoolFs::new(dir, fs, size * 2 + args.data_mib * MIB * 4)?;
    let pool = pool_fs.mount.join("pool");
    let sock = dir.join(format!("{fs}.sock"));
    let log = File::create(dir.join(format!("{fs}.log")))?;
    let (_driver, ch) = side::serve(bin, &pool, &sock, log, &[]).await?;
    let mut c = ControllerClient::new(ch.clone());
    let mut m = SnapshotMetadataClient::new(ch);
    let vol = c
        .create_volume(CreateVolumeRequest {
            name: "cbt".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![VolumeCapability {
                access_mode: Some(AccessMode {
                    mode: access_mode::Mode::SingleNodeWriter as i32,
                }),
                access_type: Some(AccessType::Block(BlockVolume {})),
            }],
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("no volume")?
        .volume_id;
    let hex = vol.split_once('-').unwrap().1.split_once('@').unwrap().0;
    let img = File::options()
        .write(true)
        .open(pool.join("volumes").join(format!("{hex}.img")))?;
    // The data: 1 MiB pieces, evenly spread over the volume.
    let mut rng = Rng(0x15_0015);
    let mut buf = vec![0u8; MIB as usize];
    let stride = size / args.data_mib;
    for i in 0..args.data_mib {
        rng.fill(&mut buf);
        img.write_all_at(&buf, i * stride / MIB * MIB)?;
    }
    img.sync_all()?;
    let (snap_client, snap_source) = (c.clone(), vol.clone());
    let snapshot = move |name: &'static str| {
        let mut c = snap_client.clone();
        let source = snap_source.clone();
        async move {
            let t = Instant::now();
            let id = c
                .create_snapshot(CreateSnapshotRequest {
                    source_volume_id: source,
                    name: name.into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .context("no snapshot")?
                .snapshot_id;
            anyhow::Ok((id, t.elapsed()))
        }
    };
    let (s1, _) = snapshot("s1").await?;
    let one_percent = size / 100;
    let mut cases = Vec::new();
    let mut base = s1.clone();
    let mut pairs = Vec::new();
    for (pattern, piece, name) in [
        ("1 % in 64 KiB writes", 64 << 10, "s2"),
        ("1 % in 4 KiB writes", 4 << 10, "s3"),
    ] {
        scatter(&img, size, one_percent, piece, &mut rng)?;
        let (target, took) = snapshot(name).await?;
        let (bytes, n, t) = delta(&mut m, &base, &target).await?;
        cases.push(Case {
            pool: fs,
            pattern,
            snapshot: took,
            allocated_bytes: allocated(&mut m, &target).await?,
            delta_bytes: bytes,
            delta_ranges: n,
            delta_time: t,
            method: if fs == "xfs" { "extents" } else { "digests" }.into(),
        });
        pairs.push((base.clone(), target.clone(), pattern));
        base = target;
    }
    if fs == "ext4" {
        // Snapshots without digests: the fallback reads and compares both images.
        for (_, target, _) in &pairs {
            let h = target.split_once('-').unwrap().1.split_once('@').unwrap().0;
            let _ = std::fs::remove_file(pool.join("snapshots").join(format!("{h}.chunks")));
        }
        let h = s1.split_once('-').unwrap().1.split_once('@').unwrap().0;
        let _ = std::fs::remove_file(pool.join("snapshots").join(format!("{h}.chunks")));
        // Cold caches, as for a backup hours later.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        for (b, t, pattern) in &pairs {
            let (bytes, n, took) = delta(&mut m, b, t).await?;
            cases.push(Case {
                pool: fs,
                pattern,
                snapshot: Duration::ZERO,
                allocated_bytes: allocated(&mut m, t).await?,
                delta_bytes: bytes,
                delta_ranges: n,
                delta_time: took,
                method: "compare (no digests)".into(),
            });
        }
    }
    drop(img);
    for s in pairs.iter().map(|p| p.1.clone()).chain([s1]) {
        c.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: s,
            ..Default::default()
        })
        .await?;
    }
    c.delete_volume(DeleteVolumeRequest {
        volume_id: vol.clone(),
        ..Default::default()
    })
    .await?;
    Ok(cases)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = side::loopvol_bin(args.loopvol.as_deref())?;
    let dir = tempfile::Builder::new()
        .prefix("loopvol-cbt-")
        .tempdir_in(&args.work_dir)?;
    let mut cases = Vec::new();
    for fs in ["ext4", "xfs"] {
        cases.extend(run_pool(&args, &bin, dir.path(), fs).await?);
    }
    let size = args.size_gib * GIB;
    println!(
        "{} GiB thin volume, {} MiB of data before the first snapshot; a full image copy reads {}.\n",
        args.size_gib,
        args.data_mib,
        mib(size)
    );
    println!("| pool | change between snapshots | delta method | snapshot took | full backup reads (allocated) | incremental reads (delta) | delta ranges | delta took |");
    println!("|---|---|---|---|---|---|---|---|");
    for c in &cases {
        println!(
            "| {} | {} | {} | {} | {} | {} ({:.2} % of capacity) | {} | {:.0} ms |",
            c.pool,
            c.pattern,
            c.method,
            if c.snapshot.is_zero() {
                "".into()
            } else {
                format!("{:.2} s", c.snapshot.as_secs_f64())
            },
            mib(c.allocated_bytes),
            mib(c.delta_bytes),
            c.delta_bytes as f64 * 100.0 / size as f64,
            c.delta_ranges,
            c.delta_time.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}
