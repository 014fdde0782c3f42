//! Free space against what thin volumes were promised.

use std::path::Path;

use provisioner::capacity::Capacity;
use provisioner::listing;

use super::Check;
use crate::shared::units::bytes;

const NAME: &str = "free space";
/// Below this the pool is full for practical purposes (the node health RPC says the same).
const FULL: u64 = 1 << 20;

/// `pool` may not exist yet; then `probe_dir` (on the same filesystem) is measured.
pub fn free_space(pool: &Path, probe_dir: &Path, overcommit_ratio: f64) -> Check {
    let reserved = match listing::read_records(pool) {
        Ok(l) => l.reserved_bytes(),
        Err(_) if !pool.join("volumes").exists() => 0,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot read the pool's records: {e}"),
                "run as root",
            )
        }
    };
    let c = match Capacity::measure(probe_dir, reserved, overcommit_ratio) {
        Ok(c) => c,
        Err(e) => return Check::fail(NAME, e.to_string(), "check that the pool is mounted"),
    };
    if c.available_bytes < FULL {
        return Check::fail(
            NAME,
            format!(
                "the pool filesystem under {} is full ({} available)",
                probe_dir.display(),
                bytes(c.available_bytes)
            ),
            "free space on that filesystem or move the pool (--pool-dir) to a larger one",
        );
    }
    let backed = (c.available_bytes as f64 * overcommit_ratio) as u64;
    if c.reserved_bytes > backed {
        return Check::fail(
            NAME,
            format!(
                "thin volumes were promised {} more than they use, but only {} is available \
                 (× overcommit ratio {overcommit_ratio}): writes into them can fail with ENOSPC",
                bytes(c.reserved_bytes),
                bytes(c.available_bytes)
            ),
            "free space on the pool filesystem or delete unused volumes; a larger \
             --overcommit-ratio only accepts the risk",
        );
    }
    Check::pass(
        NAME,
        format!(
            "{} available of {}, {} reserved for thin volumes, {} more can be promised",
            bytes(c.available_bytes),
            bytes(c.total_bytes),
            bytes(c.reserved_bytes),
            bytes(c.headroom())
        ),
    )
}
