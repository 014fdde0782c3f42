//! One mount's facts straight from the kernel, without reading the whole mount table:
//! `statx(STATX_MNT_ID_UNIQUE)` names the mount a path resolves to and says whether the path
//! is that mount's root, and `statmount(2)` (Linux 6.8+) describes that one mount.
//!
//! Why: `/proc/self/mountinfo` is generated in full on every read, two lines per published
//! volume, under the namespace lock that every mount and unmount also takes. At 1000 published
//! volumes one read cost ~2 ms of CPU, and with 16 node calls reading it at once, publish waited
//! 78 ms for it. A statmount answer costs the same whether the node has ten mounts or ten
//! thousand.
//!
//! Written by hand because neither libc nor nix nor rustix wraps statmount yet; the layout is
//! the kernel's uapi `struct statmount`, whose fixed part is 512 bytes in every version (new
//! fields take spare space). Any kernel that lacks a piece (no statmount, no unique mount ID)
//! makes [`at`] answer [`Lookup::Unsupported`], and callers read mountinfo as before.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::mount::MountEntry;

/// What the kernel said about the mount at a path.
#[derive(Debug)]
pub enum Lookup {
    /// `path` is the root of this mount (the topmost one there).
    Mount(MountEntry),
    /// Nothing is mounted at exactly `path` (or nothing exists there).
    NotMountRoot,
    /// This kernel cannot answer this way; read the mount table instead.
    Unsupported,
}

#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
const SYS_STATMOUNT: libc::c_long = 457;
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
const SYS_STATMOUNT: libc::c_long = -1;

const STATMOUNT_SB_BASIC: u64 = 0x1;
const STATMOUNT_MNT_BASIC: u64 = 0x2;
const STATMOUNT_MNT_ROOT: u64 = 0x8;
const STATMOUNT_MNT_POINT: u64 = 0x10;
const STATMOUNT_FS_TYPE: u64 = 0x20;
const STATMOUNT_MNT_OPTS: u64 = 0x80;
const STATMOUNT_FS_SUBTYPE: u64 = 0x100;
const STATMOUNT_SB_SOURCE: u64 = 0x200;
const WANT: u64 = STATMOUNT_SB_BASIC
    | STATMOUNT_MNT_BASIC
    | STATMOUNT_MNT_ROOT
    | STATMOUNT_MNT_POINT
    | STATMOUNT_FS_TYPE
    | STATMOUNT_MNT_OPTS
    | STATMOUNT_FS_SUBTYPE
    | STATMOUNT_SB_SOURCE;
/// What an answer must carry to stand in for a mountinfo line (the source, the options and the
/// subtype came in later kernels and are left empty without them).
const NEEDED: u64 = STATMOUNT_SB_BASIC
    | STATMOUNT_MNT_BASIC
    | STATMOUNT_MNT_ROOT
    | STATMOUNT_MNT_POINT
    | STATMOUNT_FS_TYPE;

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_ATIME_MASK: u64 = 0x70;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;
const MOUNT_ATTR_NOSYMFOLLOW: u64 = 0x0020_0000;
const SB_RDONLY: u32 = 1;
const SB_SYNCHRONOUS: u32 = 1 << 4;
const SB_DIRSYNC: u32 = 1 << 7;
const SB_LAZYTIME: u32 = 1 << 25;

/// `struct mnt_id_req`, first published size (24 bytes).
#[repr(C)]
struct MntIdReq {
    size: u32,
    spare: u32,
    mnt_id: u64,
    param: u64,
}

/// The fixed part of `struct statmount`, as far as loopvol reads it; the rest of its 512 bytes
/// is padding here.
#[repr(C)]
#[derive(Clone, Copy)]
struct StatmountHead {
    size: u32,
    mnt_opts: u32,
    mask: u64,
    sb_dev_major: u32,
    sb_dev_minor: u32,
    sb_magic: u64,
    sb_flags: u32,
    fs_type: u32,
    mnt_id: u64,
    mnt_parent_id: u64,
    mnt_id_old: u32,
    mnt_parent_id_old: u32,
    mnt_attr: u64,
    mnt_propagation: u64,
    mnt_peer_group: u64,
    mnt_master: u64,
    propagate_from: u64,
    mnt_root: u32,
    mnt_point: u32,
    mnt_ns_id: u64,
    fs_subtype: u32,
    sb_source: u32,
}

/// Size of the kernel's fixed part, where the strings begin.
const FIXED: usize = 512;
const _: () = assert!(std::mem::size_of::<StatmountHead>() <= FIXED);

/// Set once the kernel has answered ENOSYS (or lacks unique mount IDs), so that later calls go
/// straight to mountinfo.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// The topmost mount at `path`, if `path` is a mount's root. Symlinks in `path` are followed,
/// as `stat` does; callers pass paths they have checked to contain none.
pub fn at(path: &Path) -> Lookup {
    if UNSUPPORTED.load(Ordering::Relaxed) || SYS_STATMOUNT < 0 {
        return Lookup::Unsupported;
    }
    // A mount can go between the statx and the statmount (ENOENT): ask again.
    for _ in 0..3 {
        let id = match mount_id_at(path) {
            Ok(Some(id)) => id,
            Ok(None) => return Lookup::NotMountRoot,
            Err(Unsup) => return Lookup::Unsupported,
        };
        match statmount(id) {
            Ok(Some(m)) => return Lookup::Mount(m),
            Ok(None) => continue,
            Err(Unsup) => return Lookup::Unsupported,
        }
    }
    Lookup::Unsupported
}

struct Unsup;

/// What statx says of `path` as a mount: STATX_ATTR_MOUNT_ROOT (Linux 5.8+) and, where the
/// kernel has them (6.8+), the mount's unique ID.
pub enum Root {
    /// Not the root of a mount, or nothing there.
    No,
    /// The root of a mount; `None` when this kernel has no unique mount IDs.
    Yes(Option<u64>),
    /// The kernel cannot say (older kernel, or the path cannot be stat'ed, e.g. a dead FUSE
    /// mount).
    Unknown,
}

/// statx of `path`, following symlinks as `stat` does.
pub fn root_of(path: &Path) -> Root {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return Root::Unknown;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `buf` a zeroed, properly sized statx
    // buffer the kernel fills; nothing is retained after the call.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_SYNC_AS_STAT,
            libc::STATX_BASIC_STATS | libc::STATX_MNT_ID_UNIQUE,
            &mut buf,
        )
    };
    if rc != 0 {
        return match io::Error::last_os_error().raw_os_error() {
            // Nothing at the path, so nothing can be mounted there.
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => Root::No,
            _ => Root::Unknown,
        };
    }
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if buf.stx_attributes_mask & bit == 0 {
        return Root::Unknown;
    }
    if buf.stx_attributes & bit == 0 {
        return Root::No;
    }
    Root::Yes((buf.stx_mask & libc::STATX_MNT_ID_UNIQUE != 0).then_some(buf.stx_mnt_id))
}

/// The unique ID of the mount `path` is the root of; `None` when it is no mount's root.
fn mount_id_at(path: &Path) -> Result<Option<u64>, Unsup> {
    match root_of(path) {
        Root::No => Ok(None),
        Root::Yes(Some(id)) => Ok(Some(id)),
        Root::Yes(None) => {
            UNSUPPORTED.store(true, Ordering::Relaxed);
            Err(Unsup)
        }
        Root::Unknown => Err(Unsup),
    }
}

/// statmount(2) of mount `id`; `None` when that mount is gone.
fn statmount(id: u64) -> Result<Option<MountEntry>, Unsup> {
    let req = MntIdReq {
        size: std::mem::size_of::<MntIdReq>() as u32,
        spare: 0,
        mnt_id: id,
        param: WANT,
    };
    // u64 words keep the buffer aligned for the header.
    let mut words = FIXED / 8 + 512;
    loop {
        let mut buf = vec![0u64; words];
        let bytes = words * 8;
        // SAFETY: `req` is a valid mnt_id_req of the size it declares and `buf` a writable
        // buffer of `bytes` bytes; the kernel writes at most that many and keeps neither.
        let rc = unsafe {
            libc::syscall(
                SYS_STATMOUNT,
                &req as *const MntIdReq,
                buf.as_mut_ptr(),
                bytes,
                0u32,
            )
        };
        if rc != 0 {
            return match io::Error::last_os_error().raw_os_error() {
                Some(libc::EOVERFLOW) if words < 1 << 16 => {
                    words *= 4;
                    continue;
                }
                Some(libc::ENOENT) => Ok(None),
                Some(libc::ENOSYS) => {
                    UNSUPPORTED.store(true, Ordering::Relaxed);
                    Err(Unsup)
                }
                _ => Err(Unsup),
            };
        }
        // SAFETY: the buffer is at least FIXED bytes, 8-aligned, and the kernel filled the
        // fixed part; StatmountHead is plain integers, valid for any bit pattern.
        let head: StatmountHead = unsafe { std::ptr::read(buf.as_ptr() as *const StatmountHead) };
        // SAFETY: a byte view of the same initialised buffer.
        let raw = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, bytes) };
        return Ok(entry(&head, raw));
    }
}

/// A NUL-terminated string of the answer's string area, when its mask bit says it was filled.
fn string(head: &StatmountHead, raw: &[u8], bit: u64, offset: u32) -> Option<String> {
    if head.mask & bit == 0 {
        return None;
    }
    let area = raw.get(FIXED..(head.size as usize).min(raw.len()))?;
    let s = area.get(offset as usize..)?;
    let end = s.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&s[..end]).into_owned())
}

fn entry(head: &StatmountHead, raw: &[u8]) -> Option<MountEntry> {
    if head.mask & NEEDED != NEEDED {
        return None;
    }
    let s = |bit, off| string(head, raw, bit, off);
    let mut fs_type = s(STATMOUNT_FS_TYPE, head.fs_type)?;
    if let Some(sub) = s(STATMOUNT_FS_SUBTYPE, head.fs_subtype).filter(|t| !t.is_empty()) {
        fs_type = format!("{fs_type}.{sub}");
    }
    let mut super_options = vec![if head.sb_flags & SB_RDONLY != 0 {
        "ro"
    } else {
        "rw"
    }
    .to_string()];
    for (flag, name) in [
        (SB_SYNCHRONOUS, "sync"),
        (SB_DIRSYNC, "dirsync"),
        (SB_LAZYTIME, "lazytime"),
    ] {
        if head.sb_flags & flag != 0 {
            super_options.push(name.into());
        }
    }
    if let Some(o) = s(STATMOUNT_MNT_OPTS, head.mnt_opts).filter(|o| !o.is_empty()) {
        super_options.push(o);
    }
    Some(MountEntry {
        id: head.mnt_id_old,
        major: head.sb_dev_major,
        minor: head.sb_dev_minor,
        root: PathBuf::from(s(STATMOUNT_MNT_ROOT, head.mnt_root)?),
        mount_point: PathBuf::from(s(STATMOUNT_MNT_POINT, head.mnt_point)?),
        options: per_mount_options(head.mnt_attr),
        fs_type,
        source: s(STATMOUNT_SB_SOURCE, head.sb_source).unwrap_or_default(),
        super_options: super_options.join(","),
    })
}

/// The per-mount options as mountinfo's sixth field spells them.
fn per_mount_options(attr: u64) -> String {
    let mut o = vec![if attr & MOUNT_ATTR_RDONLY != 0 {
        "ro"
    } else {
        "rw"
    }];
    for (bit, name) in [
        (MOUNT_ATTR_NOSUID, "nosuid"),
        (MOUNT_ATTR_NODEV, "nodev"),
        (MOUNT_ATTR_NOEXEC, "noexec"),
    ] {
        if attr & bit != 0 {
            o.push(name);
        }
    }
    o.push(match attr & MOUNT_ATTR_ATIME_MASK {
        MOUNT_ATTR_NOATIME => "noatime",
        MOUNT_ATTR_STRICTATIME => "strictatime",
        _ => "relatime",
    });
    if attr & MOUNT_ATTR_NODIRATIME != 0 {
        o.push("nodiratime");
    }
    if attr & MOUNT_ATTR_NOSYMFOLLOW != 0 {
        o.push("nosymfollow");
    }
    o.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::mount;

    /// statmount's answer for `path` is the mountinfo line for it, field by field.
    fn same_as_mountinfo(path: &Path) {
        let Lookup::Mount(m) = at(path) else {
            panic!("no statmount answer for {}", path.display());
        };
        let want = mount::topmost_at(&mount::mounts().unwrap(), path).unwrap();
        assert_eq!(
            (m.id, m.major, m.minor, &m.root, &m.mount_point, &m.fs_type),
            (
                want.id,
                want.major,
                want.minor,
                &want.root,
                &want.mount_point,
                &want.fs_type
            )
        );
        assert_eq!(m.source, want.source);
        assert_eq!(m.read_only(), want.read_only());
        assert_eq!(m.fs_read_only(), want.fs_read_only());
        let opts = |s: &str| -> Vec<String> { s.split(',').map(String::from).collect() };
        assert_eq!(opts(&m.options), opts(&want.options), "{}", path.display());
        assert_eq!(
            opts(&m.super_options),
            opts(&want.super_options),
            "{}",
            path.display()
        );
    }

    #[test]
    fn answers_like_mountinfo_for_the_real_mounts() {
        for p in ["/", "/proc", "/sys"] {
            same_as_mountinfo(Path::new(p));
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(at(dir.path()), Lookup::NotMountRoot));
        assert!(matches!(at(&dir.path().join("gone")), Lookup::NotMountRoot));
    }

    #[test]
    fn answers_like_mountinfo_for_a_mount_with_options_and_a_bind() {
        if !crate::shared::root_or_skip(
            "answers_like_mountinfo_for_a_mount_with_options_and_a_bind",
        ) {
            return;
        }
        use nix::mount::{mount as sys_mount, umount2, MntFlags, MsFlags};
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a b"), dir.path().join("bind"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        sys_mount(
            Some("loopvol-test"),
            &a,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOATIME,
            Some("size=1m,mode=700"),
        )
        .unwrap();
        std::fs::create_dir(a.join("sub")).unwrap();
        let bound = sys_mount(
            Some(&a.join("sub")),
            &b,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        );
        let checks = std::panic::catch_unwind(|| {
            bound.unwrap();
            same_as_mountinfo(&a);
            same_as_mountinfo(&b);
            let Lookup::Mount(m) = at(&b) else { panic!() };
            assert_eq!(m.root, Path::new("/sub"));
            assert!(!m.is_fs_root());
        });
        let _ = umount2(&b, MntFlags::empty());
        umount2(&a, MntFlags::empty()).unwrap();
        checks.unwrap();
    }
}
