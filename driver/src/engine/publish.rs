//! NodePublishVolume and NodeUnpublishVolume: bind the staged filesystem (or the device node,
//! for raw block) at the pod's target, and take it away again.

use std::path::{Path, PathBuf};

use super::access::{Access, Checked};
use super::volume::*;
use super::Engine;
use crate::datapath::blockdev;
use crate::error::{Error, Result};
use crate::fs::mount::{self};
use crate::fs::mount_options;
use crate::node_state::{self, StagedAccess};

pub fn publish(
    d: &Engine,
    id: &str,
    staging: &Path,
    target: &Path,
    cap: &Checked,
    readonly: bool,
) -> Result<()> {
    let vol = volume(d, id)?;
    let _g = hold(d, &vol)?;
    let not_staged = || {
        Error::FailedPrecondition(format!(
            "volume {id} is not staged at {}; call NodeStageVolume first",
            staging.display()
        ))
    };
    let mut state = node_state::load(&d.pool.node_state_dir(), &vol.hex)?.ok_or_else(not_staged)?;
    let l = current_loop(d, &vol, Some(&state.device));
    // One read of the mount table for the whole check.
    let all = mount::mounts()?;
    if !same_path(&state.staging_path, staging) {
        match &l {
            Some(l) if staged_at(&state, staging, l, &all) => {
                rehome(d, &vol, &mut state, staging, l)?
            }
            _ => return Err(not_staged()),
        }
    }
    let Some(l) = l else {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} is not attached on this node (rebooted?); stage it again"
        )));
    };
    let read_only = readonly || cap.read_only();
    match (&cap.access, &state.access) {
        (Access::Mount { flags, .. }, StagedAccess::Mount { .. }) => {
            let staged = mount::topmost_at(&all, staging)
                .filter(|m| m.is_from(l.dev))
                .ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "staging path {} is not mounted; stage volume {id} again",
                        staging.display()
                    ))
                })?;
            if let Some(m) = mount::topmost_at(&all, target) {
                if (m.major, m.minor) == (staged.major, staged.minor) && m.read_only() == read_only
                {
                    return Ok(());
                }
                return Err(Error::AlreadyExists(format!(
                    "{} is already a mount point with a different volume or access",
                    target.display()
                )));
            }
            single_writer_check(cap, id, other_mounts_of(&all, &l, &staged))?;
            let at = crate::engine::targets::prepare_dir(d, &vol.hex, target)?;
            let (bits, _) = mount_options::split_flags(flags);
            crate::engine::paths::bind_dir(&d.paths, staging, &at, read_only, bits)
                .inspect_err(|_| crate::engine::targets::undo(d, &vol.hex, &at))?;
        }
        (Access::Block, StagedAccess::Block) => {
            if read_only && !l.read_only {
                return Err(Error::FailedPrecondition(format!(
                    "a read-only raw block publish needs volume {id} staged read-only \
                     (access mode SINGLE_NODE_READER_ONLY): a read-only bind of a device node \
                     does not stop writes to the device"
                )));
            }
            if mount::topmost_at(&all, target).is_some() {
                if blockdev::rdev_of(target) == Some(l.dev) {
                    return Ok(());
                }
                return Err(Error::AlreadyExists(format!(
                    "{} is already a mount point of another device",
                    target.display()
                )));
            }
            single_writer_check(cap, id, device_binds(&all, &l))?;
            let at = crate::engine::targets::prepare_file(d, &vol.hex, target)?;
            mount::bind_only(&l.device, &at.proc_path(), &l.device, target)
                .inspect_err(|_| crate::engine::targets::undo(d, &vol.hex, &at))?;
        }
        _ => {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} was staged for {:?} access but publish asks for another access type",
                state.access
            )))
        }
    }
    tracing::info!(volume_id = id, target = %target.display(), read_only, "volume published");
    Ok(())
}

/// SINGLE_NODE_SINGLE_WRITER allows one publication on the node: a second target (the
/// same target was already answered as idempotent) is FAILED_PRECONDITION, as the spec says.
fn single_writer_check(cap: &Checked, id: &str, published: Vec<PathBuf>) -> Result<()> {
    use crate::csi::volume_capability::access_mode::Mode;
    if cap.mode == Mode::SingleNodeSingleWriter && !published.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} has access mode SINGLE_NODE_SINGLE_WRITER and is already published at \
             {published:?}"
        )));
    }
    Ok(())
}

pub fn unpublish(d: &Engine, id: &str, target: &Path) -> Result<()> {
    let vol = volume(d, id)?;
    let _g = hold(d, &vol)?;
    let dev = current_loop(d, &vol, remembered_device(d, &vol).as_deref()).map(|l| l.dev);
    for _ in 0..8 {
        let Some(m) = mount::mount_at(target)? else {
            break;
        };
        // The volume's filesystem (a bind of its staging mount), or its device node (raw
        // block), by device number: the mount may have been made from another mount namespace.
        let ours = dev.is_some_and(|dev| m.is_from(dev) || blockdev::rdev_of(target) == Some(dev));
        if !ours {
            return Err(Error::FailedPrecondition(format!(
                "{} has a mount that is not volume {id}; not touching it",
                target.display()
            )));
        }
        mount::unmount(target)?;
    }
    crate::engine::targets::remove_if_ours(d, &vol.hex, target)?;
    tracing::info!(volume_id = id, target = %target.display(), "volume unpublished");
    Ok(())
}
