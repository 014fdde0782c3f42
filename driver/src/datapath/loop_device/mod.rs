//! The loop device: loopvol's first block data path, and the only place that knows loop
//! ioctls (`ioctl`), loop sysfs (`scan`), the removal of idle nodes (`reaper`) and which device reads which image (`index`, checked
//! against the kernel on every use). Everything else reaches it through
//! [`BlockDataPath`]; the free functions below are the same operations for tests, benchmarks
//! and tools that want loop devices specifically.

mod index;
mod ioctl;
mod reaper;
mod scan;

use std::path::Path;

use super::{Attached, Attachment, BlockDataPath, DeviceSettings, NotReady};
use crate::error::Result;

/// Loop devices over image files.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoopDevices;

impl BlockDataPath for LoopDevices {
    fn name(&self) -> &'static str {
        "loop"
    }

    fn find(&self, image: &Path, hint: Option<&Path>) -> Option<Attachment> {
        hint.and_then(|dev| self.attachment_at(dev, image))
            .or_else(|| scan::first_backed_by(image))
    }

    fn attachment_at(&self, device: &Path, image: &Path) -> Option<Attachment> {
        scan::loop_if_backed_by(device, image)
    }

    fn find_all(&self, image: &Path) -> Vec<Attachment> {
        scan::loops_backed_by(image)
    }

    fn attach(&self, image: &Path, settings: &DeviceSettings) -> Result<Attached> {
        ioctl::attach(image, settings.read_only, settings.direct_io)
    }

    fn after_attach(&self, image: &Path, att: &mut Attached, settings: &DeviceSettings) {
        if settings.direct_io {
            ioctl::ensure_direct_io(att, image);
        }
        tracing::info!(device = %att.device.display(), file = %image.display(),
            direct_io = att.direct_io, read_only = att.read_only, "loop device attached");
    }

    fn detach(&self, device: &Path) -> Result<()> {
        ioctl::detach(device)
    }

    fn refresh_capacity(&self, device: &Path) -> Result<u64> {
        ioctl::refresh_capacity(device)
    }

    fn list_under(&self, dir: &Path) -> Vec<Attachment> {
        scan::loops_under(dir)
    }

    fn list_all(&self) -> Vec<Attachment> {
        scan::attached_loops()
    }

    fn missing(&self) -> Option<(&'static str, String)> {
        (!Path::new(ioctl::LOOP_CONTROL).exists()).then(|| {
            (
                "NoLoopControl",
                format!("{} is missing: load the loop module", ioctl::LOOP_CONTROL),
            )
        })
    }

    fn start(&self, state_dir: &Path) {
        index::rebuild();
        reaper::adopt_node_cleanup(state_dir);
    }

    fn stop(&self, state_dir: &Path, wait: std::time::Duration) {
        reaper::finish_node_cleanup(state_dir, wait);
    }

    fn ready(&self) -> std::result::Result<String, NotReady> {
        if !Path::new(ioctl::LOOP_CONTROL).exists() {
            return Err(NotReady {
                problem: format!("{} is missing", ioctl::LOOP_CONTROL),
                fix: "load the loop module (`modprobe loop`); in a container, run the node \
                      plugin privileged with the host's /dev mounted"
                    .into(),
            });
        }
        match ioctl::free_device() {
            Ok(n) => Ok(format!(
                "{} answers; /dev/loop{n} is free",
                ioctl::LOOP_CONTROL
            )),
            Err(e) => Err(NotReady {
                problem: format!("no free loop device: {e}"),
                fix: "run as root (CAP_SYS_ADMIN); if devices are exhausted, raise the loop \
                      module's max_loop or detach unused devices (`losetup -a` lists them)"
                    .into(),
            }),
        }
    }
}

/// Attach `image` to a loop device (or return the one already backed by it), settings applied.
pub fn attach(image: &Path, read_only: bool, direct_io: bool) -> Result<Attached> {
    LoopDevices.attach_ready(
        image,
        &DeviceSettings {
            read_only,
            direct_io,
        },
    )
}

/// Flush, then detach `device`.
pub fn detach(device: &Path) -> Result<()> {
    ioctl::detach(device)
}

/// Every attached loop device on the machine.
pub fn attached_loops() -> Vec<Attachment> {
    scan::attached_loops()
}

/// Loop devices currently backed by `image` (normally zero or one), by identity.
pub fn loops_backed_by(image: &Path) -> Vec<Attachment> {
    scan::loops_backed_by(image)
}

/// `device` if it is backed by `image` right now (one ioctl instead of a scan).
pub fn loop_if_backed_by(device: &Path, image: &Path) -> Option<Attachment> {
    scan::loop_if_backed_by(device, image)
}

/// Loop devices backed by a file under `dir`.
pub fn loops_under(dir: &Path) -> Vec<Attachment> {
    scan::loops_under(dir)
}

/// For root-only tests: detaches, when dropped, the devices it holds that are still backed by
/// its image, so a failed assertion leaks no loop device. A device the test detached already
/// may by then be another parallel test's (the kernel hands the freed number out again), so
/// one no longer over this image is left alone.
#[cfg(test)]
pub(crate) struct DetachOnDrop {
    pub image: std::path::PathBuf,
    pub devices: Vec<std::path::PathBuf>,
}

#[cfg(test)]
impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        for d in &self.devices {
            // A detach flushes first, and a test that failed may have left a write error the
            // flush keeps reporting: then detach without the flush, so nothing stays attached.
            if loop_if_backed_by(d, &self.image).is_some() && detach(d).is_err() {
                let _ = std::process::Command::new("losetup")
                    .arg("-d")
                    .arg(d)
                    .status();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::path::PathBuf;

    /// Root-only: a real loop device over a real sparse file, found again by its remembered
    /// device (one sysfs read) and by a scan, and never mistaken for another file's device.
    #[test]
    fn finds_its_device_by_hint_and_by_scan() {
        if !crate::shared::root_or_skip("finds_its_device_by_hint_and_by_scan") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (image, other) = (dir.path().join("a.img"), dir.path().join("b.img"));
        for f in [&image, &other] {
            File::create(f).unwrap().set_len(8 << 20).unwrap();
        }
        let att = attach(&image, false, true).unwrap();
        let _guard = DetachOnDrop {
            image: image.clone(),
            devices: vec![att.device.clone()],
        };
        assert!(att.created);
        // The attached image is held open by the device: the lease probe says so.
        assert_eq!(scan::open_elsewhere(&image), Some(true));
        assert_eq!(scan::open_elsewhere(&other), Some(false));
        let hinted = loop_if_backed_by(&att.device, &image).expect("hint");
        assert_eq!(hinted.device, att.device);
        assert_eq!(hinted.direct_io, att.direct_io);
        assert_eq!(loops_backed_by(&image), vec![hinted]);
        assert_eq!(loop_if_backed_by(&att.device, &other), None);
        assert_eq!(loop_if_backed_by(Path::new("/dev/sda"), &image), None);
        assert_eq!(
            loop_if_backed_by(Path::new("/dev/../etc/loop0"), &image),
            None
        );
        // A second attach reuses the device instead of making another.
        assert!(!attach(&image, false, true).unwrap().created);
        detach(&att.device).unwrap();
        assert_eq!(loop_if_backed_by(&att.device, &image), None);
        assert!(loops_backed_by(&image).is_empty());
    }

    /// Root-only (issue 27, 9): a write to the device that could not reach its backing file
    /// (the filesystem under the image is full) is kept by the kernel and reported once, to
    /// the next flush: the detach's. It used to fail with "flush /dev/loopN: Input/output
    /// error" (INTERNAL, the retry then succeeded); the flush is now retried and the detach
    /// completes.
    #[test]
    fn a_write_error_kept_for_the_device_does_not_fail_its_detach() {
        if !crate::shared::root_or_skip("a_write_error_kept_for_the_device") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (fs_image, mnt) = (dir.path().join("fs.img"), dir.path().join("mnt"));
        File::create(&fs_image).unwrap().set_len(16 << 20).unwrap();
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&fs_image)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let fs_dev = attach(&fs_image, false, false).unwrap().device;
        let _guard = DetachOnDrop {
            image: fs_image.clone(),
            devices: vec![fs_dev.clone()],
        };
        std::fs::create_dir(&mnt).unwrap();
        nix::mount::mount(
            Some(&fs_dev),
            &mnt,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(mnt.clone());
        // A sparse image larger than the filesystem, and the filesystem then filled.
        let image = mnt.join("vol.img");
        File::create(&image).unwrap().set_len(32 << 20).unwrap();
        let filler = File::create(mnt.join("filler")).unwrap();
        let mut len = 0i64;
        while nix::fcntl::posix_fallocate(&filler, len, 1 << 20).is_ok() {
            len += 1 << 20;
        }
        while nix::fcntl::posix_fallocate(&filler, len, 4096).is_ok() {
            len += 4096;
        }
        let att = attach(&image, false, false).unwrap();
        // Dropped before `_unmount` and `guard`: the device over the image must go first, or
        // the lazily unmounted filesystem under it (and its device) stay behind when the test
        // fails.
        let _vol_guard = DetachOnDrop {
            image: image.clone(),
            devices: vec![att.device.clone()],
        };
        // Buffered writes through the device into holes of the image: their writeback fails.
        {
            use std::io::Write;
            let mut dev = std::fs::OpenOptions::new()
                .write(true)
                .open(&att.device)
                .unwrap();
            dev.write_all(&vec![0x5a; 4 << 20]).unwrap();
        }
        detach(&att.device).expect("the detach after a kept write error");
        assert_eq!(loop_if_backed_by(&att.device, &image), None);
    }

    /// Root-only: the attachment index is only ever a hint. A device detached behind its back
    /// is not reported, and an image attached behind its back (with losetup) is still found
    /// and reused, never attached a second time.
    #[test]
    fn the_attachment_index_is_checked_against_the_kernel() {
        if !crate::shared::root_or_skip("the_attachment_index_is_checked_against_the_kernel") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.img");
        File::create(&image).unwrap().set_len(8 << 20).unwrap();
        let id = crate::datapath::blockdev::FileId::of(&image).unwrap();
        let mut guard = DetachOnDrop {
            image: image.clone(),
            devices: Vec::new(),
        };
        let att = attach(&image, false, true).unwrap();
        guard.devices.push(att.device.clone());
        assert_eq!(index::remembered(id), Some(att.device.clone()));
        // Detached by someone else: the index still names the device, the kernel does not.
        let out = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&att.device)
            .status()
            .unwrap();
        assert!(out.success());
        for _ in 0..200 {
            if scan::open_elsewhere(&image) == Some(false) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The index still names the freed device, unless a test running in parallel in this
        // process was given that device number meanwhile: its attach replaced the entry, which
        // is just as right (the whole suite failed on this assertion once, 1 run in 3).
        let stale = index::remembered(id);
        assert!(
            stale.is_none() || stale == Some(att.device.clone()),
            "{stale:?}"
        );
        assert_eq!(scan::first_backed_by(&image), None);
        assert_eq!(index::remembered(id), None, "the stale entry is dropped");
        // Attached by someone else: the index knows nothing, the kernel's open count tells.
        let out = std::process::Command::new("losetup")
            .args(["--show", "-f"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success());
        let by_hand = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        guard.devices.push(by_hand.clone());
        assert_eq!(index::remembered(id), None);
        let again = attach(&image, false, true).unwrap();
        assert!(!again.created, "the hand-made device is reused");
        assert_eq!(again.device, by_hand);
        assert_eq!(index::remembered(id), Some(by_hand.clone()));
        detach(&by_hand).unwrap();
        assert_eq!(index::remembered(id), None);
        assert!(loops_backed_by(&image).is_empty());
    }
}
