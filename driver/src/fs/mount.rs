//! Mount state and mount operations.
//!
//! Mount state comes from the kernel, never from `mount` output (whose format is for humans):
//! the mount at one path from statx + statmount ([`super::statmount`], the same cost on any
//! node), and the whole table, when a question needs it, from `/proc/self/mountinfo`, the
//! kernel's exact and escaped view. Parsing that is a ten-field line format, so it is done here
//! rather than pulling in a crate that models all of /proc.

use std::path::{Path, PathBuf};

pub use crate::datapath::DevNum;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    pub major: u32,
    pub minor: u32,
    /// The directory of the source filesystem that is mounted (`/` unless a bind of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (ro/rw, nosuid...).
    pub options: String,
    pub fs_type: String,
    pub source: String,
    /// Superblock options: `ro` here means the filesystem itself is read-only (e.g. errors).
    pub super_options: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }

    pub fn fs_read_only(&self) -> bool {
        self.super_options.split(',').any(|o| o == "ro")
    }

    /// Is this a mount of the filesystem on block device `dev`? Decided by the device number
    /// the kernel reports for the mount, which is the same in every mount namespace (mount
    /// points and the source string are whatever the namespace that mounted it used). btrfs
    /// reports an anonymous device (major 0) instead; only then is the source looked at, as a
    /// device node resolved to its number, never compared as a string.
    pub fn is_from(&self, dev: DevNum) -> bool {
        if self.major == dev.major && self.minor == dev.minor {
            return true;
        }
        self.major == 0
            && self.source.starts_with('/')
            && crate::datapath::blockdev::rdev_of(Path::new(&self.source)) == Some(dev)
    }

    /// Is this mount the filesystem's root (a staging mount, or a bind of one: a publish),
    /// rather than a bind of a directory inside it?
    pub fn is_fs_root(&self) -> bool {
        self.root == Path::new("/")
    }
}

/// Mounts of the filesystem on block device `dev`, in mount order.
pub fn of_device(all: &[MountEntry], dev: DevNum) -> Vec<&MountEntry> {
    all.iter().filter(|m| m.is_from(dev)).collect()
}

/// Bind mounts of the device node `dev` itself (raw block publishes). They carry the device
/// number of the filesystem holding the node (devtmpfs) and a root naming the node, so they
/// are recognised by what sits at the mount point: a block device node with that number.
/// Only mounts that can be binds of a loop device node are stat'ed (a stat of an unrelated
/// mount point, say a dead NFS mount, could hang): ones whose root is a node called `loop*`,
/// or on devtmpfs.
pub fn device_node_binds(all: &[MountEntry], dev: DevNum) -> Vec<&MountEntry> {
    all.iter()
        .filter(|m| {
            !m.is_fs_root()
                && (m.fs_type == "devtmpfs"
                    || m.root
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("loop")))
        })
        .filter(|m| crate::datapath::blockdev::rdev_of(&m.mount_point) == Some(dev))
        .collect()
}

/// Undo mountinfo's octal escapes (`\040` for space and friends).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let id = fields.next()?.parse().ok()?;
    let _parent = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let options = fields.next()?.to_string();
    // Optional fields run until the lone "-" separator.
    for f in fields.by_ref() {
        if f == "-" {
            break;
        }
    }
    let fs_type = fields.next()?.to_string();
    let source = unescape(fields.next()?);
    let super_options = fields.next().unwrap_or("").to_string();
    Some(MountEntry {
        id,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: PathBuf::from(root),
        mount_point: PathBuf::from(mount_point),
        options,
        fs_type,
        source,
        super_options,
    })
}

/// Every mount in our mount namespace, in mount order.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// Canonical form of a path for comparing with mountinfo (which shows resolved paths).
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    MountView::new().at(path)
}

/// This process's view of the mounts, asked each question the cheapest way the kernel allows.
/// What is mounted at a path is one statx and one statmount, whatever the node holds; only a
/// question about every mount of a device reads the whole table, once per view. A node call
/// makes one view, so the calls that only ask about their own paths (publish, unpublish and
/// unstage of a mounted volume) cost the same on a node with a thousand volumes as on an
/// empty one.
#[derive(Default)]
pub struct MountView {
    table: std::cell::OnceCell<Vec<MountEntry>>,
}

impl MountView {
    pub fn new() -> Self {
        Self::default()
    }

    /// The topmost mount at exactly `path`, asked now (never from the cached table, which an
    /// unmount since may have made stale).
    pub fn at(&self, path: &Path) -> Result<Option<MountEntry>> {
        match super::statmount::at(path) {
            super::statmount::Lookup::Mount(m) => Ok(Some(m)),
            super::statmount::Lookup::NotMountRoot => Ok(None),
            // statmount has already ruled out "not a mount root" where statx could tell.
            super::statmount::Lookup::Unsupported => Ok(topmost_at(&mounts()?, path)),
        }
    }

    /// Every mount of the namespace, read on first use and kept for this view's life.
    pub fn all(&self) -> Result<&[MountEntry]> {
        if let Some(t) = self.table.get() {
            return Ok(t);
        }
        let t = mounts()?;
        Ok(self.table.get_or_init(|| t))
    }
}

/// The topmost entry of `all` mounted at exactly `path`.
pub fn topmost_at(all: &[MountEntry], path: &Path) -> Option<MountEntry> {
    let want = canonical(path);
    all.iter().rev().find(|m| m.mount_point == want).cloned()
}

/// Whether `path` is the root of a mount, from statx's STATX_ATTR_MOUNT_ROOT (Linux 5.8+);
/// `None` when the kernel cannot say (older kernel, or the path cannot be stat'ed, e.g. a dead
/// FUSE mount). The common question "is anything mounted on this fresh target?" is thus one
/// syscall instead of parsing a mount table that holds two entries per published volume. The
/// classic st_dev-vs-parent test is no substitute: a bind mount of the same filesystem has its
/// parent's st_dev.
pub fn is_mount_root(path: &Path) -> Option<bool> {
    match super::statmount::root_of(path) {
        super::statmount::Root::No => Some(false),
        super::statmount::Root::Yes(_) => Some(true),
        super::statmount::Root::Unknown => None,
    }
}

/// Mount a filesystem from `device` on `target`.
pub fn mount_fs(
    device: &Path,
    target: &Path,
    fs_type: &str,
    flags: MsFlags,
    data: &str,
) -> Result<()> {
    mount_fs_shown(device, target, target, fs_type, flags, data)
}

/// [`mount_fs`] onto `target` (a `/proc/self/fd/N` of a confined path) while errors name
/// `shown`, the path the request gave.
pub fn mount_fs_shown(
    device: &Path,
    target: &Path,
    shown: &Path,
    fs_type: &str,
    flags: MsFlags,
    data: &str,
) -> Result<()> {
    let data = (!data.is_empty()).then_some(data);
    mount(Some(device), target, Some(fs_type), flags, data).map_err(|e| match (e, data) {
        // The options passed every check we know of, but the kernel still refused them.
        (nix::errno::Errno::EINVAL, Some(opts)) => Error::InvalidArgument(format!(
            "{fs_type} refused to mount {} with options {opts:?} (EINVAL)",
            device.display()
        )),
        (e, _) => Error::io(
            format!(
                "mount {} ({fs_type}) on {}",
                device.display(),
                shown.display()
            ),
            e,
        ),
    })
}

/// Bind `source` onto `target`; a read-only bind takes a second remount call, because the
/// kernel ignores MS_RDONLY on the initial MS_BIND.
pub fn bind(source: &Path, target: &Path, read_only: bool, extra: MsFlags) -> Result<()> {
    bind_only(source, target, source, target)?;
    restrict_bind(target, target, read_only, extra)
}

/// The first half of [`bind`]: the plain MS_BIND, with errors naming `shown_*` (the request's
/// paths when the others are `/proc/self/fd/N` of confined paths).
pub fn bind_only(
    source: &Path,
    target: &Path,
    shown_source: &Path,
    shown_target: &Path,
) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        Error::io(
            format!(
                "bind {} on {}",
                shown_source.display(),
                shown_target.display()
            ),
            e,
        )
    })
}

/// The second half of [`bind`]: make the new bind at `target` read-only and apply `extra`'s
/// per-mount flags, or unmount it. `target` must reach the new mount's root (a descriptor
/// opened before the bind reaches the directory under it).
pub fn restrict_bind(target: &Path, shown: &Path, read_only: bool, extra: MsFlags) -> Result<()> {
    let target_shown = shown;
    let per_mount = extra
        & (MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC
            | MsFlags::MS_NOATIME
            | MsFlags::MS_NODIRATIME
            | MsFlags::MS_RELATIME);
    if read_only || !per_mount.is_empty() {
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | per_mount;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            // Never leave a writable bind behind a failed read-only request.
            let _ = umount2(target, MntFlags::empty());
            return Err(Error::io(
                format!("remount {} read-only", target_shown.display()),
                e,
            ));
        }
    }
    Ok(())
}

/// Unmount `target`; a busy mount is reported, never lazily detached (a lazy unmount would let
/// the loop device be detached under a filesystem that is still in use).
pub fn unmount(target: &Path) -> Result<()> {
    // Never through a symlink: a request's path is checked to have none, and one swapped in
    // since must not redirect the unmount.
    // A busy answer can come from a holder of a moment: another RPC's confinement walk
    // (paths::check) opens each component of a path that lies in this mount, for microseconds.
    // Such a holder is waited out briefly before the mount is called busy.
    for attempt in 0.. {
        match umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) if attempt < 20 => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(nix::errno::Errno::EBUSY) => {
                return Err(Error::FailedPrecondition(format!(
                    "{} is busy (a process still uses it); retry when it is released",
                    target.display()
                )))
            }
            Err(e) => return Err(Error::io(format!("unmount {}", target.display()), e)),
        }
    }
    unreachable!("the loop above returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 7:3 / /stage ro,relatime - xfs /dev/loop3 ro,attr2\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!((m[0].major, m[0].minor), (98, 0));
        assert_eq!(m[0].root, PathBuf::from("/mnt1"));
        assert_eq!(m[0].fs_type, "ext3");
        assert!(!m[0].read_only());
        assert_eq!(m[1].source, "/dev/loop3");
        assert!(m[1].read_only() && m[1].fs_read_only());
    }

    #[test]
    fn knows_mount_roots_without_the_table() {
        assert_eq!(is_mount_root(Path::new("/")), Some(true));
        assert_eq!(is_mount_root(Path::new("/proc")), Some(true));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(is_mount_root(dir.path()), Some(false));
        assert_eq!(is_mount_root(&dir.path().join("missing")), Some(false));
        assert_eq!(mount_at(dir.path()).unwrap(), None);
    }

    #[test]
    fn reads_the_real_table() {
        let all = mounts().unwrap();
        assert!(all.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
