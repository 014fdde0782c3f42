//! Where a volume is, as this process sees it: its record and image, its attachment (found
//! through the data path, with the staging record's device as the hint), and whether a path
//! shows it. Shared by every node operation.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fs::mount::{self, MountEntry, MountView};
use crate::node_state::{self, Staged, StagedAccess};
use provisioner::ids::Kind;
use provisioner::{Pool, VolumeId, VolumeRecord};

use super::access::{Access, Checked};
use super::Engine;
use crate::datapath::Attachment;

/// A volume of one of this node's pools, resolved from a request's volume_id.
pub struct Vol {
    /// The pool the ID names: its image, records and node-side state.
    pub pool: Arc<Pool>,
    pub record: VolumeRecord,
    pub hex: String,
    pub image: PathBuf,
}

/// The one lookup every node operation makes: the pool from the ID, then the record.
pub fn volume(d: &Engine, id: &str) -> Result<Vol> {
    let pool = d.pools.for_id(Kind::Volume, id)?.clone();
    let record = pool.get(id)?;
    let hex = VolumeId::parse(Kind::Volume, id)
        .map(|v| v.hex)
        .ok_or_else(|| Error::Internal(format!("record of {id} has a malformed id")))?;
    let image = pool.image_path(&hex);
    Ok(Vol {
        pool,
        record,
        hex,
        image,
    })
}

/// Paths from the CO are not ours to confine, but they must be plain absolute paths: no `..`,
/// no NUL, bounded length.
pub fn check_path(field: &str, s: &str) -> Result<PathBuf> {
    let bad = |why: &str| Err(Error::InvalidArgument(format!("{field} {why}")));
    if s.is_empty() {
        return bad("is required");
    }
    if s.len() > 4096 {
        return bad("is longer than PATH_MAX");
    }
    if s.contains('\0') {
        return bad("contains a NUL byte");
    }
    let p = Path::new(s);
    if !p.is_absolute() {
        return bad("must be an absolute path");
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return bad("must not contain '..'");
    }
    if p.components().any(|c| c.as_os_str().len() > 255) {
        return bad("has a path component longer than NAME_MAX (255 bytes)");
    }
    Ok(p.to_path_buf())
}

pub(super) fn hold(vol: &Vol) -> Result<provisioner::keyed_lock::KeyGuard> {
    vol.pool.try_lock_volume(&vol.hex).ok_or_else(|| {
        Error::Aborted(format!(
            "another operation on volume {} is in progress; retry",
            vol.record.id
        ))
    })
}

pub(super) fn staged_access(cap: &Checked, record: &VolumeRecord) -> StagedAccess {
    match &cap.access {
        Access::Block => StagedAccess::Block,
        Access::Mount { fs_type, flags } => StagedAccess::Mount {
            fs_type: fs_type.unwrap_or(record.fs_type),
            flags: flags.clone(),
        },
    }
}

/// The loop device currently backed by the volume's image, if any, found by the image's
/// identity. `hint` is the device the staging record remembers: checking it is one open and
/// one ioctl, where a scan asks every attached loop device on the machine (thousands on a full
/// node, on every publish and unpublish).
pub(super) fn current_loop(d: &Engine, vol: &Vol, hint: Option<&Path>) -> Option<Attachment> {
    d.data_path.find(&vol.image, hint)
}

/// The loop device volume `id` is attached to on this node right now, if any.
pub fn attached_device(d: &Engine, id: &str) -> Result<Option<PathBuf>> {
    let vol = volume(d, id)?;
    Ok(current_loop(d, &vol, remembered_device(&vol).as_deref()).map(|l| l.device))
}

/// The device this node's staging record remembers for the volume, if any.
pub(super) fn remembered_device(vol: &Vol) -> Option<PathBuf> {
    node_state::load(&vol.pool.node_state_dir(), &vol.hex)
        .ok()
        .flatten()
        .map(|s| s.device)
}

pub(super) fn same_path(a: &Path, b: &Path) -> bool {
    a == b || mount::canonical(a) == mount::canonical(b)
}

/// Does the staging path in record `s` still show the staged volume to this process? It may
/// not: the record was written by whichever driver staged the volume, and a driver in another
/// mount namespace (a node plugin container that restarted, with the kubelet directory
/// bind-mounted elsewhere) saw its own paths. Mount access: that path has the volume's
/// filesystem mounted. Block access (nothing is mounted at staging): the path exists.
pub(super) fn record_path_visible(s: &Staged, l: &Attachment, mounts: &MountView) -> Result<bool> {
    Ok(match s.access {
        StagedAccess::Block => s.staging_path.exists(),
        StagedAccess::Mount { .. } => mounts
            .at(&s.staging_path)?
            .is_some_and(|m| m.is_from(l.dev)),
    })
}

/// Is `path` where the volume of record `s`, attached to `l`, is staged, as this process sees
/// it? Where the record says, or, when the record's path shows nothing here (see
/// [`record_path_visible`]), wherever the CO now says, provided the volume's filesystem is
/// mounted there (mount access).
pub(super) fn staged_at(
    s: &Staged,
    path: &Path,
    l: &Attachment,
    mounts: &MountView,
) -> Result<bool> {
    let mounted_here = || -> Result<bool> {
        Ok(match s.access {
            StagedAccess::Block => true,
            StagedAccess::Mount { .. } => mounts
                .at(path)?
                .is_some_and(|m| m.is_from(l.dev) && m.is_fs_root()),
        })
    };
    if same_path(&s.staging_path, path) {
        return mounted_here();
    }
    Ok(!record_path_visible(s, l, mounts)? && mounted_here()?)
}

/// Where this process can reach the volume's filesystem: the recorded staging path if it
/// shows the volume here, else any mount of the filesystem's root (the kernel has one
/// superblock per device, so freezing or growing through any of them acts on all).
pub(super) fn visible_mount(
    s: &Staged,
    l: &Attachment,
    mounts: &MountView,
) -> Result<Option<MountEntry>> {
    if let Some(m) = mounts.at(&s.staging_path)?.filter(|m| m.is_from(l.dev)) {
        return Ok(Some(m));
    }
    Ok(mount::of_device(mounts.all()?, l.dev)
        .into_iter()
        .find(|m| m.is_fs_root())
        .cloned())
}

/// Point the staging record at `staging`, where the volume was found staged under another
/// path than the one recorded (the driver that recorded it lived in another mount namespace).
pub(super) fn rehome(vol: &Vol, s: &mut Staged, staging: &Path, l: &Attachment) -> Result<()> {
    if s.staging_path == staging && s.device == l.device {
        return Ok(());
    }
    tracing::info!(volume_id = %s.volume_id, recorded = %s.staging_path.display(),
        staging = %staging.display(), device = %l.device.display(),
        "staging record re-adopted: the volume is staged here under another path than recorded");
    s.staging_path = staging.to_path_buf();
    s.device = l.device.clone();
    node_state::save(&vol.pool.node_state_dir(), &vol.hex, s)
}

/// Mounts sharing the staged filesystem other than the staging mount `staged` itself (its
/// publishes, or every mount of it when there is no staging mount).
pub(super) fn other_mounts_of(
    all: &[MountEntry],
    l: &Attachment,
    staged: Option<&MountEntry>,
) -> Vec<PathBuf> {
    mount::of_device(all, l.dev)
        .into_iter()
        .filter(|m| staged.is_none_or(|s| s.id != m.id))
        .map(|m| m.mount_point.clone())
        .collect()
}

/// Bind mounts of a loop device node (raw block publishes).
pub(super) fn device_binds(all: &[MountEntry], l: &Attachment) -> Vec<PathBuf> {
    mount::device_node_binds(all, l.dev)
        .into_iter()
        .map(|m| m.mount_point.clone())
        .collect()
}
