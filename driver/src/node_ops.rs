//! The node-side operations as plain blocking functions over a [`Driver`]: the gRPC layer in
//! `node_service` validates requests and calls these on a worker thread.

use std::path::{Component, Path, PathBuf};

use provisioner::ids::Kind;
use provisioner::{backing, VolumeId, VolumeRecord};

use crate::capability::{self, Access, Checked};
use crate::csi::volume_usage::Unit;
use crate::csi::{VolumeHealth, VolumeHealthErrorType, VolumeUsage};
use crate::error::{Error, Result};
use crate::health::{self, entry};
use crate::loop_device;
use crate::mount::{self, MountEntry};
use crate::node_state::{self, Staged, StagedAccess};
use crate::{format, server::Driver};

/// A volume of this node's pool, resolved from a request's volume_id.
pub struct Vol {
    pub record: VolumeRecord,
    pub hex: String,
    pub image: PathBuf,
}

pub fn volume(d: &Driver, id: &str) -> Result<Vol> {
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
fn volume_path(d: &Driver, s: &str) -> Result<PathBuf> {
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
/// `record` is the volume's staging record, which the caller has already read.
fn ensure_volume_at(vol: &Vol, record: Option<&Staged>, path: &Path) -> Result<()> {
    let not_here = || {
        Error::NotFound(format!(
            "volume {} is not staged or published at {}",
            vol.record.id,
            path.display()
        ))
    };
    let device = current_loop(vol, record.map(|s| s.device.as_path()))
        .ok_or_else(not_here)?
        .device;
    if let Some(rdev) = loop_device::rdev_of(path) {
        return (loop_device::rdev_of(&device) == Some(rdev))
            .then_some(())
            .ok_or_else(not_here);
    }
    if mount::is_mount_root(path) == Some(false) {
        return Err(not_here());
    }
    // kubelet asks for stats of every volume every minute: one read of the mount table each.
    let all = mount::mounts()?;
    let Some(at) = mount::topmost_at(&all, path) else {
        return Err(not_here());
    };
    let staged = record
        .and_then(|s| mount::topmost_at(&all, &s.staging_path))
        .filter(|m| Path::new(&m.source) == device)
        .ok_or_else(not_here)?;
    ((at.major, at.minor) == (staged.major, staged.minor))
        .then_some(())
        .ok_or_else(not_here)
}

fn hold(d: &Driver, vol: &Vol) -> Result<provisioner::keyed_lock::KeyGuard> {
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

/// The loop device currently backed by the volume's image, if any. `hint` is the device the
/// staging record remembers: checking it is one sysfs read, where a scan reads every loop
/// device on the machine (thousands of reads on a full node, on every publish and unpublish).
fn current_loop(vol: &Vol, hint: Option<&Path>) -> Option<backing::LoopInfo> {
    hint.and_then(|dev| backing::loop_if_backed_by(dev, &vol.image))
        .or_else(|| backing::loops_backed_by(&vol.image).into_iter().next())
}

/// The device this node's staging record remembers for the volume, if any.
fn remembered_device(d: &Driver, vol: &Vol) -> Option<PathBuf> {
    node_state::load(&d.pool.node_state_dir(), &vol.hex)
        .ok()
        .flatten()
        .map(|s| s.device)
}

/// Is the staging described by `s` still real (device attached, filesystem mounted)?
fn still_staged(vol: &Vol, s: &Staged) -> Result<bool> {
    let Some(l) = current_loop(vol, Some(&s.device)) else {
        return Ok(false);
    };
    Ok(match s.access {
        StagedAccess::Block => true,
        StagedAccess::Mount { .. } => {
            mount::mount_at(&s.staging_path)?.is_some_and(|m| Path::new(&m.source) == l.device)
        }
    })
}

pub fn stage(d: &Driver, id: &str, staging: &Path, cap: &Checked) -> Result<()> {
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
    let prev = node_state::load(&state_dir, &vol.hex)?;
    let prev = match prev {
        Some(p) if still_staged(&vol, &p)? => Some(p),
        Some(p) => {
            tracing::info!(volume_id = id, staged_at = %p.staging_path.display(), "staging record found but the volume is no longer attached or mounted (reboot?); staging again");
            None
        }
        None => None,
    };
    if let Some(prev) = prev {
        if prev.staging_path != want.staging_path {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is already staged at {}",
                prev.staging_path.display()
            )));
        }
        if prev.access != want.access || prev.read_only != want.read_only {
            return Err(Error::AlreadyExists(format!(
                "volume {id} is staged at {} with a different capability ({:?}, read-only {})",
                staging.display(),
                prev.access,
                prev.read_only
            )));
        }
        return Ok(());
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
    let att = loop_device::attach(&vol.image, block_ro, true)?;
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
            if let Err(de) = loop_device::detach(&att.device) {
                tracing::error!(error = %de, "could not detach after a failed stage");
            }
        }
        return Err(e);
    }
    let mut rec = want;
    rec.device = att.device;
    node_state::save(&state_dir, &vol.hex, &rec)?;
    crate::metrics::observe_stage(&rec.access, started.elapsed());
    tracing::info!(volume_id = id, device = %rec.device.display(), staging = %staging.display(), direct_io = att.direct_io, "volume staged");
    Ok(())
}

fn mount_staging(
    paths: &crate::paths::Confinement,
    device: &Path,
    staging: &Path,
    fs: provisioner::FsType,
    flags: &[String],
    read_only: bool,
    never_written: bool,
) -> Result<()> {
    if let Some(m) = mount::mount_at(staging)? {
        if Path::new(&m.source) == device {
            return Ok(());
        }
        return Err(Error::FailedPrecondition(format!(
            "staging path {} already has {} mounted on it",
            staging.display(),
            m.source
        )));
    }
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
            if format::grow_offline_if_needed(device, fs, loop_device::size_of(device)?)? {
                tracing::info!(device = %device.display(), "filesystem grown offline to its expanded volume");
            }
        }
        Some(found) => {
            return Err(Error::FailedPrecondition(format!(
                "the volume already holds {found}, not {fs}; loopvol never reformats existing data"
            )))
        }
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
        && format::needs_growing(device, fs, loop_device::size_of(device)?)?
    {
        if let Err(e) = format::grow(fs, device, staging) {
            let _ = mount::unmount(staging);
            return Err(e);
        }
        tracing::info!(device = %device.display(), "filesystem grown to its expanded volume");
    }
    Ok(())
}

/// Mounts sharing the staged filesystem other than the staging mount itself (its publishes).
fn other_mounts_of(all: &[MountEntry], staged: &MountEntry) -> Vec<PathBuf> {
    all.iter()
        .filter(|m| (m.major, m.minor) == (staged.major, staged.minor) && m.id != staged.id)
        .map(|m| m.mount_point.clone())
        .collect()
}

/// Bind mounts of a loop device node (raw block publishes).
fn device_binds(all: &[MountEntry], device: &Path) -> Vec<PathBuf> {
    let Some(rdev) = loop_device::rdev_of(device) else {
        return Vec::new();
    };
    let name = device.file_name().unwrap_or_default();
    all.iter()
        .filter(|m| m.root.file_name() == Some(name))
        .filter(|m| loop_device::rdev_of(&m.mount_point) == Some(rdev))
        .map(|m| m.mount_point.clone())
        .collect()
}

pub fn unstage(d: &Driver, id: &str, staging: &Path) -> Result<()> {
    let vol = volume(d, id)?;
    let _g = hold(d, &vol)?;
    let state_dir = d.pool.node_state_dir();
    if let Some(st) = node_state::load(&state_dir, &vol.hex)? {
        if mount::canonical(&st.staging_path) != mount::canonical(staging) {
            // Not staged at this path: nothing here is ours to undo (the spec's idempotent OK),
            // and the real staging elsewhere must stay attached.
            tracing::info!(volume_id = id, staged_at = %st.staging_path.display(),
                asked = %staging.display(), "unstage of a path where the volume is not staged");
            return Ok(());
        }
    }
    let all = mount::mounts()?;
    let staged_mount = all
        .iter()
        .rev()
        .find(|m| m.mount_point == mount::canonical(staging))
        .cloned();
    let loops = backing::loops_backed_by(&vol.image);
    // Refuse while anything still uses the volume, before changing anything.
    for l in &loops {
        let binds = device_binds(&all, &l.device);
        if !binds.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "block volume {id} is still published at {binds:?}; unpublish it first"
            )));
        }
        let elsewhere: Vec<_> = all
            .iter()
            .filter(|m| Path::new(&m.source) == l.device)
            .filter(|m| staged_mount.as_ref().is_none_or(|s| s.id != m.id))
            .map(|m| m.mount_point.clone())
            .collect();
        if !elsewhere.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is mounted at {elsewhere:?}, not only at {}; not detaching it",
                staging.display()
            )));
        }
    }
    if let Some(m) = &staged_mount {
        if !loops.iter().any(|l| Path::new(&m.source) == l.device) {
            return Err(Error::FailedPrecondition(format!(
                "{} has {} mounted, which is not volume {id}; not touching it",
                staging.display(),
                m.source
            )));
        }
        let published = other_mounts_of(&all, m);
        if !published.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still published at {published:?}; unpublish it first"
            )));
        }
        mount::unmount(staging)?;
    }
    // Every device the scan above found (normally one): unstage leaks none, even one
    // attached by hand.
    for l in &loops {
        loop_device::detach(&l.device)?;
    }
    node_state::remove(&state_dir, &vol.hex)?;
    crate::targets::forget(d, &vol.hex)?;
    tracing::info!(volume_id = id, staging = %staging.display(), "volume unstaged");
    Ok(())
}

pub fn publish(
    d: &Driver,
    id: &str,
    staging: &Path,
    target: &Path,
    cap: &Checked,
    readonly: bool,
) -> Result<()> {
    let vol = volume(d, id)?;
    let _g = hold(d, &vol)?;
    let state = node_state::load(&d.pool.node_state_dir(), &vol.hex)?
        .filter(|s| s.staging_path == staging)
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume {id} is not staged at {}; call NodeStageVolume first",
                staging.display()
            ))
        })?;
    let Some(l) = current_loop(&vol, Some(&state.device)) else {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} is not attached on this node (rebooted?); stage it again"
        )));
    };
    let read_only = readonly || cap.read_only();
    match (&cap.access, &state.access) {
        (Access::Mount { flags, .. }, StagedAccess::Mount { .. }) => {
            // One read of the mount table for the whole check.
            let all = mount::mounts()?;
            let staged = mount::topmost_at(&all, staging).ok_or_else(|| {
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
            single_writer_check(cap, id, other_mounts_of(&all, &staged))?;
            let at = crate::targets::prepare_dir(d, &vol.hex, target)?;
            let (bits, _) = capability::split_flags(flags);
            crate::paths::bind_dir(&d.paths, staging, &at, read_only, bits)
                .inspect_err(|_| crate::targets::undo(d, &vol.hex, &at))?;
        }
        (Access::Block, StagedAccess::Block) => {
            if read_only && !l.read_only {
                return Err(Error::FailedPrecondition(format!(
                    "a read-only raw block publish needs volume {id} staged read-only \
                     (access mode SINGLE_NODE_READER_ONLY): a read-only bind of a device node \
                     does not stop writes to the device"
                )));
            }
            if let Some(_m) = mount::mount_at(target)? {
                if loop_device::rdev_of(target) == loop_device::rdev_of(&l.device) {
                    return Ok(());
                }
                return Err(Error::AlreadyExists(format!(
                    "{} is already a mount point of another device",
                    target.display()
                )));
            }
            single_writer_check(cap, id, device_binds(&mount::mounts()?, &l.device))?;
            let at = crate::targets::prepare_file(d, &vol.hex, target)?;
            mount::bind_only(&l.device, &at.proc_path(), &l.device, target)
                .inspect_err(|_| crate::targets::undo(d, &vol.hex, &at))?;
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

pub fn unpublish(d: &Driver, id: &str, target: &Path) -> Result<()> {
    let vol = volume(d, id)?;
    let _g = hold(d, &vol)?;
    let loop_dev = current_loop(&vol, remembered_device(d, &vol).as_deref()).map(|l| l.device);
    for _ in 0..8 {
        let Some(m) = mount::mount_at(target)? else {
            break;
        };
        let ours = Path::new(&m.source) == loop_dev.as_deref().unwrap_or(Path::new("-"))
            || loop_dev
                .as_deref()
                .and_then(loop_device::rdev_of)
                .is_some_and(|r| loop_device::rdev_of(target) == Some(r))
            || loop_dev.as_deref().is_some_and(|dev| {
                mount::mounts()
                    .map(|all| {
                        all.iter().any(|x| {
                            Path::new(&x.source) == dev && (x.major, x.minor) == (m.major, m.minor)
                        })
                    })
                    .unwrap_or(false)
            });
        if !ours {
            return Err(Error::FailedPrecondition(format!(
                "{} has a mount that is not volume {id}; not touching it",
                target.display()
            )));
        }
        mount::unmount(target)?;
    }
    crate::targets::remove_if_ours(d, &vol.hex, target)?;
    tracing::info!(volume_id = id, target = %target.display(), "volume unpublished");
    Ok(())
}

pub fn stats(d: &Driver, id: &str, path: &str) -> Result<Vec<VolumeUsage>> {
    let vol = volume(d, id)?;
    let path = &volume_path(d, path)?;
    let record = node_state::load(&d.pool.node_state_dir(), &vol.hex)?;
    // Also proves that `path` is a mount point of this volume, or its device node.
    ensure_volume_at(&vol, record.as_ref(), path)?;
    if loop_device::rdev_of(path).is_some() {
        let total = loop_device::size_of(path)? as i64;
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
pub fn expand(d: &Driver, id: &str, path: &str, block_hint: bool) -> Result<u64> {
    let vol = volume(d, id)?;
    let _g = hold(d, &vol)?;
    let path = volume_path(d, path)?;
    let state = node_state::load(&d.pool.node_state_dir(), &vol.hex)?;
    let l = current_loop(&vol, state.as_ref().map(|s| s.device.as_path())).ok_or_else(|| {
        Error::FailedPrecondition(format!("volume {id} is not staged on this node"))
    })?;
    ensure_volume_at(&vol, state.as_ref(), &path)?;
    let size = loop_device::refresh_capacity(&l.device)?;
    match state.map(|s| (s.access, s.staging_path)) {
        Some((StagedAccess::Mount { fs_type, .. }, staging)) if !block_hint => {
            format::grow(fs_type, &l.device, &staging)?;
        }
        _ => {}
    }
    tracing::info!(volume_id = id, size, "volume expanded on node");
    Ok(size)
}

/// Node-side health: the pool's findings plus what the kernel says about the staged volume.
pub fn volume_health(d: &Driver, id: &str) -> Result<VolumeHealth> {
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
            Some(_) if matches!(s.access, StagedAccess::Mount { .. }) => {
                match mount::mount_at(&s.staging_path)? {
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

/// At start-up: report what is staged, and detach loop devices over pool images that no
/// longer have a volume record (left by a crash between delete steps) when nothing uses them.
pub fn recover(d: &Driver) -> Vec<String> {
    let mut report = Vec::new();
    let state_dir = d.pool.node_state_dir();
    // One scan for all records: a scan per record is a million sysfs reads at a thousand.
    let pool_loops = backing::loops_under(d.pool.dir());
    for (hex, s) in node_state::all(&state_dir) {
        let image = mount::canonical(&d.pool.image_path(&hex));
        let attached: Vec<_> = pool_loops
            .iter()
            .filter(|l| !l.backing_deleted && l.backing_file == image)
            .collect();
        match attached.first() {
            Some(l) => report.push(format!("{} staged at {} on {}", s.volume_id, s.staging_path.display(), l.device.display())),
            None => report.push(format!(
                "{} was staged at {} but is no longer attached (node rebooted?); the next NodeStageVolume restores it",
                s.volume_id,
                s.staging_path.display()
            )),
        }
    }
    let mounts = mount::mounts().unwrap_or_default();
    for l in pool_loops {
        let exists = l.backing_file.exists() && !l.backing_deleted;
        if exists {
            continue;
        }
        let in_use = mounts.iter().any(|m| Path::new(&m.source) == l.device);
        if in_use {
            report.push(format!(
                "{} backs a deleted image and is still mounted; left alone",
                l.device.display()
            ));
        } else if loop_device::detach(&l.device).is_ok() {
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
/// access, unstaged, or staged in another mount namespace) is copied crash-consistent.
pub fn quiesce(d: &Driver, record: &VolumeRecord) -> Result<Option<crate::freeze::Frozen>> {
    let Some(hex) = VolumeId::parse(Kind::Volume, &record.id).map(|v| v.hex) else {
        return Ok(None);
    };
    let Some(staged) = node_state::load(&d.pool.node_state_dir(), &hex)? else {
        return Ok(None);
    };
    if !matches!(staged.access, StagedAccess::Mount { .. }) {
        return Ok(None);
    }
    let image = d.pool.image_path(&hex);
    let Some(l) = backing::loops_backed_by(&image).into_iter().next() else {
        return Ok(None);
    };
    match mount::mount_at(&staged.staging_path)? {
        Some(m) if Path::new(&m.source) == l.device => {
            crate::freeze::freeze(&d.freeze, &record.id, &hex, &image, &staged.staging_path)
                .map(Some)
        }
        _ => Ok(None),
    }
}
