//! NodeStageVolume: attach the image, make its filesystem ready (format a blank volume, check
//! and grow an existing one) and mount it at the staging path.

use std::path::{Path, PathBuf};

use super::access::{Access, Checked};
use super::encryption::{self, SecretKey};
use super::steps::Steps;
use super::volume::*;
use super::Engine;
use crate::datapath::{blockdev, DeviceSettings};
use crate::error::{Error, Result};
use crate::fs::format;
use crate::fs::mount::{self, MountView};
use crate::fs::mount_options;
use crate::node_state::{self, Staged, StagedAccess};

/// `key` is the node-stage Secret's key entry; only an encrypted volume uses it (and refuses
/// to stage without a well-formed one, before anything is attached).
pub fn stage(d: &Engine, id: &str, staging: &Path, cap: &Checked, key: &SecretKey) -> Result<()> {
    let mut steps = Steps::start();
    let vol = volume(d, id)?;
    let _g = hold(&vol)?;
    if !vol.image.exists() {
        return Err(Error::FailedPrecondition(format!(
            "backing file {} of volume {id} is missing",
            vol.image.display()
        )));
    }
    let master = match &vol.record.encryption {
        None => None,
        Some(_) if matches!(cap.access, Access::Block) => {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is encrypted (fscrypt): it can only be staged as a mounted \
                 filesystem, not for raw block access"
            )))
        }
        Some(enc) => Some((enc, encryption::master_key(id, key)?)),
    };
    let want = Staged {
        volume_id: id.to_string(),
        staging_path: staging.to_path_buf(),
        access: staged_access(cap, &vol.record),
        read_only: cap.read_only(),
        device: PathBuf::new(),
    };
    let state_dir = vol.pool.node_state_dir();
    // A record whose staging is gone (the node rebooted, or the record outlived its unstage
    // through a power cut) describes nothing and must not block a new stage.
    if let Some(mut prev) = node_state::load(&state_dir, &vol.hex)? {
        match current_loop(d, &vol, Some(&prev.device)) {
            None => {
                tracing::info!(volume_id = id, staged_at = %prev.staging_path.display(), "staging record found but the volume is no longer attached (reboot?); staging again");
            }
            Some(l) => {
                let mounts = MountView::new();
                if !same_path(&prev.staging_path, staging)
                    && record_path_visible(&prev, &l, &mounts)?
                {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is already staged at {}",
                        prev.staging_path.display()
                    )));
                }
                if staged_at(&prev, staging, &l, &mounts)? {
                    if prev.access != want.access || prev.read_only != want.read_only {
                        return Err(Error::AlreadyExists(format!(
                            "volume {id} is staged at {} as {}{}, and this request asks for {}{}",
                            staging.display(),
                            prev.access,
                            if prev.read_only { ", read-only" } else { "" },
                            want.access,
                            if want.read_only { ", read-only" } else { "" },
                        )));
                    }
                    if let Some((enc, master)) = &master {
                        // Staged already (a retry, or a kubelet after a plugin restart): the
                        // key is added again if it went, and must be the policy's.
                        encryption::unlock(id, staging, enc, master, want.read_only)?;
                    }
                    return rehome(&vol, &mut prev, staging, &l);
                }
                tracing::info!(volume_id = id, staged_at = %prev.staging_path.display(), device = %l.device.display(), "volume attached but its staging path is not mounted; mounting it again");
            }
        }
    }

    if let Access::Mount { flags, .. } = &cap.access {
        mount_options::check_flags_for(vol.record.fs_type, flags)?;
    }
    if let Access::Mount {
        fs_type: Some(t), ..
    } = &cap.access
    {
        if *t != vol.record.fs_type {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} was created for {} but the capability asks for {t}; loopvol never \
                 formats a volume as anything else",
                vol.record.fs_type
            )));
        }
    }
    // Block volumes read-only at the device; mounted ones stay writable underneath so a blank
    // volume can still be formatted, and the mount itself is made read-only.
    let block_ro = matches!(want.access, StagedAccess::Block) && want.read_only;
    // Asked before attaching, so nothing written through the device can have happened yet.
    let never_written = vol.pool.allocated_bytes(&vol.hex) == Some(0);
    steps.mark("lookup");
    let att = d.data_path.attach_ready(
        &vol.image,
        &DeviceSettings {
            read_only: block_ro,
            direct_io: true,
        },
    )?;
    steps.mark("attach");
    let mounted_before = master.is_some() && mount::mount_at(staging)?.is_some();
    let result = match MountSpec::of(&want) {
        None => Ok(()),
        Some(spec) => mount_staging(
            &d.paths,
            &att.device,
            staging,
            &spec,
            Blank {
                never_written: never_written && att.created,
                encrypt: master.is_some(),
            },
            &mut steps,
        ),
    };
    // An encrypted volume is staged only once its key opens it; a refusal takes back the
    // staging mount this call made, so nothing is left mounted for the pod.
    let result = result.and_then(|()| match &master {
        None => Ok(()),
        Some((enc, m)) => {
            let unlocked = encryption::unlock(id, staging, enc, m, want.read_only);
            if unlocked.is_err() && !mounted_before {
                if let Err(e) = mount::unmount(staging) {
                    tracing::error!(error = %e, "could not unmount after a refused key");
                }
            }
            steps.mark("unlock");
            unlocked.map(drop)
        }
    });
    if let Err(e) = result {
        if att.created {
            if let Err(de) = d.data_path.detach(&att.device) {
                tracing::error!(error = %de, "could not detach after a failed stage");
            }
        }
        return Err(e);
    }
    let mut rec = want;
    rec.device = att.device;
    node_state::save(&state_dir, &vol.hex, &rec)?;
    steps.mark("record");
    let fs = match &rec.access {
        StagedAccess::Mount { fs_type, .. } => Some(*fs_type),
        StagedAccess::Block => None,
    };
    crate::metrics::observe_stage(fs, steps.total());
    tracing::info!(volume_id = id, device = %rec.device.display(), staging = %staging.display(), direct_io = att.direct_io, ms = %steps, "volume staged");
    Ok(())
}

/// How a staging mount is made: the volume's filesystem, the capability's mount flags, and
/// whether the stage is read-only.
struct MountSpec<'a> {
    fs: provisioner::FsType,
    flags: &'a [String],
    read_only: bool,
}

impl<'a> MountSpec<'a> {
    /// The staging mount a staging record describes; `None` for raw block (nothing mounted).
    fn of(st: &'a Staged) -> Option<Self> {
        match &st.access {
            StagedAccess::Block => None,
            StagedAccess::Mount { fs_type, flags } => Some(MountSpec {
                fs: *fs_type,
                flags,
                read_only: st.read_only,
            }),
        }
    }
}

/// What a stage knows about a volume it may have to format.
struct Blank {
    /// Its backing file has no allocated block: blank without asking blkid.
    never_written: bool,
    /// Formatted with the `encrypt` feature (an fscrypt volume).
    encrypt: bool,
}

fn mount_staging(
    paths: &crate::engine::paths::Confinement,
    device: &Path,
    staging: &Path,
    spec: &MountSpec,
    blank: Blank,
    steps: &mut Steps,
) -> Result<()> {
    let (fs, read_only) = (spec.fs, spec.read_only);
    if let Some(m) = mount::mount_at(staging)? {
        if blockdev::rdev_of(device).is_some_and(|dev| m.is_from(dev)) {
            return Ok(());
        }
        return Err(Error::FailedPrecondition(format!(
            "staging path {} already has {} mounted on it",
            staging.display(),
            m.source
        )));
    }
    if blockdev::claimed(device) {
        // Mounted already, somewhere: publishes left mounted while the staging mount went, or a
        // mount this process cannot see (made by a driver in a mount namespace that is gone).
        // That filesystem is live: it is not probed, checked or grown offline, and mounting it
        // here shares its superblock.
        tracing::info!(device = %device.display(), staging = %staging.display(),
            "filesystem already mounted elsewhere; mounting it at the staging path too");
    } else {
        steps.mark("probe");
        prepare_filesystem(device, fs, read_only, &blank)?;
        steps.mark("format");
    }
    mount_there(paths, device, staging, spec)?;
    steps.mark("mount");
    // xfs and btrfs grow only while mounted (ext4 was grown above, before mounting).
    if fs != provisioner::FsType::Ext4
        && !read_only
        && format::needs_growing(device, fs, blockdev::size_of(device)?)?
    {
        if let Err(e) = format::grow(fs, device, staging) {
            let _ = mount::unmount(staging);
            return Err(e);
        }
        tracing::info!(device = %device.display(), "filesystem grown to its expanded volume");
    }
    Ok(())
}

/// Mount the filesystem on `device` at the (confined) staging path as a stage does.
fn mount_there(
    paths: &crate::engine::paths::Confinement,
    device: &Path,
    staging: &Path,
    spec: &MountSpec,
) -> Result<()> {
    let fs = spec.fs;
    let at = paths.open_dir("staging_target_path", staging, true)?;
    let (mut bits, mut data) = mount_options::split_flags(spec.flags);
    if spec.read_only {
        bits |= nix::mount::MsFlags::MS_RDONLY;
    }
    // Clones and restores of an xfs volume carry their source's UUID, which xfs refuses to
    // mount twice; the UUID means nothing to loopvol, so never let it block a mount.
    if fs == provisioner::FsType::Xfs && !data.split(',').any(|o| o == "nouuid") {
        data = if data.is_empty() {
            "nouuid".into()
        } else {
            format!("{data},nouuid")
        };
    }
    mount::mount_fs_shown(device, &at.proc_path(), staging, fs.as_str(), bits, &data)
}

/// Put back the staging mount of record `st` that an unstage took away before finding the
/// filesystem still mounted elsewhere. The filesystem is live, so this shares its superblock
/// (nothing is probed, checked or grown).
pub(super) fn mount_again(d: &Engine, device: &Path, staging: &Path, st: &Staged) -> Result<()> {
    match MountSpec::of(st) {
        Some(spec) => mount_there(&d.paths, device, staging, &spec),
        None => Ok(()),
    }
}

/// Make the unmounted filesystem on `device` ready to mount: format it when blank, check it
/// and grow it offline (ext4) when it already holds `fs`, and refuse any other content.
fn prepare_filesystem(
    device: &Path,
    fs: provisioner::FsType,
    read_only: bool,
    blank: &Blank,
) -> Result<()> {
    // A backing file with no allocated block has never been written: it is blank without
    // asking blkid (the common first stage of a thin volume, one exec saved).
    let found = if blank.never_written {
        None
    } else {
        format::probe(device)?
    };
    match found {
        None if read_only => {
            return Err(Error::FailedPrecondition(
                "the volume is blank and cannot be formatted for a read-only stage".into(),
            ))
        }
        None => {
            let started = std::time::Instant::now();
            format::mkfs_with(device, fs, blank.encrypt)?;
            crate::metrics::observe_mkfs(fs, started.elapsed());
            tracing::info!(fs = %fs, ms = started.elapsed().as_millis() as u64, "filesystem created");
        }
        Some(found) if found == fs.as_str() => {
            format::check(device, fs)?;
            if format::grow_offline_if_needed(device, fs, blockdev::size_of(device)?)? {
                tracing::info!(device = %device.display(), "filesystem grown offline to its expanded volume");
            }
        }
        Some(found) => {
            return Err(Error::FailedPrecondition(format!(
                "the volume already holds {found}, not {fs}; loopvol never reformats existing data"
            )))
        }
    }
    Ok(())
}
