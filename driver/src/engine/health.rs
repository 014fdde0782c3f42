//! Volume health, reported through the CSI v1.13 health RPCs (which replaced the withdrawn
//! VolumeCondition). An empty list of statuses means "nothing bad is known".

use std::cell::OnceCell;
use std::path::Path;

use provisioner::ids::Kind;
use provisioner::{Pool, Pools, VolumeId, VolumeRecord};

use crate::csi::volume_health::VolumeHealthEntry;
use crate::csi::{VolumeHealth, VolumeHealthErrorType};
use crate::fs::freeze;
use crate::fs::mount::{self, MountEntry};
use crate::node_state::{self, StagedAccess};

pub fn entry(status: VolumeHealthErrorType, reason: &str, message: String) -> VolumeHealthEntry {
    VolumeHealthEntry {
        status: status as i32,
        reason: reason.to_string(),
        message,
    }
}

/// What the pool alone can tell about a volume: is its backing file there?
pub fn pool_findings(pool: &Pool, r: &VolumeRecord) -> Vec<VolumeHealthEntry> {
    let hex = VolumeId::parse(Kind::Volume, &r.id)
        .map(|v| v.hex)
        .unwrap_or_default();
    let image = pool.image_path(&hex);
    match std::fs::metadata(&image) {
        Ok(m) if m.len() >= r.size_bytes => vec![],
        Ok(m) => vec![entry(
            VolumeHealthErrorType::Degraded,
            "BackingFileShort",
            format!(
                "backing file {} is {} bytes, the volume should be {}",
                image.display(),
                m.len(),
                r.size_bytes
            ),
        )],
        Err(_) => vec![entry(
            VolumeHealthErrorType::DataLoss,
            "BackingFileMissing",
            format!("backing file {} is missing", image.display()),
        )],
    }
}

/// A freeze that has lasted this long is worth telling about even while its copy runs: every
/// writer of the volume has been waiting that long.
pub const LONG_FREEZE: std::time::Duration = std::time::Duration::from_secs(5);

/// What the volume's freeze marker says (see `freeze`): abandoned by a dead loopvol, its
/// filesystem may be frozen and every writer stuck; held for long, writes have been blocked
/// that long by a copy in progress.
pub fn freeze_findings(node_dir: &Path, hex: &str) -> Vec<VolumeHealthEntry> {
    match freeze::state(node_dir, hex) {
        Some(freeze::State::Abandoned(m)) => {
            let at = m.as_ref().map_or_else(
                || "its staging path".into(),
                |m| m.mount.display().to_string(),
            );
            vec![entry(
                VolumeHealthErrorType::Inaccessible,
                "FilesystemFrozen",
                format!(
                    "a loopvol process died while {at} was frozen for a snapshot or clone; \
                     writes to it may hang: restart the node plugin (it thaws at start-up) \
                     or run `fsfreeze -u {at}`"
                ),
            )]
        }
        Some(freeze::State::Held(m)) if freeze::age(&m) >= LONG_FREEZE => vec![entry(
            VolumeHealthErrorType::Degraded,
            "FilesystemFrozen",
            format!(
                "{} has been frozen for {} s by a snapshot or clone in progress (process {}); \
                 writes wait until the copy ends or --freeze-timeout lifts the freeze",
                m.mount.display(),
                freeze::age(&m).as_secs(),
                m.pid
            ),
        )],
        _ => vec![],
    }
}

/// An option of the superblock (mountinfo's last field).
fn super_option(m: &MountEntry, name: &str) -> bool {
    m.super_options.split(',').any(|o| o == name)
}

/// What the kernel says about a mounted filesystem of a volume. ext4 on Linux 6.x marks a
/// filesystem it stopped writing after an error `emergency_ro` while it still reads `rw`
/// (older kernels remount it `ro`), and a shut-down one `shutdown`; ext4 counts errors in
/// `/sys/fs/ext4/<dev>/errors_count`. A journal jbd2 aborted shows in neither until the next
/// write: only in the journal superblock (`ext4_journal`). A shut-down xfs shows nothing in
/// mountinfo, but stat of its root fails with EIO.
pub fn filesystem_findings(m: &MountEntry, staged_read_only: bool) -> Vec<VolumeHealthEntry> {
    let mut out = Vec::new();
    let shutdown = super_option(m, "shutdown")
        || (m.fs_type == "xfs"
            && std::fs::metadata(&m.mount_point)
                .is_err_and(|e| e.raw_os_error() == Some(libc::EIO)));
    if shutdown {
        out.push(entry(
            VolumeHealthErrorType::Inaccessible,
            "FilesystemShutdown",
            format!(
                "the {} filesystem at {} was shut down by the kernel after errors; every \
                 access fails: unstage the volume and repair it (fsck / xfs_repair)",
                m.fs_type,
                m.mount_point.display()
            ),
        ));
    } else if super_option(m, "emergency_ro") || (m.fs_read_only() && !staged_read_only) {
        out.push(entry(
            VolumeHealthErrorType::Degraded,
            "FilesystemReadOnly",
            format!(
                "the kernel forced the filesystem at {} read-only, usually after I/O errors \
                 (a full pool, a failing disk); check the kernel log and run fsck after \
                 unstaging",
                m.mount_point.display()
            ),
        ));
    }
    if m.fs_type == "ext4" {
        if let Some(errno) = crate::fs::ext4_journal::aborted(Path::new(&m.source)) {
            out.push(entry(
                VolumeHealthErrorType::Degraded,
                "FilesystemJournalAborted",
                format!(
                    "the kernel aborted the ext4 journal on {} ({}), usually because writes \
                     failed (a full pool under a thin volume); the next write into {} fails \
                     and turns it read-only: stop its pods, unstage and run e2fsck",
                    m.source,
                    std::io::Error::from_raw_os_error(errno.saturating_neg()),
                    m.mount_point.display()
                ),
            ));
        }
        if let Some(n) = ext4_errors(&m.source).filter(|n| *n > 0) {
            out.push(entry(
                VolumeHealthErrorType::Degraded,
                "FilesystemErrors",
                format!(
                    "ext4 on {} has recorded {n} error(s) (first in {}); run e2fsck after \
                     unstaging",
                    m.source,
                    ext4_attr(&m.source, "first_error_func").unwrap_or_else(|| "?".into())
                ),
            ));
        }
    }
    out
}

fn ext4_attr(source: &str, attr: &str) -> Option<String> {
    let dev = Path::new(source).file_name()?.to_str()?;
    let v = std::fs::read_to_string(format!("/sys/fs/ext4/{dev}/{attr}")).ok()?;
    Some(v.trim().to_string())
}

fn ext4_errors(source: &str) -> Option<u64> {
    ext4_attr(source, "errors_count")?.parse().ok()
}

/// Controller-side health of the volumes of one request: the pool's findings, plus what this
/// process can see of the node (the `all` and `node` modes share the staging mounts). The
/// mount table is read once, and only if some volume is staged with a filesystem.
pub struct Inspector<'a> {
    pools: &'a Pools,
    mounts: OnceCell<Vec<MountEntry>>,
}

impl<'a> Inspector<'a> {
    pub fn new(pools: &'a Pools) -> Self {
        Inspector {
            pools,
            mounts: OnceCell::new(),
        }
    }

    /// The findings for `r`, from the pool its ID names.
    pub fn of_volume(&self, r: &VolumeRecord) -> VolumeHealth {
        let pool = self
            .pools
            .owner(Kind::Volume, &r.id)
            .ok()
            .flatten()
            .unwrap_or(self.pools.default_pool());
        let mut statuses = pool_findings(pool, r);
        if let Some(hex) = VolumeId::parse(Kind::Volume, &r.id).map(|v| v.hex) {
            let node_dir = pool.node_state_dir();
            statuses.extend(freeze_findings(&node_dir, &hex));
            statuses.extend(self.staged_findings(pool, &node_dir, &hex));
        }
        VolumeHealth {
            volume_id: r.id.clone(),
            health_statuses: statuses,
        }
    }

    fn staged_findings(&self, pool: &Pool, node_dir: &Path, hex: &str) -> Vec<VolumeHealthEntry> {
        let Some(s) = node_state::load(node_dir, hex).ok().flatten() else {
            return vec![];
        };
        if !matches!(s.access, StagedAccess::Mount { .. }) {
            return vec![];
        }
        let all = self
            .mounts
            .get_or_init(|| mount::mounts().unwrap_or_default());
        let image = pool.image_path(hex);
        match mount::topmost_at(all, &s.staging_path) {
            Some(m)
                if crate::datapath::default_path()
                    .attachment_at(Path::new(&m.source), &image)
                    .is_some() =>
            {
                filesystem_findings(&m, s.read_only)
            }
            _ => vec![],
        }
    }
}

pub fn of_volume(pools: &Pools, r: &VolumeRecord) -> VolumeHealth {
    Inspector::new(pools).of_volume(r)
}
