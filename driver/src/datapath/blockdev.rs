//! What any block device can be asked, whatever data path made it: its number, its size,
//! whether a filesystem holds it, and the identity of files (which is how an image is
//! recognised behind a device in every mount namespace).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);

/// A device number split into major and minor, so the kernel's and userspace's encodings of
/// `dev_t` are never compared as raw integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    /// From a `dev_t` as userspace (`stat`, glibc's `makedev`) encodes it.
    pub fn from_user(dev: u64) -> DevNum {
        DevNum {
            major: libc::major(dev as libc::dev_t),
            minor: libc::minor(dev as libc::dev_t),
        }
    }

    /// From the kernel's `new_encode_dev`/`huge_encode_dev` form, which `loop_info64` uses:
    /// minor bits 0-7, major bits 8-19, the rest of the minor above.
    pub fn from_kernel(dev: u64) -> DevNum {
        DevNum {
            major: ((dev & 0xfff00) >> 8) as u32,
            minor: ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32,
        }
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// Which file a loop device reads: the filesystem it is on and its inode number. Unlike a
/// path, this is the same in every mount namespace. An inode number is not reused while the
/// file is open, and a loop device holds its backing file open, so an attached device's
/// identity names exactly one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: DevNum,
    pub ino: u64,
}

impl FileId {
    /// The identity of the file at `path` (following symlinks), if it exists.
    pub fn of(path: &Path) -> Option<FileId> {
        fs::metadata(path).ok().map(|m| FileId::from_metadata(&m))
    }

    pub fn from_metadata(m: &fs::Metadata) -> FileId {
        FileId {
            dev: DevNum::from_user(m.dev()),
            ino: m.ino(),
        }
    }
}

/// The identities of the regular files under `dir` (not following symlinks; a pool is two
/// levels deep, so the walk is bounded).
pub fn files_under(dir: &Path) -> HashSet<FileId> {
    fn walk(dir: &Path, depth: u32, out: &mut HashSet<FileId>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_file() {
                out.insert(FileId::from_metadata(&m));
            } else if m.is_dir() && depth < 8 {
                walk(&e.path(), depth + 1, out);
            }
        }
    }
    let mut out = HashSet::new();
    walk(dir, 0, &mut out);
    out
}

/// Size in bytes of a block device (or of the device a device node bind-mount points at).
pub fn size_of(device: &Path) -> Result<u64> {
    let f = File::open(device).map_err(|e| Error::io(format!("open {}", device.display()), e))?;
    let mut size: u64 = 0;
    unsafe { blk_getsize64(f.as_raw_fd(), &mut size) }
        .map_err(|e| Error::io(format!("BLKGETSIZE64 {}", device.display()), e))?;
    Ok(size)
}

/// The device number of a block device node, to recognise it behind a bind mount.
pub fn rdev_of(path: &Path) -> Option<DevNum> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.file_type().is_block_device())
        .map(|m| DevNum::from_user(m.rdev()))
}

/// Is a filesystem (or mkfs, or fsck) holding `device` open exclusively right now? A mount
/// claims its block device in every mount namespace, so this sees a mount this process cannot
/// see in its mountinfo: one made by a driver whose container has since restarted.
pub fn claimed(device: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_EXCL | libc::O_NONBLOCK)
        .open(device)
        .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
}
