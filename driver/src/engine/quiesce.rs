//! The pool's quiesce hook: freeze a live volume's filesystem before it is copied.

use crate::error::Result;
use crate::fs::mount::{self};
use crate::node_state::{self, StagedAccess};
use provisioner::ids::Kind;
use provisioner::{VolumeId, VolumeRecord};

use super::volume::*;
use super::Engine;

/// Freeze `record`'s filesystem if it is staged and mounted where this process can see it; the
/// pool calls this right before copying a live volume. A volume that is not mounted here (block
/// access, unstaged, or mounted only in another mount namespace) is copied crash-consistent.
pub fn quiesce(d: &Engine, record: &VolumeRecord) -> Result<Option<crate::fs::freeze::Frozen>> {
    let Some(hex) = VolumeId::parse(Kind::Volume, &record.id).map(|v| v.hex) else {
        return Ok(None);
    };
    let pool = d.pools.for_id(Kind::Volume, &record.id)?.clone();
    let Some(staged) = node_state::load(&pool.node_state_dir(), &hex)? else {
        return Ok(None);
    };
    if !matches!(staged.access, StagedAccess::Mount { .. }) {
        return Ok(None);
    }
    let vol = Vol {
        record: record.clone(),
        image: pool.image_path(&hex),
        hex,
        pool,
    };
    let Some(l) = current_loop(d, &vol, Some(&staged.device)) else {
        return Ok(None);
    };
    match visible_mount(&staged, &l, &mount::MountView::new())? {
        Some(m) => {
            // The marker lives with the volume's pool, which is also the pool a freeze that
            // fails for lack of space is short of.
            let settings = crate::fs::freeze::Settings {
                node_dir: vol.pool.node_state_dir(),
                pool_dir: vol.pool.dir().to_path_buf(),
                ..d.freeze.clone()
            };
            crate::fs::freeze::freeze(&settings, &record.id, &vol.hex, &vol.image, &m.mount_point)
                .map(Some)
        }
        None => Ok(None),
    }
}
