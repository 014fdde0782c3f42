//! Start-up recovery: find again what each staging record describes and clean up what a
//! crash left attached.

use std::path::PathBuf;

use crate::fs::mount::{self, MountEntry};
use crate::node_state::{self, StagedAccess};
use provisioner::Pool;
use std::collections::HashMap;

use super::volume::*;
use super::Engine;
use crate::datapath::{blockdev, Attachment, FileId};

/// At start-up: remove the temp files of record writes a crash interrupted; find again what
/// each staging record describes, by identity and device number
/// (a restarted container sees other paths than the one that staged it), and say what was
/// re-adopted; and detach loop devices over pool images that were deleted (left by a crash
/// between delete steps) when nothing uses them. Every staging record is kept: one whose
/// device is gone is restored by the next NodeStageVolume.
pub fn recover(d: &Engine) -> Vec<String> {
    d.pools.iter().flat_map(|p| recover_pool(d, p)).collect()
}

/// [`recover`] for one pool: its staging records, the loop devices over its images.
fn recover_pool(d: &Engine, pool: &Pool) -> Vec<String> {
    let state_dir = pool.node_state_dir();
    let mut report = node_state::sweep_interrupted_writes(&state_dir);
    // One scan for all records: a scan per record asks every loop device once per record.
    let pool_loops = d.data_path.list_under(pool.dir());
    let by_file: HashMap<FileId, &Attachment> = pool_loops
        .iter()
        .filter_map(|l| l.backing.map(|id| (id, l)))
        .collect();
    let view = mount::MountView::new();
    let all = view.all().unwrap_or(&[]);
    let paths = |ms: Vec<&MountEntry>| -> Vec<PathBuf> {
        ms.into_iter().map(|m| m.mount_point.clone()).collect()
    };
    for (hex, mut s) in node_state::all(&state_dir) {
        let Some(l) = FileId::of(&pool.image_path(&hex)).and_then(|id| by_file.get(&id)) else {
            report.push(format!(
                "{} was staged at {} but is no longer attached (node rebooted?); the next NodeStageVolume restores it",
                s.volume_id,
                s.staging_path.display()
            ));
            continue;
        };
        let line = match &s.access {
            StagedAccess::Block => {
                let binds = paths(mount::device_node_binds(all, l.dev));
                let staged = if record_path_visible(&s, l, &view).unwrap_or(false) {
                    format!("staged at {}", s.staging_path.display())
                } else {
                    format!(
                        "recorded staging path {} not visible to this process",
                        s.staging_path.display()
                    )
                };
                format!(
                    "re-adopted {}: block volume on {}, {staged}, published at {binds:?}",
                    s.volume_id,
                    l.device.display(),
                )
            }
            StagedAccess::Mount { fs_type, .. } => {
                let mounted = paths(mount::of_device(all, l.dev));
                if record_path_visible(&s, l, &view).unwrap_or(false) {
                    let published: Vec<_> = mounted
                        .iter()
                        .filter(|p| !same_path(p, &s.staging_path))
                        .collect();
                    format!(
                        "re-adopted {}: {fs_type} on {}, mounted at {}, published at {published:?}",
                        s.volume_id,
                        l.device.display(),
                        s.staging_path.display()
                    )
                } else if !mounted.is_empty() {
                    format!(
                        "re-adopted {}: {fs_type} on {}, mounted here at {mounted:?}; the recorded \
                         staging path {} shows nothing to this process (it was staged by a driver \
                         that saw other paths), so the next NodeStageVolume or \
                         NodePublishVolume names the staging path",
                        s.volume_id,
                        l.device.display(),
                        s.staging_path.display()
                    )
                } else if blockdev::claimed(&l.device) {
                    format!(
                        "re-adopted {}: {fs_type} on {}, mounted only where this process cannot \
                         see (recorded staging path {})",
                        s.volume_id,
                        l.device.display(),
                        s.staging_path.display()
                    )
                } else {
                    format!(
                        "{} is attached on {} but not mounted at {}; the next NodeStageVolume \
                         mounts it again",
                        s.volume_id,
                        l.device.display(),
                        s.staging_path.display()
                    )
                }
            }
        };
        report.push(line);
        if s.device != l.device {
            // Keep the fast path fast: the next RPC asks this device first.
            s.device = l.device.clone();
            if let Err(e) = node_state::save(&state_dir, &hex, &s) {
                tracing::warn!(volume_id = %s.volume_id, error = %e, "could not update the staging record's device");
            }
        }
    }
    for l in &pool_loops {
        if !l.backing_deleted {
            continue;
        }
        let in_use = !mount::of_device(all, l.dev).is_empty()
            || !mount::device_node_binds(all, l.dev).is_empty()
            || blockdev::claimed(&l.device);
        if in_use {
            report.push(format!(
                "{} backs a deleted image and is still mounted; left alone",
                l.device.display()
            ));
        } else if d.data_path.detach(&l.device).is_ok() {
            report.push(format!(
                "detached orphan {} (its image was deleted)",
                l.device.display()
            ));
        }
    }
    report
}
