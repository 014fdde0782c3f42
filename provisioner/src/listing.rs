//! A read-only view of a pool directory, for tools (`loopvol status`, `doctor`, `volume list`)
//! that must work while a driver is serving the pool. It takes no lock and repairs nothing:
//! repairing is the job of the process that holds the pool's lock. Records are written
//! atomically (temp file + rename), so every `<hex>.json` seen here is complete.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::atomic;
use crate::error::IoContext;
use crate::params::Allocation;
use crate::record::{SnapshotRecord, VolumeRecord};
use crate::PoolError;

/// One record and where its image lives.
#[derive(Debug, Clone)]
pub struct Listed<T> {
    /// The 20-hex part of the ID: the file stem of the record and the image.
    pub hex: String,
    pub record: T,
    pub image: PathBuf,
}

impl<T> Listed<T> {
    /// Bytes the image really occupies on disk; `None` when the image is missing.
    pub fn allocated_bytes(&self) -> Option<u64> {
        fs::metadata(&self.image).ok().map(|m| m.blocks() * 512)
    }
}

/// Everything recorded in a pool, as found on disk at one moment.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub volumes: Vec<Listed<VolumeRecord>>,
    pub snapshots: Vec<Listed<SnapshotRecord>>,
    /// Record files that did not parse. The serving driver quarantines them at its next start.
    pub unreadable: Vec<PathBuf>,
}

impl Listing {
    /// Σ over thin volumes of (provisioned size − allocated bytes): the same figure the pool
    /// reserves against its free space (see [`crate::capacity`]).
    pub fn reserved_bytes(&self) -> u64 {
        self.volumes
            .iter()
            .filter(|v| v.record.allocation == Allocation::Thin)
            .map(|v| {
                v.record
                    .size_bytes
                    .saturating_sub(v.allocated_bytes().unwrap_or(0))
            })
            .sum()
    }

    pub fn volume(&self, hex: &str) -> Option<&Listed<VolumeRecord>> {
        self.volumes.iter().find(|v| v.hex == hex)
    }
}

/// Read every volume and snapshot record of the pool at `dir`, sorted by hex (= ID order).
/// A pool directory without a `snapshots/` folder (an older or never-started pool) simply has
/// no snapshots; a missing `volumes/` folder is an error, since then `dir` is not a pool.
pub fn read_records(dir: &Path) -> Result<Listing, PoolError> {
    let mut listing = Listing::default();
    listing.volumes = read_kind(&dir.join("volumes"), false, &mut listing.unreadable)?;
    listing.snapshots = read_kind(&dir.join("snapshots"), true, &mut listing.unreadable)?;
    Ok(listing)
}

fn read_kind<T: DeserializeOwned>(
    dir: &Path,
    may_be_missing: bool,
    unreadable: &mut Vec<PathBuf>,
) -> Result<Vec<Listed<T>>, PoolError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if may_be_missing && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e).ctx(|| format!("read {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if atomic::is_temp_name(&name) {
            continue;
        }
        let Some(hex) = name.strip_suffix(".json").filter(|s| is_hex(s)) else {
            continue;
        };
        let path = e.path();
        match fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<T>(&b).ok())
        {
            Some(record) => out.push(Listed {
                hex: hex.to_string(),
                record,
                image: dir.join(format!("{hex}.img")),
            }),
            // Deleted between read_dir and read, or corrupt: only the latter is worth a report.
            None if path.exists() => unreadable.push(path),
            None => {}
        }
    }
    out.sort_by(|a, b| a.hex.cmp(&b.hex));
    Ok(out)
}

fn is_hex(stem: &str) -> bool {
    crate::ids::is_hex_id(stem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{FsType, VolumeParams};
    use crate::pool::{CreateRequest, Pool, PoolOptions};
    use crate::size::MIB;

    #[test]
    fn lists_a_pool_that_another_handle_holds_locked() {
        let t = tempfile::tempdir().unwrap();
        let (pool, _) = Pool::open(PoolOptions::all(t.path(), "n1")).unwrap();
        let v = pool
            .create_volume(&CreateRequest {
                name: "a".into(),
                required_bytes: 16 * MIB as i64,
                limit_bytes: 0,
                params: VolumeParams {
                    fs_type: FsType::Ext4,
                    allocation: Allocation::Thin,
                    fs_explicit: false,
                    ..Default::default()
                },
                needs_filesystem: true,
                source: None,
            })
            .unwrap();
        pool.create_snapshot("s", &v.id, &|_| Ok(Box::new(())))
            .unwrap();
        std::fs::write(t.path().join("volumes/ffffffffffffffffffff.json"), b"{").unwrap();
        std::fs::write(t.path().join("volumes/.x.json.tmp"), b"{").unwrap();

        let l = read_records(t.path()).unwrap();
        assert_eq!(l.volumes.len(), 1);
        assert_eq!(l.volumes[0].record, v);
        assert!(l.volumes[0].image.exists());
        assert_eq!(l.snapshots.len(), 1);
        assert_eq!(l.unreadable.len(), 1, "{:?}", l.unreadable);
        assert_eq!(l.reserved_bytes(), 16 * MIB);
        assert!(read_records(&t.path().join("nope")).is_err());
    }
}
