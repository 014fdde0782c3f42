//! NodeUnstageVolume: unmount the staging path and detach every device over the image, but
//! only once nothing else uses the volume.

use std::path::Path;

use super::volume::*;
use super::Engine;
use crate::datapath::blockdev;
use crate::error::{Error, Result};
use crate::fs::mount::{self};
use crate::node_state::{self};

pub fn unstage(d: &Engine, id: &str, staging: &Path) -> Result<()> {
    let vol = volume(d, id)?;
    let _g = hold(d, &vol)?;
    let state_dir = d.pool.node_state_dir();
    let record = node_state::load(&state_dir, &vol.hex)?;
    // The device the staging record remembers, checked with the kernel (one open and one
    // ioctl), or else every device backed by the image. A second device attached next to the
    // remembered one (by hand, behind loopvol's back) is found after the first is detached.
    let loops = match record
        .as_ref()
        .and_then(|r| d.data_path.attachment_at(&r.device, &vol.image))
    {
        Some(l) => vec![l],
        None => d.data_path.find_all(&vol.image),
    };
    let all = mount::mounts()?;
    if let Some(st) = &record {
        // Staged at another path, unless the recorded path shows nothing to this process and
        // the volume is found at the path asked (see `staged_at`).
        if !same_path(&st.staging_path, staging)
            && !loops.iter().any(|l| staged_at(st, staging, l, &all))
        {
            // Not staged at this path: nothing here is ours to undo (the spec's idempotent OK),
            // and the real staging elsewhere must stay attached.
            tracing::info!(volume_id = id, staged_at = %st.staging_path.display(),
                asked = %staging.display(), "unstage of a path where the volume is not staged");
            return Ok(());
        }
    }
    let staged_mount = mount::topmost_at(&all, staging);
    // Refuse while anything still uses the volume, before changing anything.
    for l in &loops {
        let binds = device_binds(&all, l);
        if !binds.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "block volume {id} is still published at {binds:?}; unpublish it first"
            )));
        }
        let elsewhere: Vec<_> = mount::of_device(&all, l.dev)
            .into_iter()
            .filter(|m| staged_mount.as_ref().is_none_or(|s| s.id != m.id))
            .map(|m| m.mount_point.clone())
            .collect();
        if !elsewhere.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still mounted at {elsewhere:?}, not only at {}; unpublish it \
                 first (not detaching it)",
                staging.display()
            )));
        }
    }
    if let Some(m) = &staged_mount {
        if !loops.iter().any(|l| m.is_from(l.dev)) {
            return Err(Error::FailedPrecondition(format!(
                "{} has {} mounted, which is not volume {id}; not touching it",
                staging.display(),
                m.source
            )));
        }
        mount::unmount(staging)?;
    }
    for l in &loops {
        if blockdev::claimed(&l.device) {
            // Mounted where this process cannot see it: detaching would pull the device out
            // from under a live filesystem.
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is mounted from {} somewhere this node plugin cannot see (another \
                 mount namespace); unmount it there first",
                l.device.display()
            )));
        }
        d.data_path.detach(&l.device)?;
    }
    // Unstage leaks no device, even one attached by hand: once the known devices are gone,
    // whatever still backs the image (free to find: with nothing holding the image open the
    // kernel says so without a scan) is detached too, or refused while something uses it.
    for l in d.data_path.find_all(&vol.image) {
        if loops.iter().any(|k| k.device == l.device) {
            // Detached above; its release waits for a holder's last close (autoclear).
            continue;
        }
        if blockdev::claimed(&l.device)
            || !mount::of_device(&all, l.dev).is_empty()
            || !mount::device_node_binds(&all, l.dev).is_empty()
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is also attached to {}, which is in use; unmount it there first",
                l.device.display()
            )));
        }
        tracing::warn!(volume_id = id, device = %l.device.display(),
            "a second loop device backed the volume (attached outside loopvol); detaching it");
        d.data_path.detach(&l.device)?;
    }
    node_state::remove(&state_dir, &vol.hex)?;
    crate::engine::targets::forget(d, &vol.hex)?;
    tracing::info!(volume_id = id, staging = %staging.display(), "volume unstaged");
    Ok(())
}
