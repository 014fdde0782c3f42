//! Leftovers a crash or a hand edit can leave: loop devices over images that no volume owns,
//! and records whose image is gone. Loop devices are listed *before* records are looked at,
//! and each suspect is checked again, so a volume created or deleted meanwhile by a running
//! driver is not reported.

use std::path::Path;

use provisioner::backing;
use provisioner::listing;

use super::Check;
use crate::mount;

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
    let attached = backing::loops_under(pool);
    let orphans: Vec<String> = attached
        .iter()
        .filter(|l| !owned_by_a_volume(pool, &l.backing_file) || l.backing_deleted)
        // Still attached now? (A running driver may have just unstaged it.)
        .filter(|l| {
            backing::loops_under(pool)
                .iter()
                .any(|now| now.device == l.device)
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

/// Is `file` the image of a volume that has a record (`<pool>/volumes/<hex>.img` + `.json`)?
fn owned_by_a_volume(pool: &Path, file: &Path) -> bool {
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
