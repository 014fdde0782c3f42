//! Which loop devices are backed by a given file, read from sysfs. This is how loopvol avoids
//! ever attaching one image twice (two loop devices over one ext4 image corrupt it) and how a
//! restarted driver rediscovers the devices it attached before it died: the kernel is the source
//! of truth, not our memory.

use std::fs;
use std::path::{Path, PathBuf};

const SYS_BLOCK: &str = "/sys/block";

/// A loop device as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopInfo {
    /// e.g. `/dev/loop3`
    pub device: PathBuf,
    pub backing_file: PathBuf,
    /// The backing file was unlinked while attached (sysfs appends " (deleted)").
    pub backing_deleted: bool,
    pub read_only: bool,
    pub direct_io: bool,
}

/// Every attached loop device on the machine.
pub fn attached_loops() -> Vec<LoopInfo> {
    scan(|_, _| true)
}

/// The backing file of the loop device whose sysfs directory is `dir`, if it is attached, and
/// whether that file was unlinked since (sysfs appends " (deleted)").
fn read_loop(dir: &Path) -> Option<(PathBuf, bool)> {
    // Detached devices have no backing_file attribute.
    let raw = fs::read_to_string(dir.join("loop/backing_file")).ok()?;
    let raw = raw.trim_end_matches('\n');
    Some(match raw.strip_suffix(" (deleted)") {
        Some(p) => (PathBuf::from(p), true),
        None => (PathBuf::from(raw), false),
    })
}

/// The rest of a [`LoopInfo`], read only for the devices a caller wants: with a thousand
/// volumes attached, reading three attributes of every device on every node RPC was what made
/// staging slow down as the node filled up.
fn info(dir: &Path, name: &str, backing_file: PathBuf, backing_deleted: bool) -> LoopInfo {
    let flag = |attr: &str| {
        fs::read_to_string(dir.join(attr))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    };
    LoopInfo {
        device: Path::new("/dev").join(name),
        backing_file,
        backing_deleted,
        read_only: flag("ro"),
        direct_io: flag("loop/dio"),
    }
}

/// Attached loop devices whose backing file (and deleted mark) `keep` accepts.
fn scan(keep: impl Fn(&Path, bool) -> bool) -> Vec<LoopInfo> {
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
        let dir = entry.path();
        let Some((backing, deleted)) = read_loop(&dir) else {
            continue;
        };
        if keep(&backing, deleted) {
            out.push(info(&dir, name, backing, deleted));
        }
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

/// `device` (e.g. `/dev/loop3`) if sysfs says it is backed by `file` right now. One sysfs read
/// instead of a scan of every loop device, for callers that remember which device they
/// attached: the kernel still has the last word, so a stale memory only costs a scan.
pub fn loop_if_backed_by(device: &Path, file: &Path) -> Option<LoopInfo> {
    let name = device.strip_prefix("/dev").ok()?.to_str()?;
    if !name.starts_with("loop") || name.contains('/') {
        return None;
    }
    let dir = Path::new(SYS_BLOCK).join(name);
    let (backing, deleted) = read_loop(&dir)?;
    let want = fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    (!deleted && backing == want).then(|| info(&dir, name, backing, deleted))
}

/// Loop devices currently backed by `file` (normally zero or one).
pub fn loops_backed_by(file: &Path) -> Vec<LoopInfo> {
    let want = fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    scan(|backing, deleted| !deleted && backing == want)
}

/// Loop devices backed by any file under `dir` (used to report and clean up a pool).
pub fn loops_under(dir: &Path) -> Vec<LoopInfo> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    scan(|backing, _| backing.starts_with(&dir))
}
