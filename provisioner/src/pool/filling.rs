//! The volumes a pool is still filling from other nodes, as the offline tools (`loopvol status`,
//! `loopvol volume list`) see them: read from the transfer records on disk, without the pool's
//! lock, so they work beside a running node plugin.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::transfers::{temp_image, transfers_dir, TransferRecord};

/// What `status` / `volume list` show of a volume being filled.
#[derive(Debug, Clone)]
pub struct Filling {
    pub record: TransferRecord,
    /// Bytes the temp image holds so far.
    pub allocated_bytes: u64,
}

impl Filling {
    /// How far the copy got, from the temp image's allocation (zero blocks are not written,
    /// so it can lag what was received; it never says 100 before the commit).
    pub fn percent(&self) -> u64 {
        match self.record.data_bytes {
            0 => 0,
            d => (self.allocated_bytes * 100 / d).min(99),
        }
    }

    /// What the volume still holds in reserve (its size less what the temp image took).
    pub fn reserved_bytes(&self) -> u64 {
        self.record
            .volume
            .size_bytes
            .saturating_sub(self.allocated_bytes)
    }
}

/// The volumes being filled in the pool at `pool_dir`, read from disk without the pool's lock
/// (for `loopvol status` and `volume list`, which may run beside the node plugin).
pub fn filling(pool_dir: &Path) -> Vec<Filling> {
    let Ok(entries) = fs::read_dir(transfers_dir(pool_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<Filling> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(".json")?.to_string();
            let record: TransferRecord = serde_json::from_slice(&fs::read(e.path()).ok()?).ok()?;
            let allocated_bytes = fs::metadata(temp_image(pool_dir, &hex, &record.transfer_id))
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            Some(Filling {
                record,
                allocated_bytes,
            })
        })
        .collect();
    out.sort_by(|a, b| a.record.volume.id.cmp(&b.record.volume.id));
    out
}
