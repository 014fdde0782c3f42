//! The node-side operations as plain blocking functions over a [`Driver`]: the gRPC layer in
//! `node_service` validates requests and calls these on a worker thread.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use crate::datapath::loopdev::{self, FileId, LoopInfo};
use provisioner::ids::Kind;
use provisioner::{VolumeId, VolumeRecord};

use crate::csi::volume_usage::Unit;
use crate::csi::{VolumeHealth, VolumeHealthErrorType, VolumeUsage};
use crate::edge::capability::{self, Access, Checked};
use crate::engine::health::{self, entry};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fs::format;
use crate::fs::mount::{self, MountEntry};
use crate::node_state::{self, Staged, StagedAccess};

/// A volume of this node's pool, resolved from a request's volume_id.
pub struct Vol {
    pub record: VolumeRecord,
    pub hex: String,
    pub image: PathBuf,
}

pub fn volume(d: &Engine, id: &str) -> Result<Vol> {
    let record = d.pool.get(id)?;
    let hex = VolumeId::parse(Kind::Volume, id)
        .map(|v| v.hex)
        .ok_or_else(|| Error::Internal(format!("record of {id} has a malformed id")))?;
    let image = d.pool.image_path(&hex);
    Ok(Vol { record, hex, image })
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

/// The volume_path of stats and expand requests: the spec's answer for a path where the
/// volume cannot be (relative, `..`, missing) is NOT_FOUND, not INVALID_ARGUMENT. A path
/// loopvol never mounts on (outside the allowed roots, the pool, through a symlink) is
/// INVALID_ARGUMENT, as for stage and publish.
fn volume_path(d: &Engine, s: &str) -> Result<PathBuf> {
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
fn ensure_volume_at(vol: &Vol, hint: Option<&Path>, path: &Path) -> Result<LoopInfo> {
    let not_here = || {
        Error::NotFound(format!(
            "volume {} is not staged or published at {}",
            vol.record.id,
            path.display()
        ))
    };
    let l = current_loop(vol, hint).ok_or_else(not_here)?;
    if let Some(rdev) = loopdev::rdev_of(path) {
        return (rdev == l.dev).then_some(l).ok_or_else(not_here);
    }
    if mount::is_mount_root(path) == Some(false) {
        return Err(not_here());
    }
    // kubelet asks for stats of every volume every minute: one read of the mount table each.
    let all = mount::mounts()?;
    mount::topmost_at(&all, path)
        .filter(|m| m.is_from(l.dev))
        .map(|_| l)
        .ok_or_else(not_here)
}

fn hold(d: &Engine, vol: &Vol) -> Result<provisioner::keyed_lock::KeyGuard> {
    d.pool.try_lock_volume(&vol.hex).ok_or_else(|| {
        Error::Aborted(format!(
            "another operation on volume {} is in progress; retry",
            vol.record.id
        ))
    })
}

fn staged_access(cap: &Checked, record: &VolumeRecord) -> StagedAccess {
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
fn current_loop(vol: &Vol, hint: Option<&Path>) -> Option<LoopInfo> {
    hint.and_then(|dev| loopdev::loop_if_backed_by(dev, &vol.image))
        .or_else(|| loopdev::loops_backed_by(&vol.image).into_iter().next())
}

/// The loop device volume `id` is attached to on this node right now, if any.
pub fn attached_device(d: &Engine, id: &str) -> Result<Option<PathBuf>> {
    let vol = volume(d, id)?;
    Ok(current_loop(&vol, remembered_device(d, &vol).as_deref()).map(|l| l.device))
}

/// The device this node's staging record remembers for the volume, if any.
fn remembered_device(d: &Engine, vol: &Vol) -> Option<PathBuf> {
    node_state::load(&d.pool.node_state_dir(), &vol.hex)
        .ok()
        .flatten()
        .map(|s| s.device)
}

fn same_path(a: &Path, b: &Path) -> bool {
    a == b || mount::canonical(a) == mount::canonical(b)
}

/// Does the staging path in record `s` still show the staged volume to this process? It may
/// not: the record was written by whichever driver staged the volume, and a driver in another
/// mount namespace (a node plugin container that restarted, with the kubelet directory
/// bind-mounted elsewhere) saw its own paths. Mount access: that path has the volume's
/// filesystem mounted. Block access (nothing is mounted at staging): the path exists.
fn record_path_visible(s: &Staged, l: &LoopInfo, all: &[MountEntry]) -> bool {
    match s.access {
        StagedAccess::Block => s.staging_path.exists(),
        StagedAccess::Mount { .. } => {
            mount::topmost_at(all, &s.staging_path).is_some_and(|m| m.is_from(l.dev))
        }
    }
}

/// Is `path` where the volume of record `s`, attached to `l`, is staged, as this process sees
/// it? Where the record says, or, when the record's path shows nothing here (see
/// [`record_path_visible`]), wherever the CO now says, provided the volume's filesystem is
/// mounted there (mount access).
fn staged_at(s: &Staged, path: &Path, l: &LoopInfo, all: &[MountEntry]) -> bool {
    let mounted_here = || match s.access {
        StagedAccess::Block => true,
        StagedAccess::Mount { .. } => {
            mount::topmost_at(all, path).is_some_and(|m| m.is_from(l.dev) && m.is_fs_root())
        }
    };
    if same_path(&s.staging_path, path) {
        return mounted_here();
    }
    !record_path_visible(s, l, all) && mounted_here()
}

/// Where this process can reach the volume's filesystem: the recorded staging path if it
/// shows the volume here, else any mount of the filesystem's root (the kernel has one
/// superblock per device, so freezing or growing through any of them acts on all).
fn visible_mount(s: &Staged, l: &LoopInfo, all: &[MountEntry]) -> Option<MountEntry> {
    mount::topmost_at(all, &s.staging_path)
        .filter(|m| m.is_from(l.dev))
        .or_else(|| {
            mount::of_device(all, l.dev)
                .into_iter()
                .find(|m| m.is_fs_root())
                .cloned()
        })
}

/// Point the staging record at `staging`, where the volume was found staged under another
/// path than the one recorded (the driver that recorded it lived in another mount namespace).
fn rehome(d: &Engine, vol: &Vol, s: &mut Staged, staging: &Path, l: &LoopInfo) -> Result<()> {
    if s.staging_path == staging && s.device == l.device {
        return Ok(());
    }
    tracing::info!(volume_id = %s.volume_id, recorded = %s.staging_path.display(),
        staging = %staging.display(), device = %l.device.display(),
        "staging record re-adopted: the volume is staged here under another path than recorded");
    s.staging_path = staging.to_path_buf();
    s.device = l.device.clone();
    node_state::save(&d.pool.node_state_dir(), &vol.hex, s)
}

pub fn stage(d: &Engine, id: &str, staging: &Path, cap: &Checked) -> Result<()> {
    let started = std::time::Instant::now();
    let vol = volume(d, id)?;
    let _g = hold(d, &vol)?;
    if !vol.image.exists() {
        return Err(Error::FailedPrecondition(format!(
            "backing file {} of volume {id} is missing",
            vol.image.display()
        )));
    }
    let want = Staged {
        volume_id: id.to_string(),
        staging_path: staging.to_path_buf(),
        access: staged_access(cap, &vol.record),
        read_only: cap.read_only(),
        device: PathBuf::new(),
    };
    let state_dir = d.pool.node_state_dir();
    // A record whose staging is gone (the node rebooted, or the record outlived its unstage
    // through a power cut) describes nothing and must not block a new stage.
    if let Some(mut prev) = node_state::load(&state_dir, &vol.hex)? {
        match current_loop(&vol, Some(&prev.device)) {
            None => {
                tracing::info!(volume_id = id, staged_at = %prev.staging_path.display(), "staging record found but the volume is no longer attached (reboot?); staging again");
            }
            Some(l) => {
                let all = match prev.access {
                    StagedAccess::Mount { .. } => mount::mounts()?,
                    StagedAccess::Block => Vec::new(),
                };
                if !same_path(&prev.staging_path, staging) && record_path_visible(&prev, &l, &all) {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is already staged at {}",
                        prev.staging_path.display()
                    )));
                }
                if staged_at(&prev, staging, &l, &all) {
                    if prev.access != want.access || prev.read_only != want.read_only {
                        return Err(Error::AlreadyExists(format!(
                            "volume {id} is staged at {} with a different capability ({:?}, read-only {})",
                            staging.display(),
                            prev.access,
                            prev.read_only
                        )));
                    }
                    return rehome(d, &vol, &mut prev, staging, &l);
                }
                tracing::info!(volume_id = id, staged_at = %prev.staging_path.display(), device = %l.device.display(), "volume attached but its staging path is not mounted; mounting it again");
            }
        }
    }

    if let Access::Mount { flags, .. } = &cap.access {
        capability::check_flags_for(vol.record.fs_type, flags)?;
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
    let never_written = d.pool.allocated_bytes(&vol.hex) == Some(0);
    let att = loopdev::attach(&vol.image, block_ro, true)?;
    let result = match &want.access {
        StagedAccess::Block => Ok(()),
        StagedAccess::Mount { fs_type, flags } => mount_staging(
            &d.paths,
            &att.device,
            staging,
            *fs_type,
            flags,
            want.read_only,
            never_written && att.created,
        ),
    };
    if let Err(e) = result {
        if att.created {
            if let Err(de) = loopdev::detach(&att.device) {
                tracing::error!(error = %de, "could not detach after a failed stage");
            }
        }
        return Err(e);
    }
    let mut rec = want;
    rec.device = att.device;
    node_state::save(&state_dir, &vol.hex, &rec)?;
    let fs = match &rec.access {
        StagedAccess::Mount { fs_type, .. } => Some(*fs_type),
        StagedAccess::Block => None,
    };
    crate::metrics::observe_stage(fs, started.elapsed());
    tracing::info!(volume_id = id, device = %rec.device.display(), staging = %staging.display(), direct_io = att.direct_io, "volume staged");
    Ok(())
}

fn mount_staging(
    paths: &crate::engine::paths::Confinement,
    device: &Path,
    staging: &Path,
    fs: provisioner::FsType,
    flags: &[String],
    read_only: bool,
    never_written: bool,
) -> Result<()> {
    if let Some(m) = mount::mount_at(staging)? {
        if loopdev::rdev_of(device).is_some_and(|dev| m.is_from(dev)) {
            return Ok(());
        }
        return Err(Error::FailedPrecondition(format!(
            "staging path {} already has {} mounted on it",
            staging.display(),
            m.source
        )));
    }
    if loopdev::claimed(device) {
        // Mounted already, somewhere: publishes left mounted while the staging mount went, or a
        // mount this process cannot see (made by a driver in a mount namespace that is gone).
        // That filesystem is live: it is not probed, checked or grown offline, and mounting it
        // here shares its superblock.
        tracing::info!(device = %device.display(), staging = %staging.display(),
            "filesystem already mounted elsewhere; mounting it at the staging path too");
    } else {
        prepare_filesystem(device, fs, read_only, never_written)?;
    }
    let at = paths.open_dir("staging_target_path", staging, true)?;
    let (mut bits, mut data) = capability::split_flags(flags);
    if read_only {
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
    mount::mount_fs_shown(device, &at.proc_path(), staging, fs.as_str(), bits, &data)?;
    // xfs and btrfs grow only while mounted (ext4 was grown above, before mounting).
    if fs != provisioner::FsType::Ext4
        && !read_only
        && format::needs_growing(device, fs, loopdev::size_of(device)?)?
    {
        if let Err(e) = format::grow(fs, device, staging) {
            let _ = mount::unmount(staging);
            return Err(e);
        }
        tracing::info!(device = %device.display(), "filesystem grown to its expanded volume");
    }
    Ok(())
}

/// Make the unmounted filesystem on `device` ready to mount: format it when blank, check it
/// and grow it offline (ext4) when it already holds `fs`, and refuse any other content.
fn prepare_filesystem(
    device: &Path,
    fs: provisioner::FsType,
    read_only: bool,
    never_written: bool,
) -> Result<()> {
    // A backing file with no allocated block has never been written: it is blank without
    // asking blkid (the common first stage of a thin volume, one exec saved).
    let found = if never_written {
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
            format::mkfs(device, fs)?;
            crate::metrics::observe_mkfs(fs, started.elapsed());
            tracing::info!(fs = %fs, ms = started.elapsed().as_millis() as u64, "filesystem created");
        }
        Some(found) if found == fs.as_str() => {
            format::check(device, fs)?;
            if format::grow_offline_if_needed(device, fs, loopdev::size_of(device)?)? {
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

/// Mounts sharing the staged filesystem other than the staging mount itself (its publishes).
fn other_mounts_of(all: &[MountEntry], l: &LoopInfo, staged: &MountEntry) -> Vec<PathBuf> {
    mount::of_device(all, l.dev)
        .into_iter()
        .filter(|m| m.id != staged.id)
        .map(|m| m.mount_point.clone())
        .collect()
}

/// Bind mounts of a loop device node (raw block publishes).
fn device_binds(all: &[MountEntry], l: &LoopInfo) -> Vec<PathBuf> {
    mount::device_node_binds(all, l.dev)
        .into_iter()
        .map(|m| m.mount_point.clone())
        .collect()
}

pub fn unstage(d: &Engine, id: &str, staging: &Path) -> Result<()> {
    let vol = volume(d, id)?;
    let _g = hold(d, &vol)?;
    let state_dir = d.pool.node_state_dir();
    let record = node_state::load(&state_dir, &vol.hex)?;
    // Every device backed by the image (normally one): unstage leaks none, even one attached
    // by hand.
    let loops = loopdev::loops_backed_by(&vol.image);
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
        if loopdev::claimed(&l.device) {
            // Mounted where this process cannot see it: detaching would pull the device out
            // from under a live filesystem.
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is mounted from {} somewhere this node plugin cannot see (another \
                 mount namespace); unmount it there first",
                l.device.display()
            )));
        }
        loopdev::detach(&l.device)?;
    }
    node_state::remove(&state_dir, &vol.hex)?;
    crate::engine::targets::forget(d, &vol.hex)?;
    tracing::info!(volume_id = id, staging = %staging.display(), "volume unstaged");
    Ok(())
}

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
    let l = current_loop(&vol, Some(&state.device));
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
            let (bits, _) = capability::split_flags(flags);
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
                if loopdev::rdev_of(target) == Some(l.dev) {
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
    let dev = current_loop(&vol, remembered_device(d, &vol).as_deref()).map(|l| l.dev);
    for _ in 0..8 {
        let Some(m) = mount::mount_at(target)? else {
            break;
        };
        // The volume's filesystem (a bind of its staging mount), or its device node (raw
        // block), by device number: the mount may have been made from another mount namespace.
        let ours = dev.is_some_and(|dev| m.is_from(dev) || loopdev::rdev_of(target) == Some(dev));
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

pub fn stats(d: &Engine, id: &str, path: &str) -> Result<Vec<VolumeUsage>> {
    let vol = volume(d, id)?;
    let path = &volume_path(d, path)?;
    let record = node_state::load(&d.pool.node_state_dir(), &vol.hex)?;
    // Also proves that `path` is a mount point of this volume, or its device node.
    ensure_volume_at(&vol, record.as_ref().map(|s| s.device.as_path()), path)?;
    if loopdev::rdev_of(path).is_some() {
        let total = loopdev::size_of(path)? as i64;
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

/// Grow the loop device to the backing file's new size and the filesystem to the device.
pub fn expand(d: &Engine, id: &str, path: &str, block_hint: bool) -> Result<u64> {
    let vol = volume(d, id)?;
    let _g = hold(d, &vol)?;
    let path = volume_path(d, path)?;
    let state = node_state::load(&d.pool.node_state_dir(), &vol.hex)?;
    let l = current_loop(&vol, state.as_ref().map(|s| s.device.as_path())).ok_or_else(|| {
        Error::FailedPrecondition(format!("volume {id} is not staged on this node"))
    })?;
    ensure_volume_at(&vol, Some(&l.device), &path)?;
    let size = loopdev::refresh_capacity(&l.device)?;
    match state {
        Some(s) if !block_hint => {
            if let StagedAccess::Mount { fs_type, .. } = s.access {
                // xfs and btrfs grow through a mount point: one this process can see.
                let all = mount::mounts()?;
                let at = visible_mount(&s, &l, &all).map_or(path, |m| m.mount_point);
                format::grow(fs_type, &l.device, &at)?;
            }
        }
        _ => {}
    }
    tracing::info!(volume_id = id, size, "volume expanded on node");
    Ok(size)
}

/// Node-side health: the pool's findings plus what the kernel says about the staged volume.
pub fn volume_health(d: &Engine, id: &str) -> Result<VolumeHealth> {
    let vol = volume(d, id)?;
    let mut statuses = health::pool_findings(&d.pool, &vol.record);
    statuses.extend(health::freeze_findings(&d.pool.node_state_dir(), &vol.hex));
    if let Some(s) = node_state::load(&d.pool.node_state_dir(), &vol.hex)? {
        match current_loop(&vol, Some(&s.device)) {
            None => statuses.push(entry(
                VolumeHealthErrorType::Inaccessible,
                "LoopDeviceDetached",
                format!(
                    "volume is staged at {} but no loop device backs it",
                    s.staging_path.display()
                ),
            )),
            Some(l) if matches!(s.access, StagedAccess::Mount { .. }) => {
                let all = mount::mounts()?;
                match visible_mount(&s, &l, &all) {
                    // Mounted where this process cannot look (another mount namespace): not
                    // reported as missing, and its state cannot be read from here.
                    None if loopdev::claimed(&l.device) => {}
                    None => statuses.push(entry(
                        VolumeHealthErrorType::Inaccessible,
                        "NotMounted",
                        format!(
                            "staging path {} is no longer mounted",
                            s.staging_path.display()
                        ),
                    )),
                    Some(m) => statuses.extend(health::filesystem_findings(&m, s.read_only)),
                }
            }
            Some(_) => {}
        }
    }
    if vol.record.allocation == provisioner::Allocation::Thin {
        if let Ok(c) = d.pool.capacity() {
            if c.available_bytes < (1 << 20) {
                statuses.push(entry(
                    VolumeHealthErrorType::Degraded,
                    "PoolFull",
                    format!(
                        "the pool filesystem under {} is full: writes to this thin volume fail with ENOSPC",
                        d.pool.dir().display()
                    ),
                ));
            }
        }
    }
    Ok(VolumeHealth {
        volume_id: id.to_string(),
        health_statuses: statuses,
    })
}

/// At start-up: find again what each staging record describes, by identity and device number
/// (a restarted container sees other paths than the one that staged it), and say what was
/// re-adopted; and detach loop devices over pool images that were deleted (left by a crash
/// between delete steps) when nothing uses them. Every staging record is kept: one whose
/// device is gone is restored by the next NodeStageVolume.
pub fn recover(d: &Engine) -> Vec<String> {
    let mut report = Vec::new();
    let state_dir = d.pool.node_state_dir();
    // One scan for all records: a scan per record asks every loop device once per record.
    let pool_loops = loopdev::loops_under(d.pool.dir());
    let by_file: HashMap<FileId, &LoopInfo> = pool_loops
        .iter()
        .filter_map(|l| l.backing.map(|id| (id, l)))
        .collect();
    let all = mount::mounts().unwrap_or_default();
    let paths = |ms: Vec<&MountEntry>| -> Vec<PathBuf> {
        ms.into_iter().map(|m| m.mount_point.clone()).collect()
    };
    for (hex, mut s) in node_state::all(&state_dir) {
        let Some(l) = FileId::of(&d.pool.image_path(&hex)).and_then(|id| by_file.get(&id)) else {
            report.push(format!(
                "{} was staged at {} but is no longer attached (node rebooted?); the next NodeStageVolume restores it",
                s.volume_id,
                s.staging_path.display()
            ));
            continue;
        };
        let line = match &s.access {
            StagedAccess::Block => {
                let binds = paths(mount::device_node_binds(&all, l.dev));
                let staged = if record_path_visible(&s, l, &all) {
                    format!("staged at {}", s.staging_path.display())
                } else {
                    format!(
                        "recorded staging path {} not visible to this process",
                        s.staging_path.display()
                    )
                };
                format!(
                    "re-adopted {}: block volume on {}, {staged}, published at {binds:?}",
                    s.volume_id,
                    l.device.display(),
                )
            }
            StagedAccess::Mount { fs_type, .. } => {
                let mounted = paths(mount::of_device(&all, l.dev));
                if record_path_visible(&s, l, &all) {
                    let published: Vec<_> = mounted
                        .iter()
                        .filter(|p| !same_path(p, &s.staging_path))
                        .collect();
                    format!(
                        "re-adopted {}: {fs_type} on {}, mounted at {}, published at {published:?}",
                        s.volume_id,
                        l.device.display(),
                        s.staging_path.display()
                    )
                } else if !mounted.is_empty() {
                    format!(
                        "re-adopted {}: {fs_type} on {}, mounted here at {mounted:?}; the recorded \
                         staging path {} shows nothing to this process (it was staged by a driver \
                         that saw other paths), so the next NodeStageVolume or \
                         NodePublishVolume names the staging path",
                        s.volume_id,
                        l.device.display(),
                        s.staging_path.display()
                    )
                } else if loopdev::claimed(&l.device) {
                    format!(
                        "re-adopted {}: {fs_type} on {}, mounted only where this process cannot \
                         see (recorded staging path {})",
                        s.volume_id,
                        l.device.display(),
                        s.staging_path.display()
                    )
                } else {
                    format!(
                        "{} is attached on {} but not mounted at {}; the next NodeStageVolume \
                         mounts it again",
                        s.volume_id,
                        l.device.display(),
                        s.staging_path.display()
                    )
                }
            }
        };
        report.push(line);
        if s.device != l.device {
            // Keep the fast path fast: the next RPC asks this device first.
            s.device = l.device.clone();
            if let Err(e) = node_state::save(&state_dir, &hex, &s) {
                tracing::warn!(volume_id = %s.volume_id, error = %e, "could not update the staging record's device");
            }
        }
    }
    for l in &pool_loops {
        if !l.backing_deleted {
            continue;
        }
        let in_use = !mount::of_device(&all, l.dev).is_empty()
            || !mount::device_node_binds(&all, l.dev).is_empty()
            || loopdev::claimed(&l.device);
        if in_use {
            report.push(format!(
                "{} backs a deleted image and is still mounted; left alone",
                l.device.display()
            ));
        } else if loopdev::detach(&l.device).is_ok() {
            report.push(format!(
                "detached orphan {} (its image was deleted)",
                l.device.display()
            ));
        }
    }
    report
}

/// Freeze `record`'s filesystem if it is staged and mounted where this process can see it; the
/// pool calls this right before copying a live volume. A volume that is not mounted here (block
/// access, unstaged, or mounted only in another mount namespace) is copied crash-consistent.
pub fn quiesce(d: &Engine, record: &VolumeRecord) -> Result<Option<crate::fs::freeze::Frozen>> {
    let Some(hex) = VolumeId::parse(Kind::Volume, &record.id).map(|v| v.hex) else {
        return Ok(None);
    };
    let Some(staged) = node_state::load(&d.pool.node_state_dir(), &hex)? else {
        return Ok(None);
    };
    if !matches!(staged.access, StagedAccess::Mount { .. }) {
        return Ok(None);
    }
    let vol = Vol {
        record: record.clone(),
        image: d.pool.image_path(&hex),
        hex,
    };
    let Some(l) = current_loop(&vol, Some(&staged.device)) else {
        return Ok(None);
    };
    match visible_mount(&staged, &l, &mount::mounts()?) {
        Some(m) => {
            crate::fs::freeze::freeze(&d.freeze, &record.id, &vol.hex, &vol.image, &m.mount_point)
                .map(Some)
        }
        None => Ok(None),
    }
}
