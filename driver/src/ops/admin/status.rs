//! `loopvol status`: what a pool holds and what this node has attached and mounted from it,
//! read from the pool's files, `/sys/block` and mountinfo without taking any pool lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::datapath::{default_path, Attachment as LoopInfo, FileId};
use anyhow::{bail, Context};
use provisioner::capacity::Capacity;
use provisioner::listing::{self, Listing};
use serde::Serialize;

use super::{fs_name, print_json, Output};
use crate::fs::mount;
use crate::node_state::{self, Staged, StagedAccess};
use crate::shared::units::bytes;

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The pool directory to report on.
    #[arg(long, default_value = "/var/lib/loopvol", env = "LOOPVOL_POOL_DIR")]
    pub pool_dir: PathBuf,
    /// The driver's --overcommit-ratio, to compute how much can still be promised.
    #[arg(long, default_value_t = 1.0, value_parser = crate::shared::units::parse_overcommit_ratio)]
    pub overcommit_ratio: f64,
    /// Also report on a named pool, as the driver serves it (repeatable, the same
    /// NAME=DIR[,overcommit-ratio=R] as `serve --pool`): one report per pool, never summed.
    #[arg(long = "pool", value_name = "NAME=DIR[,OPTS]", value_parser = crate::ops::pool_args::parse_pool_spec)]
    pub pools: Vec<crate::ops::pool_args::PoolSpec>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Serialize)]
pub struct Status {
    /// The pool's name (`default` for --pool-dir).
    pub name: String,
    pub pool: PathBuf,
    /// The filesystem holding the pool (`ext4`, `xfs`, ... or a hex statfs magic).
    pub filesystem: String,
    pub capacity: CapacityView,
    pub volumes: usize,
    pub snapshots: usize,
    /// Bytes the volumes' images occupy on disk.
    pub allocated_bytes: u64,
    pub staged: Vec<StagedView>,
    pub loop_devices: Vec<LoopView>,
    /// Record files that do not parse; the driver quarantines them at its next start.
    pub unreadable_records: Vec<PathBuf>,
    /// Volumes with IO limits, and the limits.
    pub io_limits: Vec<IoLimitView>,
    /// Volumes still being filled by a restore or clone from another node.
    pub filling: Vec<FillingView>,
}

/// A volume being filled by a transfer (its record is written only once the copy is verified).
#[derive(Debug, Serialize)]
pub struct FillingView {
    pub volume_id: String,
    pub name: String,
    pub size_bytes: u64,
    pub source: String,
    /// The source node's pool API.
    pub from: String,
    pub received_bytes: u64,
    pub data_bytes: u64,
    pub state: String,
}

/// The state column of a volume being filled: `filling 45 % (460.0 MiB of 1.0 GiB)`.
pub(crate) fn filling_state(f: &provisioner::pool::transfers::Filling) -> String {
    format!(
        "filling {} % ({} of {})",
        f.percent(),
        bytes(f.allocated_bytes),
        bytes(f.record.data_bytes)
    )
}

fn filling_view(f: &provisioner::pool::transfers::Filling) -> FillingView {
    let v = &f.record.volume;
    FillingView {
        volume_id: v.id.clone(),
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        source: v.source.as_ref().map(|s| s.to_string()).unwrap_or_default(),
        from: f.record.endpoint.clone(),
        received_bytes: f.allocated_bytes,
        data_bytes: f.record.data_bytes,
        state: filling_state(f),
    }
}

#[derive(Debug, Serialize)]
pub struct IoLimitView {
    pub volume_id: String,
    pub limits: provisioner::IoLimits,
}

#[derive(Debug, Serialize)]
pub struct CapacityView {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    /// Promised to thin volumes but not yet written.
    pub reserved_bytes: u64,
    pub overcommit_ratio: f64,
    /// What new thin volumes may still be promised: available × ratio − reserved.
    pub headroom_bytes: u64,
}

/// A staging record of this node, checked against the kernel.
#[derive(Debug, Serialize)]
pub struct StagedView {
    pub volume_id: String,
    pub staging_path: PathBuf,
    /// `ext4`, `xfs`, `btrfs` or `block`.
    pub access: String,
    pub read_only: bool,
    /// The loop device backing the volume now, if any.
    pub device: Option<PathBuf>,
    /// Where the volume's filesystem is mounted, as this process sees it (the staging path and
    /// its publishes); for block access, where the device node is bound (its publishes).
    pub mounted_at: Vec<PathBuf>,
    /// `staged`; `not attached` (after a reboot: the next NodeStageVolume restores it);
    /// `staged, mounted out of sight` (mounted only in another mount namespace); or
    /// `attached, not mounted`.
    pub state: &'static str,
    /// Published somewhere this process can see (a mount or bind other than the staging path).
    pub published: bool,
    /// From the pool's freeze marker: `frozen for a copy` (a snapshot or clone is copying it
    /// now) or `frozen, its loopvol died` (the process that froze it was killed: writes hang
    /// until it is thawed). The kernel's own state cannot be read without disturbing it.
    pub frozen: Option<&'static str>,
}

impl StagedView {
    /// One phrase for the volume's state on this node, the same in `status` and `volume list`:
    /// the staging state, `published` for a staged volume with publishes, and the freeze.
    pub fn summary(&self) -> String {
        let base = if self.published && self.state == "staged" {
            "published"
        } else {
            self.state
        };
        match self.frozen {
            Some(f) => format!("{base}, {f}"),
            None => base.to_string(),
        }
    }
}

/// The state column of `volume list`: the staging record checked against the kernel as
/// `status` shows it, or for a volume not staged here, whether a loop device still holds its
/// image (a copy in progress, or one left behind: `doctor` says which).
pub(crate) fn volume_state(l: &Listing, node_dir: &Path, hex: &str) -> String {
    match node_state::load(node_dir, hex) {
        Ok(Some(s)) => staged_view(l, node_dir, hex, s).summary(),
        Ok(None) => match l
            .volume(hex)
            .and_then(|v| default_path().find(&v.image, None))
        {
            Some(_) => "attached, not staged".into(),
            None => "-".into(),
        },
        Err(_) => "unreadable staging record".into(),
    }
}

#[derive(Debug, Serialize)]
pub struct LoopView {
    pub device: PathBuf,
    /// As the kernel prints it to this process: relative to a vanished bind mount when a
    /// restarted container attached it. The volume is matched by the file's identity.
    pub backing_file: PathBuf,
    /// The backing file was deleted while attached.
    pub backing_deleted: bool,
    pub direct_io: bool,
    pub read_only: bool,
    /// The volume whose image backs the device, when it has a record.
    pub volume_id: Option<String>,
}

pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    if args.pools.is_empty() {
        let status = collect(&args.pool_dir, args.overcommit_ratio)?;
        return match args.output {
            Output::Json => print_json(&status),
            Output::Table => {
                print_table(&status);
                Ok(())
            }
        };
    }
    // Several pools: one report each (a JSON array), the default pool first.
    let mut all = Vec::new();
    if !args
        .pools
        .iter()
        .any(|p| p.name == provisioner::ids::DEFAULT_POOL)
    {
        all.push(collect(&args.pool_dir, args.overcommit_ratio)?);
    }
    for p in &args.pools {
        let mut s = collect(&p.dir, p.overcommit_ratio)?;
        s.name = p.name.clone();
        all.push(s);
    }
    match args.output {
        Output::Json => print_json(&all),
        Output::Table => {
            for (i, s) in all.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_table(s);
            }
            Ok(())
        }
    }
}

/// total − free (f_bfree), as df's "Used": total − available (f_bavail) would count the
/// blocks ext4 reserves for root (5 % by default) as used.
fn used_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let frsize = st.fragment_size() as u64;
    Some((st.blocks() as u64).saturating_sub(st.blocks_free() as u64) * frsize)
}

/// Gather the report (blocking; reads files, sysfs and mountinfo only).
pub fn collect(pool_dir: &Path, overcommit_ratio: f64) -> anyhow::Result<Status> {
    if !pool_dir.join("volumes").is_dir() {
        bail!(
            "{} is not a loopvol pool (no volumes/ directory); give --pool-dir",
            pool_dir.display()
        );
    }
    let pool = mount::canonical(pool_dir);
    let l = listing::read_records(&pool)?;
    let filling = provisioner::pool::transfers::filling(&pool);
    // A volume being filled is promised in full, as the driver counts it.
    let reserved = l.reserved_bytes() + filling.iter().map(|f| f.reserved_bytes()).sum::<u64>();
    let cap = Capacity::measure(&pool, reserved, overcommit_ratio)?;
    let loops = default_path().list_under(&pool);
    Ok(Status {
        name: provisioner::ids::DEFAULT_POOL.to_string(),
        filesystem: fs_name::of(&pool).with_context(|| format!("statfs {}", pool.display()))?,
        capacity: CapacityView {
            total_bytes: cap.total_bytes,
            available_bytes: cap.available_bytes,
            // As df counts it: blocks in use, not the blocks ext4 keeps for root.
            used_bytes: used_bytes(&pool)
                .unwrap_or(cap.total_bytes.saturating_sub(cap.available_bytes)),
            reserved_bytes: cap.reserved_bytes,
            overcommit_ratio,
            headroom_bytes: cap.headroom(),
        },
        volumes: l.volumes.len(),
        snapshots: l.snapshots.len(),
        allocated_bytes: l.volumes.iter().filter_map(|v| v.allocated_bytes()).sum(),
        staged: node_state::all(&pool.join("node"))
            .into_iter()
            .map(|(hex, s)| staged_view(&l, &pool.join("node"), &hex, s))
            .collect(),
        loop_devices: {
            let by_file = volumes_by_file(&l);
            loops
                .into_iter()
                .map(|li| loop_view(&by_file, li))
                .collect()
        },
        unreadable_records: l.unreadable.clone(),
        filling: filling.iter().map(filling_view).collect(),
        io_limits: l
            .volumes
            .iter()
            .filter(|v| !v.record.io_limits.is_empty())
            .map(|v| IoLimitView {
                volume_id: v.record.id.clone(),
                limits: v.record.io_limits,
            })
            .collect(),
        pool,
    })
}

/// A staging record next to what the kernel says about it now: the device by the image's
/// identity, the mounts by the device's number (a record written by a driver in another mount
/// namespace names paths this process may not see).
pub(crate) fn staged_view(l: &Listing, node_dir: &Path, hex: &str, s: Staged) -> StagedView {
    let lo = l
        .volume(hex)
        .and_then(|v| default_path().find(&v.image, None));
    let mounted_at: Vec<PathBuf> = match (&lo, &s.access) {
        (Some(lo), access) => mount::mounts()
            .map(|all| {
                match access {
                    StagedAccess::Mount { .. } => mount::of_device(&all, lo.dev),
                    StagedAccess::Block => mount::device_node_binds(&all, lo.dev),
                }
                .into_iter()
                .map(|m| m.mount_point.clone())
                .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let published = mounted_at.iter().any(|p| *p != s.staging_path);
    // A freeze matters only while the filesystem is attached (a reboot thawed it).
    let frozen = match lo.as_ref().and(crate::fs::freeze::state(node_dir, hex)) {
        Some(crate::fs::freeze::State::Held(_)) => Some("frozen for a copy"),
        Some(crate::fs::freeze::State::Abandoned(_)) => Some("frozen, its loopvol died"),
        None => None,
    };
    let state = match (&lo, &s.access) {
        (None, _) => "not attached",
        (Some(_), StagedAccess::Block) => "staged",
        (Some(_), StagedAccess::Mount { .. }) if !mounted_at.is_empty() => "staged",
        (Some(lo), StagedAccess::Mount { .. })
            if crate::datapath::blockdev::claimed(&lo.device) =>
        {
            "staged, mounted out of sight"
        }
        (Some(_), StagedAccess::Mount { .. }) => "attached, not mounted",
    };
    StagedView {
        volume_id: s.volume_id,
        staging_path: s.staging_path,
        access: match s.access {
            StagedAccess::Mount { fs_type, .. } => fs_type.to_string(),
            StagedAccess::Block => "block".into(),
        },
        read_only: s.read_only,
        device: lo.map(|li| li.device),
        mounted_at,
        state,
        published,
        frozen,
    }
}

/// Volume IDs by the identity of their images, to name the volume behind each loop device.
pub(crate) fn volumes_by_file(l: &Listing) -> HashMap<FileId, String> {
    l.volumes
        .iter()
        .filter_map(|v| FileId::of(&v.image).map(|id| (id, v.record.id.clone())))
        .collect()
}

pub(crate) fn loop_view(volumes: &HashMap<FileId, String>, li: LoopInfo) -> LoopView {
    LoopView {
        volume_id: li.backing.and_then(|id| volumes.get(&id).cloned()),
        device: li.device,
        backing_file: li.backing_file,
        backing_deleted: li.backing_deleted,
        direct_io: li.direct_io,
        read_only: li.read_only,
    }
}

fn print_table(s: &Status) {
    let c = &s.capacity;
    let name = match s.name.as_str() {
        provisioner::ids::DEFAULT_POOL => String::new(),
        n => format!("{n}: "),
    };
    println!("pool         {name}{} ({})", s.pool.display(), s.filesystem);
    println!(
        "capacity     {} total, {} used, {} available",
        bytes(c.total_bytes),
        bytes(c.used_bytes),
        bytes(c.available_bytes)
    );
    println!(
        "reserved     {} promised to thin volumes; overcommit ratio {}, headroom {}",
        bytes(c.reserved_bytes),
        c.overcommit_ratio,
        bytes(c.headroom_bytes)
    );
    println!(
        "volumes      {} ({} allocated)",
        s.volumes,
        bytes(s.allocated_bytes)
    );
    println!("snapshots    {}", s.snapshots);
    for p in &s.unreadable_records {
        println!("unreadable   {}", p.display());
    }
    println!();
    if s.staged.is_empty() {
        println!("staged       none");
    } else {
        println!(
            "{:<48} {:<6} {:<3} {:<12} {:<36} STAGING PATH",
            "STAGED VOLUME", "ACCESS", "RO", "DEVICE", "STATE"
        );
        for v in &s.staged {
            println!(
                "{:<48} {:<6} {:<3} {:<12} {:<36} {}",
                v.volume_id,
                v.access,
                yes_no(v.read_only),
                v.device
                    .as_deref()
                    .map_or("-".into(), |d| d.display().to_string()),
                v.summary(),
                v.staging_path.display()
            );
        }
    }
    if !s.filling.is_empty() {
        println!();
        println!("{:<48} {:<40} FROM", "FILLING VOLUME", "STATE");
        for f in &s.filling {
            println!(
                "{:<48} {:<40} {} ({})",
                f.volume_id, f.state, f.from, f.source
            );
        }
    }
    if !s.io_limits.is_empty() {
        println!();
        println!("{:<48} IO LIMITS", "VOLUME");
        for v in &s.io_limits {
            println!("{:<48} {}", v.volume_id, v.limits.describe());
        }
    }
    println!();
    if s.loop_devices.is_empty() {
        println!("loop devices none");
    } else {
        println!(
            "{:<12} {:<3} {:<3} {:<48} BACKING FILE",
            "LOOP DEVICE", "DIO", "RO", "VOLUME"
        );
        for d in &s.loop_devices {
            println!(
                "{:<12} {:<3} {:<3} {:<48} {}{}",
                d.device.display(),
                yes_no(d.direct_io),
                yes_no(d.read_only),
                d.volume_id.as_deref().unwrap_or("-"),
                d.backing_file.display(),
                if d.backing_deleted { " (deleted)" } else { "" }
            );
        }
    }
}

pub(crate) fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
