//! Which loop devices are backed by a given file. This is how loopvol avoids ever attaching one
//! image twice (two loop devices over one ext4 image corrupt it) and how a restarted driver
//! rediscovers the devices it attached before it died: the kernel is the source of truth, not
//! our memory.
//!
//! A backing file is recognised by its identity, the device and inode number the kernel reports
//! through `LOOP_GET_STATUS64`, compared with `stat` of the image. Never by the path in
//! `/sys/block/loopN/loop/backing_file`: the kernel prints that path through the mount the file
//! was opened by, so once the mount namespace that attached the device is gone (a node plugin
//! container that restarted) it reads relative to that namespace's bind mount (`/volumes/x.img`
//! instead of `/var/lib/loopvol/volumes/x.img`), and a path comparison misses every device the
//! old container attached. The path is kept in [`LoopInfo`] for people to read.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use crate::datapath::blockdev::{files_under, DevNum, FileId};
use crate::datapath::Attachment as LoopInfo;
use std::path::{Path, PathBuf};

const SYS_BLOCK: &str = "/sys/block";
pub const LO_NAME_SIZE: usize = 64;
pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

/// The kernel's `struct loop_info64`, shared by `LOOP_GET_STATUS64` here and `LOOP_CONFIGURE`
/// in `ioctl`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LoopInfo64 {
    /// The backing file's `st_dev`, in the kernel's `new_encode_dev` encoding.
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; LO_NAME_SIZE],
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    pub lo_encrypt_key: [u8; 32],
    pub lo_init: [u64; 2],
}

impl LoopInfo64 {
    pub fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }
}

nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);

/// Every attached loop device on the machine.
pub fn attached_loops() -> Vec<LoopInfo> {
    scan(|_| true)
}

/// What a scan knows about a device before deciding whether to keep it.
pub struct Candidate<'a> {
    pub backing: Option<FileId>,
    pub backing_file: &'a Path,
    pub backing_deleted: bool,
}

/// The backing file of the loop device whose sysfs directory is `dir` as sysfs prints it, if
/// the device is attached, and whether that file was unlinked since. Detached devices have no
/// `backing_file` attribute, so this is also the cheap "is it attached?" test that spares the
/// scan an open and an ioctl on every idle device.
fn sysfs_backing(dir: &Path) -> Option<(PathBuf, bool)> {
    let raw = fs::read_to_string(dir.join("loop/backing_file")).ok()?;
    let raw = raw.trim_end_matches('\n');
    Some(match raw.strip_suffix(" (deleted)") {
        Some(p) => (PathBuf::from(p), true),
        None => (PathBuf::from(raw), false),
    })
}

/// Open a loop device node just to ask it questions: read-only, so udev sees no change event.
fn open_device(device: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(device)
}

/// What the kernel says about an attached device: its number and its `loop_info64`. `Err`
/// with `PermissionDenied` when this process may not open it; `Ok(None)` when it is not an
/// attached loop device (any more).
fn kernel_status(device: &Path) -> io::Result<Option<(DevNum, LoopInfo64)>> {
    let f = match open_device(device) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let m = f.metadata()?;
    if !m.file_type().is_block_device() {
        return Ok(None);
    }
    let mut info = LoopInfo64::zeroed();
    // SAFETY: `info` is a properly sized, writable loop_info64 that the kernel fills in; the
    // descriptor is an open loop device. Nothing is retained after the call.
    match unsafe { loop_get_status64(f.as_raw_fd(), &mut info) } {
        Ok(_) => Ok(Some((DevNum::from_user(m.rdev()), info))),
        // ENXIO: not bound to a file (detached since sysfs was read).
        Err(_) => Ok(None),
    }
}

/// A device, described, once it is known to be kept.
fn describe(dir: &Path, name: &str, c: &Candidate, dev: DevNum, flags: Option<u32>) -> LoopInfo {
    let attr = |a: &str| fs::read_to_string(dir.join(a)).is_ok_and(|s| s.trim() == "1");
    let (read_only, direct_io) = match flags {
        // The kernel's own flags; `ro` in sysfs also covers a BLKROSET on the device.
        Some(f) => (
            f & LO_FLAGS_READ_ONLY != 0 || attr("ro"),
            f & LO_FLAGS_DIRECT_IO != 0,
        ),
        None => (attr("ro"), attr("loop/dio")),
    };
    LoopInfo {
        device: Path::new("/dev").join(name),
        dev,
        backing: c.backing,
        backing_file: c.backing_file.to_path_buf(),
        backing_deleted: c.backing_deleted,
        read_only,
        direct_io,
    }
}

/// The device number sysfs gives a block device (`/sys/block/loopN/dev`, "7:3").
fn sysfs_dev(dir: &Path) -> Option<DevNum> {
    let s = fs::read_to_string(dir.join("dev")).ok()?;
    let (ma, mi) = s.trim().split_once(':')?;
    Some(DevNum {
        major: ma.parse().ok()?,
        minor: mi.parse().ok()?,
    })
}

/// One device by name (`loop3`): `None` unless attached and accepted by `keep`.
fn probe(name: &str, keep: &dyn Fn(&Candidate) -> bool) -> Option<LoopInfo> {
    let dir = Path::new(SYS_BLOCK).join(name);
    let (backing_file, backing_deleted) = sysfs_backing(&dir)?;
    let device = Path::new("/dev").join(name);
    match kernel_status(&device) {
        Ok(Some((dev, info))) => {
            let c = Candidate {
                backing: Some(FileId {
                    dev: DevNum::from_kernel(info.lo_device),
                    ino: info.lo_inode,
                }),
                backing_file: &backing_file,
                backing_deleted,
            };
            keep(&c).then(|| describe(&dir, name, &c, dev, Some(info.lo_flags)))
        }
        Ok(None) => None,
        // Without the right to open the device (an unprivileged process: `loopvol status` as
        // a user, a controller without CAP_SYS_ADMIN) only sysfs is readable: the device is
        // offered without an identity and `keep` decides from what is left.
        Err(e) => {
            tracing::debug!(device = %device.display(), error = %e, "cannot ask a loop device for its backing file's identity");
            let c = Candidate {
                backing: None,
                backing_file: &backing_file,
                backing_deleted,
            };
            let dev = sysfs_dev(&dir)?;
            keep(&c).then(|| describe(&dir, name, &c, dev, None))
        }
    }
}

/// Attached loop devices that `keep` accepts. Idle devices cost one failed sysfs read;
/// attached ones an open and an ioctl each, and only the kept ones are described further.
pub fn scan(keep: impl Fn(&Candidate) -> bool) -> Vec<LoopInfo> {
    let Ok(entries) = fs::read_dir(SYS_BLOCK) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") {
            continue;
        }
        if let Some(l) = probe(name, &keep) {
            out.push(l);
        }
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

/// Does the scanned device `c` read `file` (whose identity is `want`)? By identity; only a
/// device this process may not open is matched by its sysfs path, the one thing left to go on,
/// and then only a path that is the file's own in this mount namespace.
fn reads(c: &Candidate, want: FileId, file: &Path) -> bool {
    match c.backing {
        Some(id) => id == want,
        None => !c.backing_deleted && c.backing_file == canonical(file),
    }
}

fn canonical(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `device` (e.g. `/dev/loop3`) if it is backed by `file` right now. One open and one ioctl
/// instead of a scan of every loop device, for callers that remember which device they
/// attached: the kernel still has the last word, so a stale memory only costs a scan.
pub fn loop_if_backed_by(device: &Path, file: &Path) -> Option<LoopInfo> {
    backed_at(device, file, FileId::of(file)?)
}

/// [`loop_if_backed_by`] of `file`, whose identity the caller has read already.
fn backed_at(device: &Path, file: &Path, want: FileId) -> Option<LoopInfo> {
    let name = device.strip_prefix("/dev").ok()?.to_str()?;
    if !name.starts_with("loop") || name.contains('/') {
        return None;
    }
    probe(name, &|c| reads(c, want, file))
}

/// Loop devices currently backed by `file` (normally zero or one). When nothing on the machine
/// has the file open (see [`open_elsewhere`]), no loop device can be backed by it and the
/// answer comes without a scan: the common case of a first stage, a delete or an unstage's
/// last check costs the same on a node with a thousand volumes as on an empty one.
pub fn loops_backed_by(file: &Path) -> Vec<LoopInfo> {
    match FileId::of(file) {
        Some(want) => backed_by(file, want),
        None => Vec::new(),
    }
}

/// [`loops_backed_by`] of `file`, whose identity the caller has read already.
fn backed_by(file: &Path, want: FileId) -> Vec<LoopInfo> {
    if open_elsewhere(file) == Some(false) {
        super::index::forget_file(want);
        return Vec::new();
    }
    let found = scan(|c| reads(c, want, file));
    match found.first() {
        Some(l) => super::index::learn(&l.device, want),
        None => super::index::forget_file(want),
    }
    found
}

/// A loop device backed by `file`, if any: the one the attachment index remembers when the
/// kernel confirms it (one open and one ioctl), else what [`loops_backed_by`] finds.
pub fn first_backed_by(file: &Path) -> Option<LoopInfo> {
    let want = FileId::of(file)?;
    if let Some(device) = super::index::remembered(want) {
        if let Some(l) = backed_at(&device, file, want) {
            return Some(l);
        }
        super::index::forget_device(&device);
    }
    backed_by(file, want).into_iter().next()
}

const F_SETLEASE: libc::c_int = 1024;
const F_SETSIG: libc::c_int = 10;

/// Does anything on the machine hold `file` open right now? `Some(false)` is a proof that no
/// loop device is backed by it: a loop device keeps an open `struct file` of its backing file
/// from `LOOP_CONFIGURE` to its detach, whichever process or mount namespace attached it, and
/// the kernel grants a write lease only on a file that no other open file description refers
/// to, for reading or writing (`check_conflicting_open`: `i_writecount` and `i_readcount`).
/// `Some(true)`: something has it open (a loop device, or a copy, or anything else: the caller
/// must look closer). `None`: the question cannot be asked here (leases disabled by
/// `fs.leases-enable`, a pool filesystem without lease support, no CAP_LEASE over a file
/// owned by someone else): the caller must look closer too.
///
/// The lease is released at once. While it is held an `open` of the file by someone else waits
/// for its release (microseconds) and the kernel signals the lease holder: `F_SETSIG` makes
/// that signal SIGURG, whose default action is to ignore it, instead of SIGIO, whose default
/// action would terminate this process.
pub fn open_elsewhere(file: &Path) -> Option<bool> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(file)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let fd = f.as_raw_fd();
    // SAFETY: plain fcntl calls on a descriptor this function owns; no memory is passed.
    unsafe {
        if libc::fcntl(fd, F_SETSIG, libc::SIGURG) != 0 {
            return None;
        }
        if libc::fcntl(fd, F_SETLEASE, libc::F_WRLCK) == 0 {
            libc::fcntl(fd, F_SETLEASE, libc::F_UNLCK);
            return Some(false);
        }
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// Loop devices backed by a file under `dir` (used to report and clean up a pool): every file
/// there, by identity. A backing file that was deleted while attached has no identity left to
/// compare with; it is included when it was on `dir`'s filesystem and sysfs still prints it
/// under `dir` (that is, this mount namespace attached it). One deleted while attached from a
/// vanished namespace cannot be told apart from any other deleted file and is left out.
pub fn loops_under(dir: &Path) -> Vec<LoopInfo> {
    let files = files_under(dir);
    let canon = canonical(dir);
    let fs_dev = fs::metadata(&canon)
        .ok()
        .map(|m| DevNum::from_user(m.dev()));
    scan(|c| match c.backing {
        Some(id) if files.contains(&id) => true,
        Some(id) => {
            c.backing_deleted && Some(id.dev) == fs_dev && c.backing_file.starts_with(&canon)
        }
        None => c.backing_file.starts_with(&canon),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lease probe sees any other open file description of the file, read-only ones too,
    /// and nothing once they are closed.
    #[test]
    fn open_elsewhere_sees_every_other_open() {
        // Another test of this process that forks (mkfs, losetup) shares every descriptor of
        // ours with its child until the child's exec closes them, so a closed file can still
        // read as open for a moment: the CI run failed on that once. Give it that moment.
        let closed = |file: &Path| {
            for _ in 0..200 {
                if open_elsewhere(file) == Some(false) {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            false
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("image");
        File::create(&file).unwrap().set_len(1 << 20).unwrap();
        assert!(closed(&file));
        let reader = File::open(&file).unwrap();
        assert_eq!(open_elsewhere(&file), Some(true));
        drop(reader);
        let writer = OpenOptions::new().write(true).open(&file).unwrap();
        assert_eq!(open_elsewhere(&file), Some(true));
        drop(writer);
        assert!(closed(&file));
        assert!(loops_backed_by(&file).is_empty());
        // Not a regular file: no answer, so callers scan.
        assert_eq!(open_elsewhere(dir.path()), None);
        assert_eq!(open_elsewhere(&dir.path().join("missing")), None);
    }

    #[test]
    fn kernel_and_user_device_numbers_agree() {
        // new_encode_dev(MKDEV(259, 300)) as the kernel computes it.
        let (major, minor) = (259u64, 300u64);
        let kernel = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        assert_eq!(
            DevNum::from_kernel(kernel),
            DevNum {
                major: 259,
                minor: 300
            }
        );
        let user = libc::makedev(259, 300);
        assert_eq!(DevNum::from_user(user), DevNum::from_kernel(kernel));
        assert_eq!(DevNum::from_kernel(254 << 8).to_string(), "254:0");
    }
}
