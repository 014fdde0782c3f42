//! Leftovers a crash or a hand edit can leave: loop devices over images that no volume owns,
//! and records whose image is gone. Loop devices are listed *before* records are looked at,
//! and each suspect is checked again, so a volume created or deleted meanwhile by a running
//! driver is not reported.

use std::collections::HashSet;
use std::path::Path;

use crate::datapath::{default_path, FileId};
use provisioner::listing;

use super::Check;
use crate::fs::mount;

/// Two checks: orphaned loop devices, then orphaned (and unreadable) records.
pub fn check(pool: &Path) -> Vec<Check> {
    if !pool.join("volumes").is_dir() {
        let note = format!("no pool at {} yet", pool.display());
        return vec![
            Check::pass("orphaned loop devices", note.clone()),
            Check::pass("orphaned records", note),
        ];
    }
    let pool = mount::canonical(pool);
    vec![loops(&pool), records(&pool)]
}

fn loops(pool: &Path) -> Check {
    const NAME: &str = "orphaned loop devices";
    let attached = default_path().list_under(pool);
    let owned = volume_images(pool);
    let orphans: Vec<String> = attached
        .iter()
        .filter(|l| {
            l.backing_deleted
                || !match l.backing {
                    Some(id) => owned.contains(&id),
                    // Not allowed to ask the device: its path is all there is.
                    None => owned_by_path(pool, &l.backing_file),
                }
        })
        // Still attached now, to the same file? (A running driver may have just unstaged it.)
        .filter(|l| {
            default_path()
                .list_under(pool)
                .iter()
                .any(|now| now.device == l.device && now.backing == l.backing)
        })
        .map(|l| {
            format!(
                "{} → {}{}",
                l.device.display(),
                l.backing_file.display(),
                if l.backing_deleted { " (deleted)" } else { "" }
            )
        })
        .collect();
    if orphans.is_empty() {
        return Check::pass(
            NAME,
            format!("{} attached, all backing existing volumes", attached.len()),
        );
    }
    Check::fail(
        NAME,
        format!("backed by no volume: {}", orphans.join(", ")),
        "unmount whatever is mounted from the device, then `losetup -d <device>`; the node \
         plugin also detaches unused devices of deleted images when it starts",
    )
}

/// The identities of the images of volumes that have a record (`<pool>/volumes/<hex>.img` next
/// to `<hex>.json`). By identity, because sysfs prints a device's backing file relative to a
/// vanished bind mount when a restarted node plugin container attached it.
fn volume_images(pool: &Path) -> HashSet<FileId> {
    let dir = pool.join("volumes");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let hex = name.to_str()?.strip_suffix(".img")?;
            dir.join(format!("{hex}.json"))
                .exists()
                .then(|| FileId::of(&e.path()))
                .flatten()
        })
        .collect()
}

/// Is `file` the image of a volume that has a record, by path (`<pool>/volumes/<hex>.img` +
/// `.json`)? Only for devices this process may not open.
fn owned_by_path(pool: &Path, file: &Path) -> bool {
    let Ok(rel) = file.strip_prefix(pool.join("volumes")) else {
        return false;
    };
    rel.to_str()
        .and_then(|n| n.strip_suffix(".img"))
        .is_some_and(|hex| pool.join("volumes").join(format!("{hex}.json")).exists())
}

fn records(pool: &Path) -> Check {
    const NAME: &str = "orphaned records";
    let l = match listing::read_records(pool) {
        Ok(l) => l,
        Err(e) => return Check::fail(NAME, e.to_string(), "run as root"),
    };
    let mut problems: Vec<String> = l
        .volumes
        .iter()
        .filter(|v| !v.image.exists())
        .map(|v| format!("volume {} has no image {}", v.record.id, v.image.display()))
        .collect();
    problems.extend(l.snapshots.iter().filter(|s| !s.image.exists()).map(|s| {
        format!(
            "snapshot {} has no image {}",
            s.record.id,
            s.image.display()
        )
    }));
    problems.extend(
        l.unreadable
            .iter()
            .map(|p| format!("{} does not parse", p.display())),
    );
    if problems.is_empty() {
        return Check::pass(
            NAME,
            format!(
                "{} volumes and {} snapshots, each with its image",
                l.volumes.len(),
                l.snapshots.len()
            ),
        );
    }
    Check::fail(
        NAME,
        problems.join("; "),
        "restore the image from a backup, or delete the volume (DeleteVolume through \
         Kubernetes, or `loopvol volume delete <id>` with the driver stopped); restarting the \
         driver moves unreadable records aside as *.corrupt",
    )
}
