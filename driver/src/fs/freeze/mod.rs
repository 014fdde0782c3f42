//! Filesystem freezes around snapshots and clones of mounted volumes, and the guarantee that
//! none outlives the copy it was taken for, whatever happens to the driver.
//!
//! FIFREEZE flushes a filesystem and blocks every new write until FITHAW, so the copied image
//! is clean. The kernel ties a freeze to the superblock, not to a process: a driver killed
//! while a volume is frozen leaves every writer of that volume in D state, and nothing ever
//! thaws it by itself. So before the ioctl, in this order:
//!
//! 1. A marker `<pool>/node/<hex>.frozen` names the volume, the mount and its device. It is
//!    written to a temp file, flock'ed, then renamed into place, so it is never visible
//!    unlocked while its owner lives. A marker whose lock can be taken was left by a dead
//!    process, and its filesystem may still be frozen: start-up thaws it ([`recover`]), the
//!    next freeze of the volume does too, and health and `doctor` report it ([`state`]).
//! 2. A guardian process (`loopvol freeze-guard`, this same binary) opens the mount and reads a
//!    pipe from the driver. EOF without "done" means the driver died: the guardian thaws at
//!    once, so writers stall for milliseconds rather than until a restart (which in Kubernetes
//!    may be minutes of back-off). It is also the watchdog: a freeze that outlasts
//!    `--freeze-timeout` is lifted.
//! 3. The freeze. [`Frozen::release`] thaws; a release that finds the filesystem already thawed
//!    (EINVAL: the watchdog, or someone's `fsfreeze -u`) fails, because the copy was then not
//!    taken from a still filesystem and must not become a snapshot.
//!
//! Whether a filesystem is frozen cannot be read without disturbing it: there is no sysfs or
//! mountinfo flag, and probing with FIFREEZE would freeze a healthy one. loopvol never freezes
//! without a marker, so its markers are its knowledge: a held marker is a copy in progress, an
//! abandoned one means "possibly frozen". A freeze by another tool is not seen.
//!
//! Thawing only ever happens through a descriptor of the mount whose device is a loop device
//! backed by the volume's image, so a stale marker can never thaw someone else's filesystem.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::datapath::DevNum;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// How this process freezes: where markers live, the watchdog's bound, and a test hook.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `<pool>/node`, where the markers live.
    pub node_dir: PathBuf,
    /// The pool directory, to tell a full pool from an I/O error when a freeze fails.
    pub pool_dir: PathBuf,
    /// The longest a freeze may last before the guardian lifts it.
    pub timeout: Duration,
    /// Test hook: stay frozen this long before copying (widens the window a kill can hit).
    pub hold: Duration,
}

/// What a marker records about one freeze.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub volume_id: String,
    /// The staging mount that was frozen.
    pub mount: PathBuf,
    /// `st_dev` of the frozen filesystem.
    pub dev: u64,
    /// The process that froze it.
    pub pid: u32,
    pub since_unix_ms: u64,
}

/// A marker as health and doctor see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// A live process holds it: a copy is in progress and the filesystem is frozen for it.
    Held(Marker),
    /// Its owner died: the filesystem may still be frozen. `None` when the marker is empty
    /// (its owner died while writing it, before freezing anything).
    Abandoned(Option<Marker>),
}

impl State {
    pub fn marker(&self) -> Option<&Marker> {
        match self {
            State::Held(m) => Some(m),
            State::Abandoned(m) => m.as_ref(),
        }
    }
}

const SUFFIX: &str = ".frozen";

pub fn marker_path(node_dir: &Path, hex: &str) -> PathBuf {
    node_dir.join(format!("{hex}{SUFFIX}"))
}

fn temp_marker_path(node_dir: &Path, hex: &str) -> PathBuf {
    node_dir.join(format!(".{hex}{SUFFIX}.tmp"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A frozen filesystem; thawed by [`Frozen::release`], or on drop.
pub struct Frozen {
    dir: File,
    path: PathBuf,
    marker: PathBuf,
    lock: Option<Flock<File>>,
    guardian: Option<Guardian>,
    finished: bool,
}

/// Freeze the filesystem mounted at `mount_point`, the staging mount of volume `volume_id`
/// (`hex`) whose backing file is `image`.
pub fn freeze(
    s: &Settings,
    volume_id: &str,
    hex: &str,
    image: &Path,
    mount_point: &Path,
) -> Result<Frozen> {
    // A marker a dead process left for this volume: its freeze would make ours fail (EBUSY).
    if let Some(line) = sweep(&s.node_dir, hex, image) {
        tracing::warn!(volume_id, recovery = %line, "abandoned freeze cleared before a new one");
    }
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(mount_point)
        .map_err(|e| Error::io(format!("open {}", mount_point.display()), e))?;
    let dev = dir
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", mount_point.display()), e))?
        .dev();
    // What is opened must be the volume's own filesystem: freezing anything else (the root
    // filesystem, behind a path swapped since it was checked) would hang the node.
    if !is_volume_fs(&dir, image) {
        return Err(Error::FailedPrecondition(format!(
            "{} is not the filesystem of volume {volume_id}; not freezing it",
            mount_point.display()
        )));
    }
    let marker = Marker {
        volume_id: volume_id.to_string(),
        mount: mount_point.to_path_buf(),
        dev,
        pid: std::process::id(),
        since_unix_ms: now_ms(),
    };
    let marker_file = marker_path(&s.node_dir, hex);
    let lock = write_marker(&s.node_dir, hex, &marker)?;
    let remove_marker = || {
        let _ = std::fs::remove_file(&marker_file);
    };
    let guardian = match Guardian::spawn(mount_point, dev, &marker_file, s.timeout) {
        Ok(g) => g,
        Err(e) => {
            remove_marker();
            return Err(e);
        }
    };
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE takes an int argument it ignores; `dir` is an open descriptor.
    if let Err(e) = unsafe { fifreeze(dir.as_raw_fd(), &mut arg) } {
        guardian.done();
        remove_marker();
        return Err(freeze_error(s, mount_point, e));
    }
    tracing::info!(mount = %mount_point.display(), "filesystem frozen");
    let frozen = Frozen {
        dir,
        path: mount_point.to_path_buf(),
        marker: marker_file,
        lock: Some(lock),
        guardian: Some(guardian),
        finished: false,
    };
    if !s.hold.is_zero() {
        std::thread::sleep(s.hold);
    }
    Ok(frozen)
}

/// A freeze that fails because the volume's dirty data cannot be written back into a full
/// pool is the pool's lack of space, not an I/O fault of the driver.
fn freeze_error(s: &Settings, mount: &Path, e: Errno) -> Error {
    let full = provisioner::capacity::Capacity::measure(&s.pool_dir, 0, 1.0)
        .is_ok_and(|c| c.available_bytes < 16 * provisioner::pool::FULL_BYTES);
    match e {
        Errno::EIO | Errno::ENOSPC if full => Error::ResourceExhausted(format!(
            "the pool under {} is full: {} could not flush its data to freeze for the copy",
            s.pool_dir.display(),
            mount.display()
        )),
        Errno::EBUSY => Error::FailedPrecondition(format!(
            "{} is already frozen, and not by a loopvol snapshot (fsfreeze?); thaw it first",
            mount.display()
        )),
        e => Error::io(format!("freeze {}", mount.display()), e),
    }
}

impl Frozen {
    /// Thaw. Fails when the filesystem had already been thawed (by the watchdog, or by hand):
    /// then the copy taken under this freeze is not consistent.
    pub fn release(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        self.finished = true;
        let mut arg: libc::c_int = 0;
        // SAFETY: as for FIFREEZE.
        let thawed = unsafe { fithaw(self.dir.as_raw_fd(), &mut arg) };
        if let Some(g) = self.guardian.take() {
            g.done();
        }
        let mount = self.path.display();
        let result = match thawed {
            Ok(_) => {
                tracing::info!(mount = %mount, "filesystem thawed");
                Ok(())
            }
            Err(Errno::EINVAL) => {
                tracing::warn!(mount = %mount, "filesystem was thawed before the copy finished");
                Err(Error::Aborted(format!(
                    "the freeze of {mount} was lifted before the copy finished (it outlasted \
                     --freeze-timeout, or someone thawed it): the copy is not consistent and \
                     was discarded; retry, or raise --freeze-timeout"
                )))
            }
            Err(e) => {
                // Still frozen: the marker stays (health reports it; start-up retries).
                tracing::error!(mount = %mount, error = %e, "thaw failed; the filesystem may stay frozen");
                self.lock = None;
                return Err(Error::io(format!("thaw {mount}"), e));
            }
        };
        let _ = std::fs::remove_file(&self.marker);
        self.lock = None;
        result
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.finish();
        }
    }
}

impl provisioner::pool::Quiesced for Frozen {
    fn release(self: Box<Self>) -> std::result::Result<(), provisioner::PoolError> {
        (*self).release().map_err(crate::error::to_pool_error)
    }
}

/// Create the marker already locked: written and flock'ed under a temp name, then renamed.
fn write_marker(node_dir: &Path, hex: &str, m: &Marker) -> Result<Flock<File>> {
    let tmp = temp_marker_path(node_dir, hex);
    let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", tmp.display()), e);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| io("lock", e.into()))?;
    let bytes = serde_json::to_vec(m).expect("markers serialise");
    lock.write_all(&bytes).map_err(|e| io("write", e))?;
    let path = marker_path(node_dir, hex);
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("create {}", path.display()), e));
    }
    Ok(lock)
}

/// Take `file`'s lock, retrying for up to `patience`: a dead owner's lock goes away when the
/// kernel closes its descriptors, which may come a moment after its pipe reported EOF; and a
/// reader checking the marker holds a shared lock for a moment.
fn lock_within(file: File, patience: Duration) -> Option<Flock<File>> {
    let deadline = Instant::now() + patience;
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Some(l),
            Err((f, _)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return None,
        }
    }
}

/// Does `path` still name the file open as `f` (and not a newer marker)?
fn same_file(f: &impl AsFd, path: &Path) -> bool {
    let Ok(open) = nix::sys::stat::fstat(f.as_fd()) else {
        return false;
    };
    std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == open.st_dev && m.ino() == open.st_ino)
}

fn read_marker(f: &mut File) -> Option<Marker> {
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Is the directory open as `dir` a filesystem of the volume backed by `image`? Either its
/// `st_dev` is one of the volume's loop devices (ext4, xfs), or the mount it is on (statx
/// `STATX_MNT_ID`) is one mountinfo shows made from such a device: btrfs reports an anonymous
/// device per subvolume as `st_dev`, never its block device. Only these may be frozen or
/// thawed.
fn is_volume_fs(dir: &File, image: &Path) -> bool {
    let loops: Vec<DevNum> = crate::datapath::default_path()
        .find_all(image)
        .iter()
        .map(|l| l.dev)
        .collect();
    let Ok(meta) = dir.metadata() else {
        return false;
    };
    if loops.contains(&DevNum::from_user(meta.dev())) {
        return true;
    }
    let Some(mnt_id) = mount_id(dir) else {
        return false;
    };
    crate::fs::mount::mounts().is_ok_and(|all| {
        all.iter()
            .any(|m| u64::from(m.id) == mnt_id && loops.iter().any(|d| m.is_from(*d)))
    })
}

/// The mount ID of the mount `f` is on (Linux 5.8+), as mountinfo's first field numbers it.
fn mount_id(f: &File) -> Option<u64> {
    // SAFETY: an empty path with AT_EMPTY_PATH stats the open descriptor itself; `buf` is a
    // properly sized, writable statx buffer that the kernel fills and nothing retains.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut buf,
        )
    };
    (rc == 0 && buf.stx_mask & libc::STATX_MNT_ID != 0).then_some(buf.stx_mnt_id)
}

/// What thawing through a marker did.
enum Thaw {
    Thawed,
    WasNotFrozen,
    /// Nothing of this volume is mounted there any more (unmounted, rebooted).
    NotOurs,
}

/// Thaw the filesystem at `mount` if it is this volume's (its device backs `image`).
fn thaw_volume_at(mount: &Path, image: &Path) -> std::result::Result<Thaw, String> {
    let dir = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(mount)
    {
        Ok(d) => d,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            return Ok(Thaw::NotOurs)
        }
        Err(e) => return Err(format!("open {}: {e}", mount.display())),
    };
    if !is_volume_fs(&dir, image) {
        return Ok(Thaw::NotOurs);
    }
    thaw_fd(&dir).map_err(|e| format!("thaw {}: {e}", mount.display()))
}

fn thaw_fd(dir: &File) -> std::result::Result<Thaw, Errno> {
    let mut arg: libc::c_int = 0;
    // SAFETY: as for FIFREEZE.
    match unsafe { fithaw(dir.as_raw_fd(), &mut arg) } {
        Ok(_) => Ok(Thaw::Thawed),
        Err(Errno::EINVAL) => Ok(Thaw::WasNotFrozen),
        Err(e) => Err(e),
    }
}

/// Clear volume `hex`'s marker if its owner is dead: thaw what it froze, then remove it.
/// Returns what was done, for the log; `None` when there is no marker or a live process holds
/// it (a copy in progress, which that process thaws).
fn sweep(node_dir: &Path, hex: &str, image: &Path) -> Option<String> {
    let path = marker_path(node_dir, hex);
    let file = match OpenOptions::new().read(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("cannot read {}: {e}", path.display())),
    };
    let mut lock = lock_within(file, Duration::from_millis(500))?;
    if !same_file(&*lock, &path) {
        return None; // cleared meanwhile by the guardian, or replaced by a new freeze
    }
    let marker = read_marker(&mut lock);
    // Written before the freeze and complete, or empty if its owner died writing it (and so
    // froze nothing); then the staging record still says where the volume is mounted.
    let mount = marker.as_ref().map(|m| m.mount.clone()).or_else(|| {
        crate::node_state::load(node_dir, hex)
            .ok()
            .flatten()
            .map(|s| s.staging_path)
    });
    let who = marker
        .as_ref()
        .map_or_else(|| hex.to_string(), |m| m.volume_id.clone());
    let outcome = match &mount {
        Some(m) => thaw_volume_at(m, image),
        None => Ok(Thaw::NotOurs),
    };
    let at = mount.as_deref().unwrap_or(Path::new("?")).display();
    let line = match outcome {
        Ok(Thaw::Thawed) => format!("thawed {at} (volume {who}), left frozen by a killed loopvol"),
        Ok(Thaw::WasNotFrozen) => {
            format!("{at} (volume {who}) was already thawed; abandoned freeze marker removed")
        }
        Ok(Thaw::NotOurs) => {
            format!("abandoned freeze marker of volume {who} removed: it is not mounted at {at}")
        }
        // Kept: health keeps reporting it, and the next start tries again.
        Err(e) => return Some(format!("could not thaw volume {who}: {e}")),
    };
    let _ = std::fs::remove_file(&path);
    Some(line)
}

/// At start-up: thaw what dead processes left frozen and remove their markers (and the temp
/// files of markers being written when they died). Markers of live processes are left alone.
/// Returns one line per repair.
pub fn recover(node_dir: &Path, image_of: impl Fn(&str) -> PathBuf) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(node_dir) else {
        return Vec::new();
    };
    let mut report = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(hex) = name.strip_suffix(SUFFIX) {
            report.extend(sweep(node_dir, hex, &image_of(hex)));
        } else if name.starts_with('.') && name.ends_with(&format!("{SUFFIX}.tmp")) {
            // Never renamed into place, so its owner froze nothing; unless it is alive.
            let Ok(f) = File::open(e.path()) else {
                continue;
            };
            if Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok() {
                let _ = std::fs::remove_file(e.path());
                report.push(format!("removed the unfinished freeze marker {name}"));
            }
        }
    }
    report
}

/// Volume `hex`'s marker, if any: held by a live freezer, or abandoned by a dead one.
pub fn state(node_dir: &Path, hex: &str) -> Option<State> {
    let path = marker_path(node_dir, hex);
    let mut file = File::open(&path).ok()?;
    let marker = read_marker(&mut file);
    // A shared lock for a moment: refused while the owner holds its exclusive one.
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Err(_) => Some(State::Held(marker.unwrap_or_default())),
        Ok(l) if same_file(&*l, &path) => Some(State::Abandoned(marker)),
        Ok(_) => None, // removed while we looked
    }
}

/// Every marker in `node_dir`, by volume hex.
pub fn all(node_dir: &Path) -> Vec<(String, State)> {
    let Ok(entries) = std::fs::read_dir(node_dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(SUFFIX)?.to_string();
            let st = state(node_dir, &hex)?;
            Some((hex, st))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// How long a marker's freeze has lasted.
pub fn age(m: &Marker) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(m.since_unix_ms))
}

mod guardian;

use guardian::Guardian;
pub use guardian::{guard_main, GuardArgs};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_held_while_their_owner_lives() {
        let dir = tempfile::tempdir().unwrap();
        let m = Marker {
            volume_id: "vol-x@n".into(),
            mount: "/nowhere".into(),
            dev: 1,
            pid: 1,
            since_unix_ms: now_ms(),
        };
        let lock = write_marker(dir.path(), "abc", &m).unwrap();
        assert_eq!(state(dir.path(), "abc"), Some(State::Held(m.clone())));
        // A sweep leaves a held marker alone.
        assert_eq!(
            sweep(dir.path(), "abc", Path::new("/nonexistent.img")),
            None
        );
        assert!(marker_path(dir.path(), "abc").exists());
        drop(lock);
        assert_eq!(state(dir.path(), "abc"), Some(State::Abandoned(Some(m))));
        // Abandoned, and nothing of the volume is mounted where it says: removed, untouched.
        let line = recover(dir.path(), |_| PathBuf::from("/nonexistent.img"));
        assert_eq!(line.len(), 1, "{line:?}");
        assert!(!marker_path(dir.path(), "abc").exists());
        assert_eq!(state(dir.path(), "abc"), None);
    }

    #[test]
    fn an_abandoned_marker_never_thaws_a_filesystem_that_is_not_the_volumes() {
        // The marker names "/" (not backed by the image): it must be removed without FITHAW.
        let dir = tempfile::tempdir().unwrap();
        let m = Marker {
            mount: "/".into(),
            ..Default::default()
        };
        drop(write_marker(dir.path(), "abc", &m).unwrap());
        let line = sweep(dir.path(), "abc", Path::new("/nonexistent.img")).unwrap();
        assert!(line.contains("not mounted"), "{line}");
    }
}
