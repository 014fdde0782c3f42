//! The filesystems of staged volumes, as the kernel sees them: forced read-only after errors
//! (`emergency_ro` on Linux 6.x, `ro` before), shut down, or with errors recorded. The same
//! findings as the health RPCs (see `health::filesystem_findings`).

use std::path::Path;

use super::Check;
use crate::engine::health;
use crate::fs::mount;
use crate::node_state::{self, StagedAccess};

const NAME: &str = "staged filesystems";

pub fn check(pool: &Path) -> Check {
    let staged = node_state::all(&pool.join("node"));
    let mounts = match mount::mounts() {
        Ok(m) => m,
        Err(e) => return Check::fail(NAME, e.to_string(), "mount /proc"),
    };
    let mut problems = Vec::new();
    let mut mounted = 0;
    for (hex, s) in &staged {
        if !matches!(s.access, StagedAccess::Mount { .. }) {
            continue;
        }
        let image = pool.join("volumes").join(format!("{hex}.img"));
        let Some(m) = mount::topmost_at(&mounts, &s.staging_path).filter(|m| {
            crate::datapath::default_path()
                .attachment_at(Path::new(&m.source), &image)
                .is_some()
        }) else {
            continue;
        };
        mounted += 1;
        for f in health::filesystem_findings(&m, s.read_only) {
            problems.push(format!(
                "volume {} ({}): {}",
                s.volume_id, f.reason, f.message
            ));
        }
    }
    if problems.is_empty() {
        return Check::pass(
            NAME,
            format!("{mounted} mounted, none read-only, shut down or with recorded errors"),
        );
    }
    Check::fail(
        NAME,
        problems.join("; "),
        "stop the pods using the volume, unstage it, and repair it (e2fsck -f / xfs_repair) \
         before staging it again; check the kernel log (and the pool's free space) for the cause",
    )
}
