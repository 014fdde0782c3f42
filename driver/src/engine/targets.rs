//! The publish targets loopvol itself created, so that NodeUnpublishVolume removes those and
//! nothing else. Before, unpublish removed whatever file or empty directory sat at
//! `target_path`, mounted or not, published or not.
//!
//! When NodePublishVolume creates a target (the directory of a mount publish, the file of a raw
//! block one), it marks the new inode itself with the extended attribute
//! `trusted.loopvol.target` = the volume's hex name. Unpublish removes a target only if the
//! inode at the path, unmounted, carries this volume's mark and is empty: an empty directory
//! (`unlinkat(AT_REMOVEDIR)` refuses any other) or a zero-length regular file. Anything else is
//! left as it is and unpublish still succeeds, as the spec's idempotency asks.
//!
//! Why a mark on the inode rather than a record in the pool: the mark is bound to the very
//! inode loopvol made (a directory swapped in at the path since carries none), it goes away
//! with it (the kubelet removing a target leaves nothing to forget), and setting it creates no
//! file: a record was one more file created, renamed and removed per volume lifecycle, all in
//! `<pool>/node/` under its one directory lock, which 16 parallel publishes queued on. A
//! pod cannot forge the mark: `trusted.*` attributes need CAP_SYS_ADMIN, and while published
//! the path shows the volume's root, not the target inode.
//!
//! Where the target's filesystem takes no such attribute (or the node plugin lacks the
//! capability), the target is recorded instead, with its path, kind, device and inode, in
//! `<pool>/node/<hex>.targets`, as loopvol before the mark did; such records (and those an
//! older loopvol left) are honoured the same way.
//!
//! A driver killed between creating a target and marking it leaves an empty directory that
//! it will not remove; the kubelet removes what is left at its targets after unpublish.

use std::path::{Path, PathBuf};

use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
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

/// The extended attribute that marks a target loopvol created; its value is the volume's hex.
const MARK: &str = "trusted.loopvol.target";

fn remember(d: &Engine, hex: &str, at: &Opened, kind: Kind) -> Result<()> {
    // Through the descriptor: the inode just made, whatever the path shows by now.
    match xattr::set_deref(at.proc_path(), MARK, hex.as_bytes()) {
        Ok(()) => return Ok(()),
        Err(e) => tracing::debug!(target = %at.path.display(), error = %e,
            "target cannot carry loopvol's mark; recording it in the pool instead"),
    }
    let node_dir = d.node_dir_of(hex);
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
    // Most volumes have no record (their targets carry marks): a lookup, not an unlink that
    // takes the directory's lock to find nothing.
    let node_dir = d.node_dir_of(hex);
    if std::fs::symlink_metadata(record_path(&node_dir, hex)).is_err() {
        return Ok(());
    }
    save(&node_dir, hex, &Record::default())
}

/// Remove `target` (already unmounted) if this volume's publish created it and it is still that
/// same, empty directory or file; otherwise leave it.
pub fn remove_if_ours(d: &Engine, hex: &str, target: &Path) -> Result<()> {
    let node_dir = d.node_dir_of(hex);
    let r = load(&node_dir, hex);
    let recorded = r.targets.iter().position(|m| m.path == target);
    if mount::is_mount_root(target) == Some(true) {
        // Still covered: the inode below cannot be looked at, and is not removable anyway.
        if recorded.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "{} is still a mount point; retry",
                target.display()
            )));
        }
        return left(target, "still a mount point, not loopvol's own");
    }
    // A recorded target is done with once removed, left alone or gone: its entry goes.
    let finish = |mut r: Record| match recorded {
        Some(i) => {
            r.targets.remove(i);
            save(&node_dir, hex, &r)
        }
        None => Ok(()),
    };
    let Some((parent, name)) = d.paths.open_parent("target_path", target)? else {
        return finish(r);
    };
    // What loopvol made there: the kind and inode its record names, or else the inode at the
    // path if it carries this volume's mark (opened without following a symlink, the mark read
    // through that descriptor).
    let (kind, made) = match recorded {
        Some(i) => (r.targets[i].kind, (r.targets[i].dev, r.targets[i].ino)),
        None => {
            let fd = match nix::fcntl::openat(
                parent.fd(),
                name.as_os_str(),
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => return Ok(()),
                Err(e) => return Err(Error::io(format!("open {}", target.display()), e)),
            };
            let st = nix::sys::stat::fstat(&fd)
                .map_err(|e| Error::io(format!("stat {}", target.display()), e))?;
            let kind = match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => Kind::Dir,
                libc::S_IFREG => Kind::File,
                _ => return left(target, "not a directory or file loopvol made"),
            };
            let mark =
                xattr::get_deref(format!("/proc/self/fd/{}", fd.as_raw_fd()), MARK).unwrap_or(None);
            if mark.as_deref() != Some(hex.as_bytes()) {
                return left(target, "not created by loopvol for this volume");
            }
            (kind, (st.st_dev, st.st_ino))
        }
    };
    // The name must still be that inode when it is removed.
    match nix::sys::stat::fstatat(parent.fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(Error::io(format!("stat {}", target.display()), e)),
        Ok(now) if (now.st_dev, now.st_ino) != made => {
            left(target, "replaced since loopvol created it")?
        }
        Ok(now) => remove_entry(&parent, &name, kind, &now, target)?,
    }
    finish(r)
}

fn left(target: &Path, why: &str) -> Result<()> {
    tracing::info!(target = %target.display(), why, "target left alone");
    Ok(())
}

/// Remove `name` in `parent`, whose stat is `st`, if it is still the empty directory or
/// zero-length file of `kind` loopvol made; otherwise leave it.
fn remove_entry(
    parent: &Opened,
    name: &std::ffi::OsStr,
    kind: Kind,
    st: &nix::sys::stat::FileStat,
    target: &Path,
) -> Result<()> {
    let fmt = st.st_mode & libc::S_IFMT;
    let flag = match kind {
        Kind::Dir if fmt == libc::S_IFDIR => Some(UnlinkatFlags::RemoveDir),
        Kind::File if fmt == libc::S_IFREG && st.st_size == 0 => Some(UnlinkatFlags::NoRemoveDir),
        _ => None,
    };
    match flag.map(|f| nix::unistd::unlinkat(parent.fd(), name, f)) {
        None => left(target, "no longer the empty file loopvol made"),
        Some(Ok(())) | Some(Err(Errno::ENOENT)) => Ok(()),
        Some(Err(Errno::ENOTEMPTY | Errno::EEXIST)) => left(target, "not empty"),
        Some(Err(Errno::EBUSY)) => Err(Error::FailedPrecondition(format!(
            "{} is busy; retry",
            target.display()
        ))),
        Some(Err(e)) => Err(Error::io(format!("remove {}", target.display()), e)),
    }
}
