//! Publishing a directory: a bind of the staging mount, restricted before it becomes visible.

use super::*;

/// Bind the staged filesystem at `staging` onto the directory `target` (prepared through the
/// confinement), both reached through descriptors, restricted (read-only, per-mount flags)
/// before it becomes visible: the new mount API clones the staging mount detached, sets its
/// attributes, then attaches it. With the old two-step bind and remount, a driver killed in
/// between left a writable bind where a read-only publish was asked for (and every retry then
/// answered ALREADY_EXISTS). Kernels without the new API (before 5.12) get the two steps.
pub fn bind_dir(
    c: &Confinement,
    staging: &Path,
    target: &Opened,
    read_only: bool,
    extra: nix::mount::MsFlags,
) -> Result<()> {
    let source = c.open_dir("staging_target_path", staging, false)?;
    match bind_detached(&source, target, read_only, extra) {
        Err(Errno::ENOSYS) => {}
        Err(e) => {
            return Err(Error::io(
                format!("bind {} on {}", staging.display(), target.path.display()),
                e,
            ))
        }
        Ok(()) => return Ok(()),
    }
    crate::fs::mount::bind_only(
        &source.proc_path(),
        &target.proc_path(),
        staging,
        &target.path,
    )?;
    let top = match c.open_dir("target_path", &target.path, false) {
        Ok(t) => t,
        Err(e) => {
            let _ = nix::mount::umount2(&target.proc_path(), nix::mount::MntFlags::MNT_DETACH);
            return Err(e);
        }
    };
    crate::fs::mount::restrict_bind(&top.proc_path(), &target.path, read_only, extra)
}

// From <linux/mount.h>; libc has the syscall numbers but not these.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_ATIME: u64 = 0x70;
const MOUNT_ATTR_RELATIME: u64 = 0x0;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// open_tree(OPEN_TREE_CLONE) of `source`, mount_setattr, move_mount onto `target`.
fn bind_detached(
    source: &Opened,
    target: &Opened,
    read_only: bool,
    extra: nix::mount::MsFlags,
) -> std::result::Result<(), Errno> {
    use nix::mount::MsFlags as F;
    use std::os::fd::FromRawFd;
    let empty = c"";
    // SAFETY: plain syscalls on descriptors we own and a NUL-terminated empty path; the
    // returned descriptor is owned right away.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            source.fd.as_raw_fd(),
            empty.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    let tree = Errno::result(tree)?;
    // SAFETY: open_tree returned a new descriptor.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let mut attr = MountAttr {
        attr_set: 0,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    for (ms, at) in [
        (F::MS_NOSUID, MOUNT_ATTR_NOSUID),
        (F::MS_NODEV, MOUNT_ATTR_NODEV),
        (F::MS_NOEXEC, MOUNT_ATTR_NOEXEC),
        (F::MS_NODIRATIME, MOUNT_ATTR_NODIRATIME),
    ] {
        if extra.contains(ms) {
            attr.attr_set |= at;
        }
    }
    for (ms, at) in [
        (F::MS_NOATIME, MOUNT_ATTR_NOATIME),
        (F::MS_RELATIME, MOUNT_ATTR_RELATIME),
    ] {
        if extra.contains(ms) {
            attr.attr_clr |= MOUNT_ATTR_ATIME;
            attr.attr_set |= at;
        }
    }
    if read_only {
        attr.attr_set |= MOUNT_ATTR_RDONLY;
    }
    if attr.attr_set != 0 || attr.attr_clr != 0 {
        // SAFETY: as above; `attr` is a properly laid out struct mount_attr.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint,
                &mut attr as *mut MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        Errno::result(r)?;
    }
    // SAFETY: as above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.fd.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    Errno::result(r).map(drop)
}
