//! NodeGetVolumeStats' health half (and ControllerGetVolumeHealth on an all-in-one node): the
//! pool's findings plus what the kernel says about the staged volume.

use crate::csi::{VolumeHealth, VolumeHealthErrorType};
use crate::datapath::blockdev;
use crate::error::Result;
use crate::fs::mount;
use crate::node_state::{self, StagedAccess};

use super::health::{self, entry};
use super::volume::*;
use super::Engine;

/// Node-side health: the pool's findings plus what the kernel says about the staged volume.
pub fn volume_health(d: &Engine, id: &str) -> Result<VolumeHealth> {
    let vol = volume(d, id)?;
    let mut statuses = health::pool_findings(&vol.pool, &vol.record);
    statuses.extend(health::freeze_findings(
        &vol.pool.node_state_dir(),
        &vol.hex,
    ));
    if let Some(s) = node_state::load(&vol.pool.node_state_dir(), &vol.hex)? {
        match current_loop(d, &vol, Some(&s.device)) {
            None => statuses.push(entry(
                VolumeHealthErrorType::Inaccessible,
                "LoopDeviceDetached",
                format!(
                    "volume is staged at {} but no loop device backs it",
                    s.staging_path.display()
                ),
            )),
            Some(l) if matches!(s.access, StagedAccess::Mount { .. }) => {
                match visible_mount(&s, &l, &mount::MountView::new())? {
                    // Mounted where this process cannot look (another mount namespace): not
                    // reported as missing, and its state cannot be read from here.
                    None if blockdev::claimed(&l.device) => {}
                    None => statuses.push(entry(
                        VolumeHealthErrorType::Inaccessible,
                        "NotMounted",
                        format!(
                            "staging path {} is no longer mounted",
                            s.staging_path.display()
                        ),
                    )),
                    Some(m) => statuses.extend(health::filesystem_findings(&m, s.read_only)),
                }
            }
            Some(_) => {}
        }
    }
    if vol.record.allocation == provisioner::Allocation::Thin {
        if let Ok(c) = vol.pool.capacity() {
            if c.available_bytes < (1 << 20) {
                statuses.push(entry(
                    VolumeHealthErrorType::Degraded,
                    "PoolFull",
                    format!(
                        "the pool filesystem under {} is full: writes to this thin volume fail with ENOSPC",
                        vol.pool.dir().display()
                    ),
                ));
            }
        }
    }
    Ok(VolumeHealth {
        volume_id: id.to_string(),
        health_statuses: statuses,
    })
}
