//! StorageClass parameters understood by loopvol. Unknown keys are refused (a typo in a
//! StorageClass should fail loudly at the first PVC, not silently give the default), except the
//! `csi.storage.k8s.io/` namespace that the sidecars add on their own.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::encryption::{self, PARAM_ENCRYPTION};
use crate::ids::PoolName;
use crate::io_limits::{IoLimits, IoLimitsChange};
use crate::size::MIB;
use crate::PoolError;

pub const PARAM_FS_TYPE: &str = "fsType";
pub const PARAM_ALLOCATION: &str = "allocation";
/// Which of the node's pools the volume goes to (default: the pool named `default`).
pub const PARAM_POOL: &str = "pool";
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    #[default]
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    pub const ALL: [FsType; 3] = [FsType::Ext4, FsType::Xfs, FsType::Btrfs];

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        }
    }

    /// The smallest device each mkfs accepts (xfsprogs ≥ 5.19 refuses anything under 300 MB),
    /// so a volume that could never be formatted is refused at CreateVolume, not at first mount.
    pub fn min_size(self) -> u64 {
        match self {
            FsType::Ext4 => 8 * MIB,
            FsType::Xfs => 300 * MIB,
            FsType::Btrfs => 128 * MIB,
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsType {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, PoolError> {
        FsType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                PoolError::InvalidArgument(format!(
                    "unsupported filesystem type {s:?}; loopvol supports ext4, xfs and btrfs"
                ))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Sparse backing file: blocks are allocated as the volume is written.
    #[default]
    Thin,
    /// The whole size is allocated with fallocate at creation, so writes can never hit ENOSPC.
    Thick,
}

impl Allocation {
    pub fn as_str(self) -> &'static str {
        match self {
            Allocation::Thin => "thin",
            Allocation::Thick => "thick",
        }
    }
}

impl FromStr for Allocation {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, PoolError> {
        match s {
            "thin" => Ok(Allocation::Thin),
            "thick" => Ok(Allocation::Thick),
            _ => Err(PoolError::InvalidArgument(format!(
                "parameter {PARAM_ALLOCATION}: {s:?} is not \"thin\" or \"thick\""
            ))),
        }
    }
}

/// What a CreateVolume asks of the pool beyond its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VolumeParams {
    pub fs_type: FsType,
    pub allocation: Allocation,
    /// Whether the request named a filesystem (a restore must then match its source's).
    pub fs_explicit: bool,
    /// IO limits from the StorageClass (and, at CreateVolume, its VolumeAttributesClass).
    pub io_limits: IoLimits,
    /// The pool the StorageClass names ([`PARAM_POOL`]).
    pub pool: PoolName,
    /// Encryption at rest asked by the StorageClass ([`PARAM_ENCRYPTION`]); ext4 only.
    pub encryption: Option<encryption::Method>,
}

impl VolumeParams {
    /// Parse StorageClass parameters plus the fs type named by the mount capabilities, if any.
    /// The two sources of fs type must agree.
    pub fn parse<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
        capability_fs_type: Option<&str>,
    ) -> Result<Self, PoolError> {
        let mut out = VolumeParams::default();
        let mut param_fs: Option<FsType> = None;
        let mut limits = IoLimitsChange::default();
        for (key, value) in params {
            if limits.parse_key(key, value)? {
                continue;
            }
            match key {
                PARAM_FS_TYPE => param_fs = Some(value.parse()?),
                PARAM_ALLOCATION => out.allocation = value.parse()?,
                PARAM_POOL => {
                    out.pool = PoolName::new(value).map_err(|e| {
                        PoolError::InvalidArgument(format!("parameter {PARAM_POOL}: {e}"))
                    })?
                }
                PARAM_ENCRYPTION => out.encryption = Some(value.parse()?),
                k if k.starts_with(SIDECAR_PREFIX) => {}
                k => {
                    return Err(PoolError::InvalidArgument(format!(
                        "unknown StorageClass parameter {k:?}; loopvol accepts {PARAM_FS_TYPE}, \
                         {PARAM_ALLOCATION}, {PARAM_POOL}, {PARAM_ENCRYPTION}, {} (and ignores keys \
                         under {SIDECAR_PREFIX})",
                        crate::io_limits::KEYS.join(", ")
                    )))
                }
            }
        }
        let cap_fs = capability_fs_type
            .filter(|s| !s.is_empty())
            .map(FsType::from_str)
            .transpose()?;
        out.fs_type = match (param_fs, cap_fs) {
            (Some(p), Some(c)) if p != c => {
                return Err(PoolError::InvalidArgument(format!(
                    "parameter {PARAM_FS_TYPE}={p} contradicts the volume capability's fs_type={c}"
                )))
            }
            (p, c) => {
                out.fs_explicit = p.is_some() || c.is_some();
                c.or(p).unwrap_or_default()
            }
        };
        out.io_limits = IoLimits::default().with(&limits);
        if let Some(m) = out.encryption {
            if out.fs_type != FsType::Ext4 {
                return Err(PoolError::InvalidArgument(format!(
                    "parameter {PARAM_ENCRYPTION}={m} needs ext4 (fscrypt is ext4's file \
                     encryption); this volume asks for {}",
                    out.fs_type
                )));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_ext4_thin() {
        let p = VolumeParams::parse([], None).unwrap();
        assert_eq!(p.fs_type, FsType::Ext4);
        assert_eq!(p.allocation, Allocation::Thin);
        assert_eq!(p.pool.as_str(), "default");
        let p = VolumeParams::parse([("pool", "nvme-0")], None).unwrap();
        assert_eq!(p.pool.as_str(), "nvme-0");
    }

    #[test]
    fn known_keys_and_sidecar_keys() {
        let p = VolumeParams::parse(
            [
                ("fsType", "xfs"),
                ("allocation", "thick"),
                ("csi.storage.k8s.io/pvc/name", "x"),
            ],
            Some("xfs"),
        )
        .unwrap();
        assert_eq!(p.fs_type, FsType::Xfs);
        assert_eq!(p.allocation, Allocation::Thick);
        assert!(p.io_limits.is_empty());
        let p = VolumeParams::parse([("writeIOPS", "300"), ("readBPS", "8Mi")], None).unwrap();
        assert_eq!(p.io_limits.write_iops, Some(300));
        assert_eq!(p.io_limits.read_bps, Some(8 << 20));
        assert!(VolumeParams::parse([("writeIOPS", "-1")], None).is_err());
        assert_eq!(
            VolumeParams::parse([], Some("btrfs")).unwrap().fs_type,
            FsType::Btrfs
        );
    }

    #[test]
    fn bad_parameters_name_the_problem() {
        let e = VolumeParams::parse([("fstype", "ext4")], None).unwrap_err();
        assert!(e.to_string().contains("\"fstype\""), "{e}");
        let e = VolumeParams::parse([("fsType", "ntfs")], None).unwrap_err();
        assert!(e.to_string().contains("ntfs"), "{e}");
        let e = VolumeParams::parse([("allocation", "lazy")], None).unwrap_err();
        assert!(e.to_string().contains("lazy"), "{e}");
        let e = VolumeParams::parse([("pool", "Fast")], None).unwrap_err();
        assert!(matches!(e, PoolError::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("parameter pool"), "{e}");
        let e = VolumeParams::parse([("fsType", "ext4")], Some("xfs")).unwrap_err();
        assert!(e.to_string().contains("contradicts"), "{e}");
    }

    #[test]
    fn encryption_is_ext4_fscrypt_only() {
        let p = VolumeParams::parse([("encryption", "fscrypt")], None).unwrap();
        assert_eq!(p.encryption, Some(encryption::Method::Fscrypt));
        assert_eq!(VolumeParams::parse([], None).unwrap().encryption, None);
        for (params, cap) in [
            (vec![("encryption", "fscrypt"), ("fsType", "xfs")], None),
            (vec![("encryption", "fscrypt")], Some("btrfs")),
            (vec![("encryption", "luks")], None),
            (vec![("encryption", "")], None),
        ] {
            let e = VolumeParams::parse(params.clone(), cap).unwrap_err();
            assert!(
                matches!(e, PoolError::InvalidArgument(_)),
                "{params:?}: {e}"
            );
            assert!(e.to_string().contains("encryption"), "{e}");
        }
    }
}
