//! NodePublishVolume and NodeUnpublishVolume: bind the staged filesystem (or the device node,
//! for raw block) at the pod's target, and take it away again.

use std::path::{Path, PathBuf};

use super::access::{Access, Checked};
use super::steps::Steps;
use super::volume::*;
use super::Engine;
use crate::datapath::blockdev;
use crate::error::{Error, Result};
use crate::fs::mount::{self, MountView};
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
    let mut steps = Steps::start();
    let vol = volume(d, id)?;
    let _g = hold(&vol)?;
    let not_staged = || {
        Error::FailedPrecondition(format!(
            "volume {id} is not staged at {}; call NodeStageVolume first",
            staging.display()
        ))
    };
    let mut state =
        node_state::load(&vol.pool.node_state_dir(), &vol.hex)?.ok_or_else(not_staged)?;
    let l = current_loop(d, &vol, Some(&state.device));
    steps.mark("lookup");
    // Questions about the staging and target paths are answered for those paths alone; only
    // a single-writer check asks for every mount of the device (the whole table).
    let mounts = MountView::new();
    if !same_path(&state.staging_path, staging) {
        match &l {
            Some(l) if staged_at(&state, staging, l, &mounts)? => {
                rehome(&vol, &mut state, staging, l)?
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
            let staged = mounts
                .at(staging)?
                .filter(|m| m.is_from(l.dev))
                .ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "staging path {} is not mounted; stage volume {id} again",
                        staging.display()
                    ))
                })?;
            steps.mark("mounts");
            if let Some(m) = mounts.at(target)? {
                if (m.major, m.minor) == (staged.major, staged.minor) && m.read_only() == read_only
                {
                    return Ok(());
                }
                return Err(Error::AlreadyExists(format!(
                    "{} is already a mount point with a different volume or access",
                    target.display()
                )));
            }
            single_writer_check(cap, id, || {
                Ok(other_mounts_of(mounts.all()?, &l, Some(&staged)))
            })?;
            let at = crate::engine::targets::prepare_dir(d, &vol.hex, target)?;
            let (bits, _) = mount_options::split_flags(flags);
            // An encrypted volume's pod sees only the directory under its policy.
            let source = super::encryption::pod_dir(staging, vol.record.encryption.as_ref());
            crate::engine::paths::bind_dir(&d.paths, &source, &at, read_only, bits)
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
            steps.mark("mounts");
            if mounts.at(target)?.is_some() {
                if blockdev::rdev_of(target) == Some(l.dev) {
                    return Ok(());
                }
                return Err(Error::AlreadyExists(format!(
                    "{} is already a mount point of another device",
                    target.display()
                )));
            }
            single_writer_check(cap, id, || Ok(device_binds(mounts.all()?, &l)))?;
            let at = crate::engine::targets::prepare_file(d, &vol.hex, target)?;
            mount::bind_only(&l.device, &at.proc_path(), &l.device, target)
                .inspect_err(|_| crate::engine::targets::undo(d, &vol.hex, &at))?;
        }
        _ => {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} was staged as {} but publish asks for another access type",
                state.access
            )))
        }
    }
    steps.mark("bind");
    tracing::info!(volume_id = id, target = %target.display(), read_only, ms = %steps, "volume published");
    Ok(())
}

/// SINGLE_NODE_SINGLE_WRITER allows one publication on the node: a second target (the
/// same target was already answered as idempotent) is FAILED_PRECONDITION, as the spec says.
/// `published` lists the volume's other publications; it reads the whole mount table, so it
/// is asked only in this access mode.
fn single_writer_check(
    cap: &Checked,
    id: &str,
    published: impl FnOnce() -> Result<Vec<PathBuf>>,
) -> Result<()> {
    use crate::csi::volume_capability::access_mode::Mode;
    if cap.mode != Mode::SingleNodeSingleWriter {
        return Ok(());
    }
    let published = published()?;
    if !published.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} has access mode SINGLE_NODE_SINGLE_WRITER and is already published at \
             {}",
            crate::shared::paths_list(&published)
        )));
    }
    Ok(())
}

pub fn unpublish(d: &Engine, id: &str, target: &Path) -> Result<()> {
    let mut steps = Steps::start();
    let vol = volume(d, id)?;
    let _g = hold(&vol)?;
    let dev = current_loop(d, &vol, remembered_device(&vol).as_deref()).map(|l| l.dev);
    steps.mark("lookup");
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
    steps.mark("unmount");
    crate::engine::targets::remove_if_ours(d, &vol.hex, target)?;
    steps.mark("cleanup");
    tracing::info!(volume_id = id, target = %target.display(), ms = %steps, "volume unpublished");
    Ok(())
}
