//! What this node staged, one small record per volume inside the pool's `node/` directory.
//! The kernel (loop devices, mountinfo) remains the truth about what is attached and mounted;
//! the record adds what the kernel cannot tell us: which capability the volume was staged
//! with, so repeated or conflicting NodeStage calls can be answered exactly, also after a
//! restart. Its staging path is the one the CO gave the driver that staged the volume, which
//! a restarted container may not see (its bind mounts can differ).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use provisioner::{atomic, FsType};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum StagedAccess {
    Mount { fs_type: FsType, flags: Vec<String> },
    Block,
}

/// For people, in errors: `raw block`, `xfs filesystem`, `ext4 filesystem with mount flags
/// noatime`.
impl std::fmt::Display for StagedAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StagedAccess::Block => f.write_str("raw block"),
            StagedAccess::Mount { fs_type, flags } if flags.is_empty() => {
                write!(f, "{fs_type} filesystem")
            }
            StagedAccess::Mount { fs_type, flags } => {
                write!(
                    f,
                    "{fs_type} filesystem with mount flags {}",
                    flags.join(",")
                )
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub access: StagedAccess,
    pub read_only: bool,
    /// The loop device at staging time: asked first whether it still reads the image (by
    /// identity), so the common case costs one ioctl instead of a scan. Only a hint; the
    /// kernel decides.
    pub device: PathBuf,
}

fn path(dir: &Path, hex: &str) -> PathBuf {
    dir.join(format!("{hex}.json"))
}

pub fn load(dir: &Path, hex: &str) -> Result<Option<Staged>> {
    match std::fs::read(path(dir, hex)) {
        // Records are written without fsync (see `save`), so after a power cut one may be
        // empty or torn. Then nothing is staged anyway (loop devices and mounts die with the
        // machine): the record is treated as absent, and a new stage replaces it.
        Ok(bytes) => Ok(serde_json::from_slice(&bytes)
            .inspect_err(|e| {
                tracing::warn!(record = hex, error = %e, "unreadable staging record ignored");
            })
            .ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read staging record of {hex}"), e)),
    }
}

/// Atomic (a killed driver leaves the old or the new record) but not durable: what a record
/// describes, an attached loop device and a mount, does not survive a power cut either, so
/// the fsyncs would buy nothing and cost a tenth of a NodeStage.
pub fn save(dir: &Path, hex: &str, s: &Staged) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(s).expect("staging records serialise");
    atomic::write_file_unsynced(&path(dir, hex), &bytes)
        .map_err(|e| Error::io(format!("write staging record of {hex}"), e))
}

pub fn remove(dir: &Path, hex: &str) -> Result<()> {
    atomic::remove_file_unsynced(&path(dir, hex))
        .map(drop)
        .map_err(|e| Error::io(format!("remove staging record of {hex}"), e))
}

/// Remove what writes interrupted by a crash left in the node's state directory: the temp
/// files of staging and target records and of freeze markers (`.<name>.tmp`), which only a
/// live writer ever renames into place. Called at start-up only, before any RPC is served:
/// the node lock (`.node.lock`) makes this the one process writing here, so no temp file can
/// belong to a write still under way. A killed marker write never froze anything (the freeze
/// comes after its rename). Returns a line per file removed.
pub fn sweep_interrupted_writes(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !atomic::is_temp_name(&name) || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        match std::fs::remove_file(e.path()) {
            Ok(()) => removed.push(format!(
                "removed {}, left by a write a crash interrupted",
                e.path().display()
            )),
            Err(err) => removed.push(format!(
                "could not remove {} (left by an interrupted write): {err}",
                e.path().display()
            )),
        }
    }
    removed.sort();
    removed
}

/// All staging records, for start-up recovery and status.
pub fn all(dir: &Path) -> Vec<(String, Staged)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(".json")?.to_string();
            if atomic::is_temp_name(&name) {
                return None;
            }
            let s = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some((hex, s))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
