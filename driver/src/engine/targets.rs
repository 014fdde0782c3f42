//! The publish targets loopvol itself created, so that NodeUnpublishVolume removes those and
//! nothing else. Before, unpublish removed whatever file or empty directory sat at
//! `target_path`, mounted or not, published or not.
//!
//! When NodePublishVolume creates a target (the directory of a mount publish, the file of a raw
//! block one), it records the target's path, kind, device and inode in
//! `<pool>/node/<hex>.targets`. Unpublish removes a target only if that volume's record names
//! it and the same inode is still there, unmounted, and empty: an empty directory
//! (`unlinkat(AT_REMOVEDIR)` refuses any other) or a zero-length regular file. Anything else is
//! left as it is and unpublish still succeeds, as the spec's idempotency asks.
//!
//! A driver killed between creating a target and recording it leaves an empty directory that
//! it will not remove; the kubelet removes what is left at its targets after unpublish.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::unistd::UnlinkatFlags;
use serde::{Deserialize, Serialize};

use crate::engine::paths::Opened;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fs::mount;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Dir,
    File,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Made {
    path: PathBuf,
    kind: Kind,
    dev: u64,
    ino: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    targets: Vec<Made>,
}

fn record_path(node_dir: &Path, hex: &str) -> PathBuf {
    node_dir.join(format!("{hex}.targets"))
}

fn load(node_dir: &Path, hex: &str) -> Record {
    std::fs::read(record_path(node_dir, hex))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Atomic but not durable, like staging records: a target loopvol made outlives a power cut,
/// but the kubelet removes leftover targets itself.
fn save(node_dir: &Path, hex: &str, r: &Record) -> Result<()> {
    let path = record_path(node_dir, hex);
    let res = if r.targets.is_empty() {
        provisioner::atomic::remove_file_unsynced(&path).map(drop)
    } else {
        let bytes = serde_json::to_vec_pretty(r).expect("target records serialise");
        provisioner::atomic::write_file_unsynced(&path, &bytes)
    };
    res.map_err(|e| Error::io(format!("write {}", path.display()), e))
}

fn remember(d: &Engine, hex: &str, at: &Opened, kind: Kind) -> Result<()> {
    let node_dir = d.pool.node_state_dir();
    let (dev, ino) = at.id()?;
    let mut r = load(&node_dir, hex);
    r.targets.retain(|m| m.path != at.path);
    r.targets.push(Made {
        path: at.path.clone(),
        kind,
        dev,
        ino,
    });
    save(&node_dir, hex, &r)
}

/// The directory to bind a mount publish onto, created (and recorded) if missing.
pub fn prepare_dir(d: &Engine, hex: &str, target: &Path) -> Result<Opened> {
    let at = d.paths.open_dir("target_path", target, true)?;
    if at.created {
        remember(d, hex, &at, Kind::Dir)?;
    }
    Ok(at)
}

/// The file to bind a raw block publish onto, created (and recorded) if missing.
pub fn prepare_file(d: &Engine, hex: &str, target: &Path) -> Result<Opened> {
    let at = d.paths.open_file("target_path", target, true)?;
    if at.created {
        remember(d, hex, &at, Kind::File)?;
    }
    Ok(at)
}

/// A publish failed after [`prepare_dir`] / [`prepare_file`]: remove what it created.
pub fn undo(d: &Engine, hex: &str, at: &Opened) {
    if at.created {
        if let Err(e) = remove_if_ours(d, hex, &at.path) {
            tracing::warn!(target = %at.path.display(), error = %e, "could not remove the target of a failed publish");
        }
    }
}

/// The volume is unstaged: none of its targets can be published any more, so records of
/// targets that unpublish never saw (removed by the kubelet) go too.
pub fn forget(d: &Engine, hex: &str) -> Result<()> {
    save(&d.pool.node_state_dir(), hex, &Record::default())
}

/// Remove `target` (already unmounted) if this volume's publish created it and it is still that
/// same, empty directory or file; otherwise leave it.
pub fn remove_if_ours(d: &Engine, hex: &str, target: &Path) -> Result<()> {
    let node_dir = d.pool.node_state_dir();
    let mut r = load(&node_dir, hex);
    let Some(i) = r.targets.iter().position(|m| m.path == target) else {
        tracing::info!(target = %target.display(), "target not created by loopvol for this volume; left alone");
        return Ok(());
    };
    if mount::is_mount_root(target) == Some(true) {
        return Err(Error::FailedPrecondition(format!(
            "{} is still a mount point; retry",
            target.display()
        )));
    }
    let made = r.targets[i].clone();
    if let Some((parent, name)) = d.paths.open_parent("target_path", target)? {
        let left = |why: &str| {
            tracing::info!(target = %target.display(), why, "target left alone");
        };
        match nix::sys::stat::fstatat(parent.fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(Error::io(format!("stat {}", target.display()), e)),
            Ok(st) if (st.st_dev, st.st_ino) != (made.dev, made.ino) => {
                left("replaced since loopvol created it")
            }
            Ok(st) => {
                let fmt = st.st_mode & libc::S_IFMT;
                let flag = match made.kind {
                    Kind::Dir if fmt == libc::S_IFDIR => Some(UnlinkatFlags::RemoveDir),
                    Kind::File if fmt == libc::S_IFREG && st.st_size == 0 => {
                        Some(UnlinkatFlags::NoRemoveDir)
                    }
                    _ => None,
                };
                match flag.map(|f| nix::unistd::unlinkat(parent.fd(), name.as_os_str(), f)) {
                    None => left("no longer the empty file loopvol made"),
                    Some(Ok(())) | Some(Err(Errno::ENOENT)) => {}
                    Some(Err(Errno::ENOTEMPTY | Errno::EEXIST)) => left("not empty"),
                    Some(Err(Errno::EBUSY)) => {
                        return Err(Error::FailedPrecondition(format!(
                            "{} is busy; retry",
                            target.display()
                        )))
                    }
                    Some(Err(e)) => {
                        return Err(Error::io(format!("remove {}", target.display()), e))
                    }
                }
            }
        }
    }
    r.targets.remove(i);
    save(&node_dir, hex, &r)
}
