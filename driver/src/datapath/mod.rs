//! The block data path: how a volume's image becomes a block device on this node, and how the
//! node finds that device again. [`BlockDataPath`] is the seam; [`loop_device`] is the first
//! (and today only) implementation, and the only module that knows loop ioctls and loop sysfs.
//! [`blockdev`] answers what any block device can be asked (size, number, claimed).
//!
//! The kernel stays the source of truth: an attachment is always found by asking it (with a
//! remembered device as a hint, so the common case is one ioctl rather than a scan), never
//! from the driver's memory.

pub mod blockdev;
pub mod loop_device;

use std::path::{Path, PathBuf};

pub use blockdev::{DevNum, FileId};

use crate::error::Result;

/// One image attached to one block device, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// e.g. `/dev/loop3`
    pub device: PathBuf,
    /// The device's own number: what mountinfo shows for a filesystem mounted from it.
    pub dev: DevNum,
    /// The backing file, by identity (`None` only when this process may not open the device).
    pub backing: Option<FileId>,
    /// The backing file's path as the kernel prints it to this process. For people only: it
    /// is relative to a vanished bind mount when another mount namespace attached the device.
    pub backing_file: PathBuf,
    /// The backing file was unlinked while attached.
    pub backing_deleted: bool,
    pub read_only: bool,
    pub direct_io: bool,
}

/// The result of [`BlockDataPath::attach`].
#[derive(Debug, Clone)]
pub struct Attached {
    pub device: PathBuf,
    /// False when an existing device over the same image was reused.
    pub created: bool,
    pub direct_io: bool,
    pub read_only: bool,
}

/// Device settings asked for at attach time. Read-only is enforced by the device (a raw block
/// volume staged read-only); direct I/O keeps a second page cache out of the way. Per-pod IO
/// limits are not device settings: they are cgroup rules on the device's number, applied at
/// publish (`engine::io_throttle`), so they work on whatever device a data path makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSettings {
    pub read_only: bool,
    pub direct_io: bool,
}

/// Why this node cannot attach devices now, and what to do about it (for `loopvol doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    pub problem: String,
    pub fix: String,
}

/// A way to expose an image file as a block device. Implementations must attach one image at
/// most once (two devices over one image are two page caches over one filesystem, which
/// corrupts it): `attach` returns the existing attachment when there is one.
pub trait BlockDataPath: Send + Sync {
    /// A short name for messages and reports (`loop`).
    fn name(&self) -> &'static str;

    /// The attachment of `image`, if any. `hint` is the device a record remembers: asked
    /// first (one kernel call), and only if it no longer reads the image is every device
    /// asked. The answer is the kernel's, by file identity, so it holds across mount
    /// namespaces (a restarted container sees other paths).
    fn find(&self, image: &Path, hint: Option<&Path>) -> Option<Attachment> {
        hint.and_then(|dev| self.attachment_at(dev, image))
            .or_else(|| self.find_all(image).into_iter().next())
    }

    /// `device`'s attachment if it reads `image` right now (one kernel call, no scan); `None`
    /// for any other device, or a path that is no device of this data path at all.
    fn attachment_at(&self, device: &Path, image: &Path) -> Option<Attachment>;

    /// Every attachment of `image` (normally zero or one; more only if another tool attached
    /// it too).
    fn find_all(&self, image: &Path) -> Vec<Attachment>;

    /// Attach `image`, or return its existing attachment (`created: false`).
    fn attach(&self, image: &Path, settings: &DeviceSettings) -> Result<Attached>;

    /// The post-attach hook: device settings that are applied once the device exists (and
    /// the place to log the attachment). Runs only for a device `attach` created.
    fn after_attach(&self, _image: &Path, _att: &mut Attached, _settings: &DeviceSettings) {}

    /// Flush and detach `device`. A device that is already gone is not an error.
    fn detach(&self, device: &Path) -> Result<()>;

    /// Make `device` pick up its image's new size (after an expansion); returns the new size.
    fn refresh_capacity(&self, device: &Path) -> Result<u64>;

    /// Attachments of files under `dir` (a pool: for recovery, reports and clean-up).
    fn list_under(&self, dir: &Path) -> Vec<Attachment>;

    /// Every attachment on the machine.
    fn list_all(&self) -> Vec<Attachment>;

    /// A node plugin starts serving: `state_dir` is where the data path may keep what must
    /// outlive the process (the loop device: which idle nodes it still owes a removal).
    fn start(&self, _state_dir: &Path) {}

    /// The node plugin stops: finish or hand over background work, for at most `wait`.
    fn stop(&self, _state_dir: &Path, _wait: std::time::Duration) {}

    /// A cheap check, for the storage health RPC: `Some((reason, message))` when the kernel
    /// side of this data path is missing altogether.
    fn missing(&self) -> Option<(&'static str, String)>;

    /// Whether devices can be had on this node right now (asks the kernel for a free one).
    fn ready(&self) -> std::result::Result<String, NotReady>;

    /// [`attach`](Self::attach), then [`after_attach`](Self::after_attach) for a new device.
    fn attach_ready(&self, image: &Path, settings: &DeviceSettings) -> Result<Attached> {
        let mut att = self.attach(image, settings)?;
        if att.created {
            self.after_attach(image, &mut att, settings);
        }
        Ok(att)
    }
}

/// The data path this build uses.
pub fn default_path() -> &'static dyn BlockDataPath {
    &loop_device::LoopDevices
}

/// The pool's "is this image in use?" hook, answered by `path`.
pub fn in_use_hook(path: &'static dyn BlockDataPath) -> provisioner::InUse {
    provisioner::InUse::new(move |image| {
        path.find(image, None)
            .map(|a| a.device.display().to_string())
    })
}
