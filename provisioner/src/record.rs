//! The per-volume record: one small JSON file per volume, written atomically. One file per volume
//! (instead of one index) keeps create/delete O(1) and bounds what a crash can damage to the one
//! volume being changed.

use serde::{Deserialize, Serialize};

use crate::copy::CopyMethod;
use crate::encryption::Encryption;
use crate::io_limits::IoLimits;
use crate::params::{Allocation, FsType};

pub const RECORD_FORMAT: u32 = 1;

/// Where a volume's initial content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "id")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// For people: `snapshot snap-…@node` or `volume vol-…@node`.
impl std::fmt::Display for ContentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentSource::Snapshot(id) => write!(f, "snapshot {id}"),
            ContentSource::Volume(id) => write!(f, "volume {id}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub format: u32,
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub fs_type: FsType,
    pub allocation: Allocation,
    pub created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ContentSource>,
    /// Enforced on the node for every pod that has the volume published; changed live by
    /// ControllerModifyVolume. Absent in records written before limits existed.
    #[serde(default, skip_serializing_if = "IoLimits::is_empty")]
    pub io_limits: IoLimits,
    /// Created for raw block access only (no capability asked for a filesystem): `fs_type` is
    /// then only what a later mount stage would make, and the volume is shown without one.
    /// Absent (false) in records written before it existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub block_only: bool,
    /// Encrypted at rest (encryption.rs): the method and the salt the node derives the key
    /// with. A copy of the content carries its source's. Absent: not encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

impl VolumeRecord {
    /// The filesystem as people should see it: `block` for a volume created for raw block
    /// access, which has none.
    pub fn fs_label(&self) -> String {
        if self.block_only {
            "block".to_string()
        } else {
            self.fs_type.to_string()
        }
    }

    /// Why this volume cannot serve raw block access (`block`) or a class asking for encryption
    /// `asked` (`None`: the class was not given), as far as its encryption goes.
    pub fn encryption_mismatch(
        &self,
        block: bool,
        asked: Option<Option<crate::encryption::Method>>,
    ) -> Option<String> {
        let has = self.encryption.as_ref().map(|e| e.method);
        if has.is_some() && block {
            return Some("volume is encrypted (fscrypt): mount access only, not raw block".into());
        }
        match asked {
            Some(a) if a != has => Some(format!(
                "volume has encryption {} but {} was asked for",
                self.encryption_label(),
                a.map_or("-", |m| m.as_str())
            )),
            _ => None,
        }
    }

    /// The encryption as people should see it: the method, or `-` for none.
    pub fn encryption_label(&self) -> &'static str {
        self.encryption.as_ref().map_or("-", |e| e.method.as_str())
    }
}

/// A snapshot: an immutable copy of a volume's image at one instant, independent of the volume
/// afterwards (deleting the volume leaves it usable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub format: u32,
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    /// Size of the source volume: the smallest volume it can be restored into.
    pub size_bytes: u64,
    pub fs_type: FsType,
    pub created_unix_nanos: u128,
    /// How the image was copied (reflink shares extents; sparse-copy copies data extents).
    pub method: CopyMethod,
    /// The volume group snapshot this snapshot is a member of (group_snapshot.rs); such a
    /// snapshot is deleted only with its group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_snapshot_id: Option<String>,
    /// The source volume's encryption: the image holds its ciphertext, and a restore takes
    /// this (and so the same key) even after the volume is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}
