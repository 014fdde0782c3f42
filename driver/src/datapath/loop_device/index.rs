//! The attachment index: which loop device reads which image, and the reverse, in memory.
//!
//! Built from sysfs in one pass when the node plugin starts ([`rebuild`]; lazily by the first
//! question in tools and tests), and kept current by this process's own attaches and detaches.
//! It saves the scan of every loop device on the machine (thousands on a full node) that
//! finding an attached image's device would otherwise cost.
//!
//! Why it cannot lie in a way that corrupts data or leaks a device: it is never believed on
//! its own.
//! - A positive ("this image is on /dev/loopN") is confirmed by the kernel for that one device
//!   (`LOOP_GET_STATUS64`: the backing file's device and inode) before anyone uses it. A device
//!   since detached, removed or reused for another file fails that check and is dropped.
//! - A negative is never taken from the index. "No device reads this image" is proved by the
//!   kernel's own count of open files ([`super::scan::open_elsewhere`]: every loop device holds
//!   its backing file open, whoever attached it), and when something does hold the image open
//!   every device is asked (a scan), whose answer refreshes the index. An image attached
//!   behind loopvol's back, which the index cannot know, is therefore still found, and attach
//!   reuses its device instead of attaching the image a second time.
//!
//! A wrong index thus costs at most one scan, never a double attach; unstage detaches every
//! device the kernel reports, not the ones the index remembers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::datapath::blockdev::FileId;
use crate::datapath::Attachment;

#[derive(Default)]
struct Index {
    by_file: HashMap<FileId, PathBuf>,
    by_device: HashMap<PathBuf, FileId>,
}

impl Index {
    fn of(loops: &[Attachment]) -> Index {
        let mut i = Index::default();
        for l in loops {
            if let Some(id) = l.backing {
                i.insert(&l.device, id);
            }
        }
        i
    }

    fn insert(&mut self, device: &Path, file: FileId) {
        if let Some(old) = self.by_device.insert(device.to_path_buf(), file) {
            if old != file {
                self.by_file.remove(&old);
            }
        }
        if let Some(prev) = self.by_file.insert(file, device.to_path_buf()) {
            if prev != device {
                // A second device over one image (attached by hand): the index keeps one; the
                // kernel still reports both to whoever asks for all of them.
                self.by_device.remove(&prev);
            }
        }
    }

    fn remove_device(&mut self, device: &Path) {
        if let Some(file) = self.by_device.remove(device) {
            if self.by_file.get(&file).is_some_and(|d| d == device) {
                self.by_file.remove(&file);
            }
        }
    }

    fn remove_file(&mut self, file: FileId) {
        if let Some(device) = self.by_file.remove(&file) {
            self.by_device.remove(&device);
        }
    }
}

fn index() -> MutexGuard<'static, Index> {
    static INDEX: OnceLock<Mutex<Index>> = OnceLock::new();
    INDEX
        .get_or_init(|| Mutex::new(Index::of(&super::scan::attached_loops())))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Build the index afresh from one pass over every loop device (a node plugin's start).
pub fn rebuild() {
    let fresh = Index::of(&super::scan::attached_loops());
    let n = fresh.by_device.len();
    *index() = fresh;
    tracing::debug!(attached = n, "loop attachment index built");
}

/// The device the index remembers for `file`: a candidate only, for the caller to confirm
/// with the kernel.
pub fn remembered(file: FileId) -> Option<PathBuf> {
    index().by_file.get(&file).cloned()
}

/// `device` was just attached to `file` (by this process), or found reading it.
pub fn learn(device: &Path, file: FileId) {
    index().insert(device, file);
}

/// `device` reads nothing any more (detached), or not what the index said.
pub fn forget_device(device: &Path) {
    index().remove_device(device);
}

/// The kernel says no device reads `file`.
pub fn forget_file(file: FileId) {
    index().remove_file(file);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::blockdev::DevNum;

    fn id(ino: u64) -> FileId {
        FileId {
            dev: DevNum { major: 8, minor: 1 },
            ino,
        }
    }

    #[test]
    fn both_directions_stay_consistent() {
        let mut i = Index::default();
        let (a, b) = (Path::new("/dev/loop10"), Path::new("/dev/loop11"));
        i.insert(a, id(1));
        assert_eq!(i.by_file.get(&id(1)).map(PathBuf::as_path), Some(a));
        // The device is reused for another image: the old image no longer maps to it.
        i.insert(a, id(2));
        assert!(!i.by_file.contains_key(&id(1)));
        assert_eq!(i.by_device.get(a), Some(&id(2)));
        // A second device over the same image replaces the first in both maps.
        i.insert(b, id(2));
        assert!(!i.by_device.contains_key(a));
        assert_eq!(i.by_file.get(&id(2)).map(PathBuf::as_path), Some(b));
        i.remove_device(a);
        assert_eq!(i.by_file.get(&id(2)).map(PathBuf::as_path), Some(b));
        i.remove_file(id(2));
        assert!(i.by_file.is_empty() && i.by_device.is_empty());
    }
}
