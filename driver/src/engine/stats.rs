//! NodeGetVolumeStats: usage of a staged or published volume, once the path is proved to be it.

use std::path::{Path, PathBuf};

use super::volume::*;
use super::Engine;
use crate::csi::volume_usage::Unit;
use crate::csi::VolumeUsage;
use crate::datapath::{blockdev, Attachment};
use crate::error::{Error, Result};
use crate::fs::mount::{self};
use crate::node_state::{self};

/// The volume_path of stats and expand requests: the spec's answer for a path where the
/// volume cannot be (relative, `..`, missing) is NOT_FOUND, not INVALID_ARGUMENT. A path
/// loopvol never mounts on (outside the allowed roots, the pool, through a symlink) is
/// INVALID_ARGUMENT, as for stage and publish.
pub(super) fn volume_path(d: &Engine, s: &str) -> Result<PathBuf> {
    let p = check_path("volume_path", s).map_err(|e| match e {
        Error::InvalidArgument(m) if !s.contains('\0') && s.len() <= 4096 => Error::NotFound(m),
        e => e,
    })?;
    d.paths.check("volume_path", &p)?;
    if !p.exists() {
        return Err(Error::NotFound(format!(
            "volume_path {} does not exist",
            p.display()
        )));
    }
    Ok(p)
}

/// Is `path` where this volume is staged or published (its filesystem, or its device node)?
/// Another volume's path is NOT_FOUND, so stats and expansion never act on the wrong volume.
/// Decided by device numbers, so it holds for mounts made by a driver in another mount
/// namespace (a container that restarted). `hint` is the device the staging record remembers,
/// asked first.
pub(super) fn ensure_volume_at(
    d: &Engine,
    vol: &Vol,
    hint: Option<&Path>,
    path: &Path,
) -> Result<Attachment> {
    let not_here = || {
        Error::NotFound(format!(
            "volume {} is not staged or published at {}",
            vol.record.id,
            path.display()
        ))
    };
    let l = current_loop(d, vol, hint).ok_or_else(not_here)?;
    if let Some(rdev) = blockdev::rdev_of(path) {
        return (rdev == l.dev).then_some(l).ok_or_else(not_here);
    }
    // kubelet asks for stats of every volume every minute: one statmount each, not a read of
    // the whole mount table.
    mount::mount_at(path)?
        .filter(|m| m.is_from(l.dev))
        .map(|_| l)
        .ok_or_else(not_here)
}

pub fn stats(d: &Engine, id: &str, path: &str) -> Result<Vec<VolumeUsage>> {
    let vol = volume(d, id)?;
    let path = &volume_path(d, path)?;
    let record = node_state::load(&vol.pool.node_state_dir(), &vol.hex)?;
    // Also proves that `path` is a mount point of this volume, or its device node.
    ensure_volume_at(d, &vol, record.as_ref().map(|s| s.device.as_path()), path)?;
    if blockdev::rdev_of(path).is_some() {
        let total = blockdev::size_of(path)? as i64;
        return Ok(vec![VolumeUsage {
            available: 0,
            total,
            used: 0,
            unit: Unit::Bytes as i32,
        }]);
    }
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::io(format!("statvfs {}", path.display()), e))?;
    let f = st.fragment_size() as i64;
    Ok(vec![
        VolumeUsage {
            total: st.blocks() as i64 * f,
            available: st.blocks_available() as i64 * f,
            used: (st.blocks() - st.blocks_free()) as i64 * f,
            unit: Unit::Bytes as i32,
        },
        VolumeUsage {
            total: st.files() as i64,
            available: st.files_available() as i64,
            used: (st.files() - st.files_free()) as i64,
            unit: Unit::Inodes as i32,
        },
    ])
}
