//! Checking volume capabilities and mount flags. Everything a capability can ask for is decided
//! here once, for CreateVolume, ValidateVolumeCapabilities, NodeStage and NodePublish alike.

use crate::csi::volume_capability::access_mode::Mode;
use crate::csi::volume_capability::AccessType;
use crate::csi::VolumeCapability;
pub use crate::engine::access::{Access, Checked};
use crate::error::{Error, Result};
use crate::fs::mount_options::check_mount_flag;
use provisioner::FsType;

/// Validate one capability; any problem is INVALID_ARGUMENT with the reason.
pub fn check(cap: &VolumeCapability) -> Result<Checked> {
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume capability has no access_mode".into()))?
        .mode();
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        Mode::Unknown => {
            return Err(Error::InvalidArgument(
                "volume capability access_mode is UNKNOWN".into(),
            ))
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "access mode {} is not supported: loopvol volumes are local to one node",
                other.as_str_name()
            )))
        }
    }
    let access = match &cap.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() {
                None
            } else {
                Some(m.fs_type.parse::<FsType>()?)
            };
            for f in &m.mount_flags {
                check_mount_flag(f)?;
            }
            if !m.volume_mount_group.is_empty() {
                return Err(Error::InvalidArgument(
                    "volume_mount_group is not supported (VOLUME_MOUNT_GROUP is not advertised)"
                        .into(),
                ));
            }
            Access::Mount {
                fs_type,
                flags: m.mount_flags.clone(),
            }
        }
        None => {
            return Err(Error::InvalidArgument(
                "volume capability needs an access_type (mount or block)".into(),
            ))
        }
    };
    Ok(Checked { access, mode })
}

/// Validate a non-empty list of capabilities.
pub fn check_all(caps: &[VolumeCapability]) -> Result<Vec<Checked>> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument(
            "volume_capabilities is required".into(),
        ));
    }
    caps.iter().map(check).collect()
}

/// The single fs type the mount capabilities name, if any; two different ones is an error.
pub fn fs_type_of(checked: &[Checked]) -> Result<Option<FsType>> {
    let mut found: Option<FsType> = None;
    for c in checked {
        if let Access::Mount {
            fs_type: Some(t), ..
        } = c.access
        {
            match found {
                Some(f) if f != t => {
                    return Err(Error::InvalidArgument(format!(
                        "capabilities ask for two filesystems ({f} and {t})"
                    )))
                }
                _ => found = Some(t),
            }
        }
    }
    Ok(found)
}
