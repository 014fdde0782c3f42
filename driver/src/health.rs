//! Volume health, reported through the CSI v1.13 health RPCs (which replaced the withdrawn
//! VolumeCondition). An empty list of statuses means "nothing bad is known".

use provisioner::ids::Kind;
use provisioner::{Pool, VolumeId, VolumeRecord};

use crate::csi::volume_health::VolumeHealthEntry;
use crate::csi::{VolumeHealth, VolumeHealthErrorType};

pub fn entry(status: VolumeHealthErrorType, reason: &str, message: String) -> VolumeHealthEntry {
    VolumeHealthEntry {
        status: status as i32,
        reason: reason.to_string(),
        message,
    }
}

/// What the pool alone can tell about a volume: is its backing file there?
pub fn pool_findings(pool: &Pool, r: &VolumeRecord) -> Vec<VolumeHealthEntry> {
    let hex = VolumeId::parse(Kind::Volume, &r.id)
        .map(|v| v.hex)
        .unwrap_or_default();
    let image = pool.image_path(&hex);
    match std::fs::metadata(&image) {
        Ok(m) if m.len() >= r.size_bytes => vec![],
        Ok(m) => vec![entry(
            VolumeHealthErrorType::Degraded,
            "BackingFileShort",
            format!(
                "backing file {} is {} bytes, the volume should be {}",
                image.display(),
                m.len(),
                r.size_bytes
            ),
        )],
        Err(_) => vec![entry(
            VolumeHealthErrorType::DataLoss,
            "BackingFileMissing",
            format!("backing file {} is missing", image.display()),
        )],
    }
}

pub fn of_volume(pool: &Pool, r: &VolumeRecord) -> VolumeHealth {
    VolumeHealth {
        volume_id: r.id.clone(),
        health_statuses: pool_findings(pool, r),
    }
}
