//! Loop devices through raw ioctls: attach (`LOOP_CONFIGURE`), detach, capacity.
//!
//! Written by hand rather than with the `loopdev` crate because we need `LOOP_CONFIGURE` (attach
//! the file, set flags and direct I/O in one atomic call: `LOOP_SET_STATUS64` silently drops the
//! direct-I/O flag) and because loopdev's bindgen build needs libclang on every build machine.
//! The whole surface is six ioctls.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::scan::{
    self as backing, LoopInfo64, LO_FLAGS_DIRECT_IO, LO_FLAGS_READ_ONLY, LO_NAME_SIZE,
};
use crate::datapath::Attached;
use crate::error::{Error, Result};
use nix::errno::Errno;

pub(super) const LOOP_CONTROL: &str = "/dev/loop-control";
const LOOP_MAJOR: u64 = 7;

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
nix::ioctl_write_int_bad!(loop_ctl_add, 0x4C80);
nix::ioctl_write_int_bad!(loop_ctl_remove, 0x4C81);
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
nix::ioctl_none_bad!(loop_set_capacity, 0x4C07);
nix::ioctl_write_int_bad!(loop_set_direct_io, 0x4C08);

/// Attach `file` to a loop device, or return the one already backed by it: one image on two
/// loop devices means two page caches over one filesystem, which corrupts it.
pub(super) fn attach(file: &Path, read_only: bool, want_direct_io: bool) -> Result<Attached> {
    if let Some(l) = backing::first_backed_by(file) {
        if l.read_only && !read_only {
            return Err(Error::FailedPrecondition(format!(
                "{} is already attached read-only to {}; unstage it first",
                file.display(),
                l.device.display()
            )));
        }
        return Ok(Attached {
            device: l.device,
            created: false,
            direct_io: l.direct_io,
            read_only: l.read_only,
        });
    }
    let backing_file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(file)
        .map_err(|e| Error::io(format!("open {}", file.display()), e))?;
    let control = open_control()?;

    let mut flags = if read_only { LO_FLAGS_READ_ONLY } else { 0 };
    if want_direct_io {
        flags |= LO_FLAGS_DIRECT_IO;
    }
    // LOOP_CTL_GET_FREE hands the same free device to every caller until one binds it, so
    // racing attachers (other processes, other drivers) get EBUSY: take the next one. Within
    // this process no two attaches try the same device (see `reserve`).
    let mut last_err = None;
    for _ in 0..64 {
        let slot = reserve(&control)?;
        let device = ensure_node(u64::from(slot.0))?;
        let dev = match open_rw(&device) {
            Ok(f) => f,
            Err(e) => {
                last_err = Some(io::Error::new(
                    e.kind(),
                    format!("open {}: {e}", device.display()),
                ));
                continue;
            }
        };
        match configure(&dev, &backing_file, file, flags) {
            Ok(()) => {}
            // EBUSY: another attacher bound it first. ENXIO/ENODEV: another process is
            // removing that device right now. Either way, ask for the next free one.
            Err(e @ (Errno::EBUSY | Errno::ENXIO | Errno::ENODEV)) => {
                last_err = Some(io::Error::other(format!(
                    "LOOP_CONFIGURE {}: {e}",
                    device.display()
                )));
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(Errno::EINVAL) if flags & LO_FLAGS_DIRECT_IO != 0 => {
                tracing::warn!(file = %file.display(),
                    "loop direct I/O refused by the pool filesystem; falling back to buffered I/O");
                flags &= !LO_FLAGS_DIRECT_IO;
                if let Err(e) = configure(&dev, &backing_file, file, flags) {
                    last_err = Some(e.into());
                    continue;
                }
            }
            Err(e) => return Err(Error::io(format!("LOOP_CONFIGURE {}", device.display()), e)),
        }
        if let Ok(m) = backing_file.metadata() {
            super::index::learn(
                &device,
                crate::datapath::blockdev::FileId::from_metadata(&m),
            );
        }
        let direct_io = dio_enabled(&device);
        return Ok(Attached {
            device,
            created: true,
            direct_io,
            read_only,
        });
    }
    Err(Error::io(
        "no free loop device after 64 attempts",
        last_err.unwrap_or_else(|| io::Error::from(Errno::EBUSY)),
    ))
}

/// Loop device numbers this process is attaching right now.
static IN_FLIGHT: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// A device number only this attach may try until it is dropped.
struct Reserved(u32);

impl Drop for Reserved {
    fn drop(&mut self) {
        in_flight().remove(&self.0);
    }
}

fn in_flight() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device for one attach to try: the kernel's free one, unless another attach of this
/// process is already trying it; then a new device made for this attach alone (LOOP_CTL_ADD
/// at the next number that is not taken: one that exists may still be in the making by
/// another caller's GET_FREE and not open yet, so only a device this call added is used).
///
/// Why: a losing LOOP_CONFIGURE is not harmless to the winner. The kernel claims the device
/// exclusively for the loser's attempt before finding it bound, so the winner's mkfs, opening
/// its fresh device O_EXCL at that instant, is refused ("apparently in use by the system"; 2
/// of 3000 stages at 16 at once). Making attaches take turns instead cost 2.5x in attach
/// latency at 16 at once, since LOOP_CONFIGURE waits for its queue to freeze.
fn reserve(control: &File) -> Result<Reserved> {
    // SAFETY: an argument-less ioctl on the open loop-control descriptor.
    let free = unsafe { loop_ctl_get_free(control.as_raw_fd()) }
        .map_err(|e| Error::io("LOOP_CTL_GET_FREE", e))? as u32;
    let mut set = in_flight();
    if set.insert(free) {
        return Ok(Reserved(free));
    }
    let mut n = free;
    loop {
        n += 1;
        if set.contains(&n) {
            continue;
        }
        // SAFETY: LOOP_CTL_ADD takes the device number by value.
        match unsafe { loop_ctl_add(control.as_raw_fd(), n as libc::c_int) } {
            Ok(_) => {
                set.insert(n);
                return Ok(Reserved(n));
            }
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(Error::io(format!("LOOP_CTL_ADD {n}"), e)),
        }
    }
}

/// The post-attach step for direct I/O: older kernels ignore the flag in `LOOP_CONFIGURE`, so
/// ask again explicitly; a pool filesystem that cannot do direct I/O keeps the page cache.
pub(super) fn ensure_direct_io(att: &mut Attached, file: &Path) {
    if att.direct_io {
        return;
    }
    att.direct_io = open_rw(&att.device)
        .is_ok_and(|dev| unsafe { loop_set_direct_io(dev.as_raw_fd(), 1) }.is_ok())
        && dio_enabled(&att.device);
    if !att.direct_io {
        tracing::warn!(device = %att.device.display(), file = %file.display(),
            "direct I/O unavailable on this pool filesystem; loop device uses the page cache");
    }
}

/// The number of a loop device that is free now, without attaching anything (the kernel adds
/// a device when none is free). `loopvol doctor` uses it to prove loop devices can be had.
pub fn free_device() -> Result<u32> {
    let control = open_control()?;
    let n = unsafe { loop_ctl_get_free(control.as_raw_fd()) }
        .map_err(|e| Error::io("LOOP_CTL_GET_FREE", e))?;
    Ok(n as u32)
}

fn configure(dev: &File, backing_file: &File, path: &Path, flags: u32) -> nix::Result<()> {
    let mut info = LoopInfo64::zeroed();
    info.lo_flags = flags;
    let name = path.as_os_str().as_encoded_bytes();
    let n = name.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    let cfg = LoopConfig {
        fd: backing_file.as_raw_fd() as u32,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    unsafe { loop_configure(dev.as_raw_fd(), &cfg) }.map(|_| ())
}

/// `/dev/loopN`, created if devtmpfs has not made it yet (or /dev is a plain directory).
fn ensure_node(n: u64) -> Result<PathBuf> {
    let device = PathBuf::from(format!("/dev/loop{n}"));
    match std::fs::metadata(&device) {
        Ok(m) if m.file_type().is_block_device() => Ok(device),
        Ok(_) => Err(Error::Internal(format!(
            "{} exists but is not a block device",
            device.display()
        ))),
        Err(_) => {
            use nix::sys::stat::{makedev, mknod, Mode, SFlag};
            match mknod(
                &device,
                SFlag::S_IFBLK,
                Mode::from_bits_truncate(0o660),
                makedev(LOOP_MAJOR, n),
            ) {
                Ok(()) | Err(Errno::EEXIST) => Ok(device),
                Err(e) => Err(Error::io(format!("mknod {}", device.display()), e)),
            }
        }
    }
}

/// `/dev/loop-control`, opened as `LOOP_CTL_*` needs it.
pub(super) fn open_control() -> Result<File> {
    open_rw(Path::new(LOOP_CONTROL)).map_err(|e| Error::io(format!("open {LOOP_CONTROL}"), e))
}

fn open_rw(device: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(device)
}

fn sysfs_dir(device: &Path) -> PathBuf {
    let name = device.file_name().unwrap_or_default();
    Path::new("/sys/block").join(name)
}

fn dio_enabled(device: &Path) -> bool {
    std::fs::read_to_string(sysfs_dir(device).join("loop/dio")).is_ok_and(|s| s.trim() == "1")
}

/// `LOOP_CTL_REMOVE`: delete idle node `n`. The kernel refuses (EBUSY) while the device is
/// attached or open.
pub(super) fn remove_node(control: &File, n: u32) -> nix::Result<()> {
    // SAFETY: LOOP_CTL_REMOVE takes the device number by value; no memory is passed.
    unsafe { loop_ctl_remove(control.as_raw_fd(), n as libc::c_int) }.map(drop)
}

/// Flush dirty blocks to the backing file, then detach. If something still holds the device
/// open the kernel defers the detach to the last close (autoclear); we wait briefly for it.
pub fn detach(device: &Path) -> Result<()> {
    let dev = match open_rw(device) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("open {}", device.display()), e)),
    };
    flush(&dev, device)?;
    match unsafe { loop_clr_fd(dev.as_raw_fd()) } {
        Ok(_) | Err(Errno::ENXIO) => {}
        Err(e) => return Err(Error::io(format!("LOOP_CLR_FD {}", device.display()), e)),
    }
    super::index::forget_device(device);
    drop(dev);
    let backing = sysfs_dir(device).join("loop/backing_file");
    for _ in 0..200 {
        if !backing.exists() {
            tracing::info!(device = %device.display(), "loop device detached");
            super::reaper::reap_node(device);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::warn!(device = %device.display(), "loop device still open elsewhere; detach deferred to its last close");
    Ok(())
}

/// Flushes a failed flush is retried with: the first a moment after the failure, the last
/// about a second after it.
const FLUSH_RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_millis(600),
];

/// Flush the device's dirty blocks to its backing file, retrying a failure a few times.
///
/// The kernel keeps a write error for the device (a block the filesystem wrote that could
/// not reach the backing file: a full pool under a thin volume) and reports it once, to the
/// first flush after it, typically the one of the unstage right after the filesystem's
/// unmount wrote its last metadata. The next flush tells whether writes fail *now*: if it
/// succeeds, everything still cached has reached the backing file, the loss happened before
/// (the filesystem recorded it, and the next stage's fsck sees it), and the detach goes on.
/// A flush that keeps failing is a transient refusal (UNAVAILABLE: the CO retries, after the
/// operator freed space), never an internal error.
fn flush(dev: &File, device: &Path) -> Result<()> {
    let Err(first) = dev.sync_all() else {
        return Ok(());
    };
    for pause in FLUSH_RETRIES {
        std::thread::sleep(pause);
        if dev.sync_all().is_ok() {
            tracing::warn!(device = %device.display(), error = %first,
                "earlier writes to the device failed (its backing file's filesystem full?); \
                 the filesystem may have lost them, the next stage checks it");
            return Ok(());
        }
    }
    Err(Error::WriteBack {
        device: device.display().to_string(),
        source: first,
    })
}

/// Make the loop device pick up its backing file's new size (after an expansion).
pub fn refresh_capacity(device: &Path) -> Result<u64> {
    let dev = open_rw(device).map_err(|e| Error::io(format!("open {}", device.display()), e))?;
    unsafe { loop_set_capacity(dev.as_raw_fd()) }
        .map_err(|e| Error::io(format!("LOOP_SET_CAPACITY {}", device.display()), e))?;
    crate::datapath::blockdev::size_of(device)
}
