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
        // Detached devices have no backing_file attribute.
        let Ok(raw) = fs::read_to_string(dir.join("loop/backing_file")) else {
            continue;
        };
        let raw = raw.trim_end_matches('\n');
        let (path, deleted) = match raw.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (raw, false),
        };
        let flag = |attr: &str| {
            fs::read_to_string(dir.join(attr))
                .map(|s| s.trim() == "1")
                .unwrap_or(false)
        };
        out.push(LoopInfo {
            device: Path::new("/dev").join(name),
            backing_file: PathBuf::from(path),
            backing_deleted: deleted,
            read_only: flag("ro"),
            direct_io: flag("loop/dio"),
        });
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

/// Loop devices currently backed by `file` (normally zero or one).
pub fn loops_backed_by(file: &Path) -> Vec<LoopInfo> {
    let want = fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    attached_loops()
        .into_iter()
        .filter(|l| !l.backing_deleted && l.backing_file == want)
        .collect()
}

/// Loop devices backed by any file under `dir` (used to report and clean up a pool).
pub fn loops_under(dir: &Path) -> Vec<LoopInfo> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    attached_loops()
        .into_iter()
        .filter(|l| l.backing_file.starts_with(&dir))
        .collect()
}
