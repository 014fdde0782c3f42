//! NodeExpandVolume: grow the device to the image's new size, then the filesystem.

use super::stats::{ensure_volume_at, volume_path};
use super::volume::*;
use super::Engine;
use crate::error::{Error, Result};
use crate::fs::format;
use crate::fs::mount::{self};
use crate::node_state::{self, StagedAccess};

/// Grow the loop device to the backing file's new size and the filesystem to the device.
pub fn expand(d: &Engine, id: &str, path: &str, block_hint: bool) -> Result<u64> {
    let vol = volume(d, id)?;
    let _g = hold(&vol)?;
    let path = volume_path(d, path)?;
    let state = node_state::load(&vol.pool.node_state_dir(), &vol.hex)?;
    let l = current_loop(d, &vol, state.as_ref().map(|s| s.device.as_path())).ok_or_else(|| {
        Error::FailedPrecondition(format!("volume {id} is not staged on this node"))
    })?;
    ensure_volume_at(d, &vol, Some(&l.device), &path)?;
    let size = d.data_path.refresh_capacity(&l.device)?;
    match state {
        Some(s) if !block_hint => {
            if let StagedAccess::Mount { fs_type, .. } = s.access {
                // xfs and btrfs grow through a mount point: one this process can see.
                let at = visible_mount(&s, &l, &mount::MountView::new())?
                    .map_or(path, |m| m.mount_point);
                format::grow(fs_type, &l.device, &at)?;
            }
        }
        _ => {}
    }
    tracing::info!(volume_id = id, size, "volume expanded on node");
    Ok(size)
}
