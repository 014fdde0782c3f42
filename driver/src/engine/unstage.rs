//! NodeUnstageVolume: unmount the staging path and detach every device over the image, but
//! only once nothing else uses the volume.

use std::path::{Path, PathBuf};

use super::steps::Steps;
use super::volume::*;
use super::Engine;
use crate::datapath::blockdev;
use crate::error::{Error, Result};
use crate::fs::mount::{self, MountView};
use crate::node_state::{self, StagedAccess};

pub fn unstage(d: &Engine, id: &str, staging: &Path) -> Result<()> {
    let mut steps = Steps::start();
    let vol = volume(d, id)?;
    let _g = hold(&vol)?;
    let state_dir = vol.pool.node_state_dir();
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
    steps.mark("lookup");
    let mounts = MountView::new();
    if let Some(st) = &record {
        // Staged at another path, unless the recorded path shows nothing to this process and
        // the volume is found at the path asked (see `staged_at`).
        let mut here = same_path(&st.staging_path, staging);
        for l in &loops {
            if here {
                break;
            }
            here = staged_at(st, staging, l, &mounts)?;
        }
        if !here {
            // Not staged at this path: nothing here is ours to undo (the spec's idempotent OK),
            // and the real staging elsewhere must stay attached.
            tracing::info!(volume_id = id, staged_at = %st.staging_path.display(),
                asked = %staging.display(), "unstage of a path where the volume is not staged");
            return Ok(());
        }
    }
    let staged_mount = mounts.at(staging)?;
    // Refuse while anything still uses the volume, before changing anything. A mounted volume
    // whose staging record says so needs no look at the whole mount table for that: every
    // other mount of its filesystem (a publish, in this or any mount namespace) keeps the
    // superblock and so the device claimed once the staging mount is gone, and the kernel says
    // so below. Raw block publishes (binds of the device node) claim nothing, so a block
    // volume, or one with no record to say how it was staged, is checked against the table.
    let mounted = matches!(
        record.as_ref().map(|r| &r.access),
        Some(StagedAccess::Mount { .. })
    );
    if !mounted {
        let all = mounts.all()?;
        for l in &loops {
            let binds = device_binds(all, l);
            if !binds.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "block volume {id} is still published at {}; unpublish it first",
                    crate::shared::paths_list(&binds)
                )));
            }
            let elsewhere = other_mounts_of(all, l, staged_mount.as_ref());
            if !elsewhere.is_empty() {
                return Err(still_mounted(id, &elsewhere, staging));
            }
        }
    }
    steps.mark("mounts");
    if let Some(m) = &staged_mount {
        if !loops.iter().any(|l| m.is_from(l.dev)) {
            return Err(Error::FailedPrecondition(format!(
                "{} has {} mounted, which is not volume {id}; not touching it",
                staging.display(),
                m.source
            )));
        }
        if vol.record.encryption.is_some() {
            lock_before_unmount(id, staging, &loops, &mounts, m)?;
            steps.mark("lock");
        }
        mount::unmount(staging)?;
    }
    steps.mark("unmount");
    for l in &loops {
        if blockdev::claimed(&l.device) {
            // Still mounted somewhere: detaching would pull the device out from under a live
            // filesystem. Put the staging mount back, so that a refusal changes nothing (the
            // table only names the other mounts: failing to read it must not skip that).
            let mut refusal = match other_mounts_of(&mount::mounts().unwrap_or_default(), l, None) {
                e if !e.is_empty() => still_mounted(id, &e, staging),
                _ => Error::FailedPrecondition(format!(
                    "volume {id} is mounted from {} somewhere this node plugin cannot see \
                     (another mount namespace); unmount it there first",
                    l.device.display()
                )),
            };
            if let (Some(m), Some(st)) = (&staged_mount, &record) {
                if m.is_from(l.dev) {
                    if let Err(e) = super::stage::mount_again(d, &l.device, staging, st) {
                        tracing::error!(volume_id = id, error = %e, "could not mount the staging path again after a refused unstage");
                        refusal = Error::FailedPrecondition(format!(
                            "{refusal}; its staging path {} could not be mounted again ({e}): \
                             stage it again after unmounting it elsewhere",
                            staging.display()
                        ));
                    }
                }
            }
            return Err(refusal);
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
        let all = mounts.all()?;
        if blockdev::claimed(&l.device)
            || !mount::of_device(all, l.dev).is_empty()
            || !mount::device_node_binds(all, l.dev).is_empty()
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
    steps.mark("detach");
    node_state::remove(&state_dir, &vol.hex)?;
    crate::engine::targets::forget(d, &vol.hex)?;
    steps.mark("record");
    tracing::info!(volume_id = id, staging = %staging.display(), ms = %steps, "volume unstaged");
    Ok(())
}

/// Remove an encrypted volume's key while its staging mount still gives a way to name the
/// filesystem (design §3: nothing stays readable in the kernel). Taking the key changes what
/// every other mount of the filesystem shows, so it is done only once the mount table shows
/// none (the refusal then changes nothing); mounts hidden in another mount namespace are
/// found by the claimed-device check after the unmount, as for any volume, and a stage adds
/// the key back.
fn lock_before_unmount(
    id: &str,
    staging: &Path,
    loops: &[crate::datapath::Attachment],
    mounts: &MountView,
    staged: &mount::MountEntry,
) -> Result<()> {
    let all = mounts.all()?;
    for l in loops {
        let elsewhere = other_mounts_of(all, l, Some(staged));
        if !elsewhere.is_empty() {
            return Err(still_mounted(id, &elsewhere, staging));
        }
    }
    super::encryption::lock(id, staging).map(drop)
}

fn still_mounted(id: &str, at: &[PathBuf], staging: &Path) -> Error {
    Error::FailedPrecondition(format!(
        "volume {id} is still mounted at {}, not only at {}; unpublish it first (not \
         detaching it)",
        crate::shared::paths_list(at),
        staging.display()
    ))
}
