//! What the pool's filesystem can do: direct I/O (loop devices without double caching) and
//! reflink (instant snapshots). Probed with two scratch files in the pool directory; their
//! names start with a dot and contain no 20-hex stem, so neither the driver's start-up repair
//! nor its record scan ever takes them for volumes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::Check;
use crate::ops::admin::fs_name;

/// The pool directory itself: absent is fine (the driver creates it), unusable is not.
pub fn pool_dir(dir: &Path) -> Check {
    const NAME: &str = "pool directory";
    if !dir.exists() {
        return Check::pass(
            NAME,
            format!(
                "{} does not exist yet; `loopvol serve` creates it (its future filesystem is \
                 checked below)",
                dir.display()
            ),
        );
    }
    if !dir.join("volumes").is_dir() {
        return Check::pass(
            NAME,
            format!(
                "{} exists but holds no pool yet; `loopvol serve` sets it up",
                dir.display()
            ),
        );
    }
    if crate::shared::pool_usable(dir) {
        Check::pass(NAME, format!("{} is a usable pool", dir.display()))
    } else {
        Check::fail(
            NAME,
            format!("{}/volumes is not writable", dir.display()),
            "run the driver as root, and check that the filesystem is not mounted read-only",
        )
    }
}

/// A file that is removed when dropped.
struct Scratch {
    path: PathBuf,
    file: File,
}

impl Scratch {
    fn create(dir: &Path, tag: &str, direct: bool) -> std::io::Result<Scratch> {
        let path = dir.join(format!(".loopvol-doctor-{}-{tag}", std::process::id()));
        let flags = if direct { libc::O_DIRECT } else { 0 };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(flags | libc::O_CLOEXEC)
            .open(&path)?;
        Ok(Scratch { path, file })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn fs_of(dir: &Path) -> String {
    fs_name::of(dir).unwrap_or_else(|_| "unknown".into())
}

/// One 4 KiB-aligned O_DIRECT write: what a loop device with direct I/O does to its image.
pub fn direct_io(dir: &Path) -> Check {
    const NAME: &str = "direct I/O (O_DIRECT)";
    let fs = fs_of(dir);
    let no_dio = |why: String| {
        Check::fail(
            NAME,
            format!(
                "the pool filesystem under {} ({fs}) refuses O_DIRECT ({why}): loop devices fall \
                 back to buffered I/O, caching every block twice",
                dir.display()
            ),
            "put the pool directory (--pool-dir) on ext4, xfs or btrfs",
        )
    };
    let scratch = match Scratch::create(dir, "odirect", true) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return no_dio(e.to_string()),
        Err(e) => return cannot_probe(NAME, dir, e),
    };
    let block = AlignedBlock::zeroed();
    match scratch.file.write_at(block.bytes(), 0) {
        Ok(4096) => Check::pass(
            NAME,
            format!("an aligned 4 KiB O_DIRECT write works on {fs}"),
        ),
        Ok(n) => no_dio(format!("short write of {n} bytes")),
        // A full filesystem refuses every write, direct or not: that says nothing about O_DIRECT.
        Err(e) if is_full(&e) => cannot_probe(NAME, dir, e),
        Err(e) => no_dio(e.to_string()),
    }
}

fn is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// FICLONE between two scratch files. No reflink is a warning, not a failure: snapshots still
/// work, as sparse copies, but they freeze a mounted source for the whole copy. `pool` names
/// the pool when a node serves several: only that pool's snapshots and clones are affected.
pub fn reflink(dir: &Path, pool: Option<&str>) -> Check {
    const NAME: &str = "reflink (FICLONE)";
    let fs = fs_of(dir);
    let in_pool = pool.map(|p| format!(" in pool {p}")).unwrap_or_default();
    let probe = || -> std::io::Result<bool> {
        let mut src = Scratch::create(dir, "reflink-src", false)?;
        src.file.write_all(&[0x5a; 4096])?;
        src.file.sync_all()?;
        let dst = Scratch::create(dir, "reflink-dst", false)?;
        provisioner::copy::reflink(&src.file, &dst.file)
    };
    match probe() {
        Ok(true) => Check::pass(
            NAME,
            format!("{fs} shares extents: snapshots and clones are instant"),
        ),
        Ok(false) => Check::warn(
            NAME,
            format!(
                "not supported by {fs}: snapshots and clones{in_pool} are sparse copies, and the \
                 filesystem of a staged source volume stays frozen for the whole copy, so its \
                 writers wait (1.1 to 4.5 s per 2 GiB of data on a shared 2-core machine)"
            ),
            "put the pool on xfs with reflink (mkfs.xfs -m reflink=1, the default of current \
             xfsprogs) or on btrfs: snapshots and clones are then instant, frozen only for a \
             flush",
        ),
        Err(e) => cannot_probe(NAME, dir, e),
    }
}

fn cannot_probe(name: &str, dir: &Path, e: std::io::Error) -> Check {
    if is_full(&e) {
        return Check::fail(
            name,
            format!(
                "cannot be tested: the pool filesystem under {} is full ({e})",
                dir.display()
            ),
            "free space on that filesystem (see the free space check), then run doctor again",
        );
    }
    Check::fail(
        name,
        format!("cannot create a scratch file in {}: {e}", dir.display()),
        "run as root, and check that the pool's filesystem is mounted read-write",
    )
}

/// O_DIRECT needs the buffer aligned to the logical block size; 4 KiB covers every device.
#[repr(C, align(4096))]
struct AlignedBlock([u8; 4096]);

impl AlignedBlock {
    fn zeroed() -> Box<AlignedBlock> {
        Box::new(AlignedBlock([0; 4096]))
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}
