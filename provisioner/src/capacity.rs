//! How much a pool can still promise. Thin volumes only consume blocks as they are written, so
//! the space they were promised but have not used yet is *reserved*; the overcommit ratio says how
//! much of that promise may go unbacked (1.0 = every promise is backed by free space).

use serde::Serialize;
use std::path::Path;

use crate::error::IoContext;
use crate::params::Allocation;
use crate::PoolError;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Capacity {
    /// Size of the pool's filesystem.
    pub total_bytes: u64,
    /// Free bytes on the pool's filesystem available to us.
    pub available_bytes: u64,
    /// Σ over thin volumes of (provisioned size − allocated bytes).
    pub reserved_bytes: u64,
    pub overcommit_ratio: f64,
    /// With a cap on the pool (`--max-pool-bytes`): what the cap still allows, i.e. the cap
    /// minus the provisioned sizes of every volume in the pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cap_left_bytes: Option<u64>,
}

impl Capacity {
    pub fn measure(
        dir: &Path,
        reserved_bytes: u64,
        overcommit_ratio: f64,
    ) -> Result<Self, PoolError> {
        let st = nix::sys::statvfs::statvfs(dir).ctx(|| format!("statvfs {}", dir.display()))?;
        let frsize = st.fragment_size() as u64;
        Ok(Capacity {
            total_bytes: st.blocks() as u64 * frsize,
            available_bytes: st.blocks_available() as u64 * frsize,
            reserved_bytes,
            overcommit_ratio,
            cap_left_bytes: None,
        })
    }

    /// available × ratio − reserved: what new thin volumes may still be promised; never more
    /// than the pool's cap still allows.
    pub fn headroom(&self) -> u64 {
        let virt =
            (self.available_bytes as f64 * self.overcommit_ratio).min(u64::MAX as f64) as u64;
        let room = virt.saturating_sub(self.reserved_bytes);
        self.cap_left_bytes.map_or(room, |left| room.min(left))
    }

    /// The largest volume of this allocation type that can be created now. Thick volumes also
    /// need the bytes to physically exist right now.
    pub fn for_allocation(&self, allocation: Allocation) -> u64 {
        match allocation {
            Allocation::Thin => self.headroom(),
            Allocation::Thick => self.headroom().min(self.available_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(avail: u64, reserved: u64, ratio: f64) -> Capacity {
        Capacity {
            total_bytes: 1000,
            available_bytes: avail,
            reserved_bytes: reserved,
            overcommit_ratio: ratio,
            cap_left_bytes: None,
        }
    }

    #[test]
    fn a_cap_bounds_thin_and_thick_alike() {
        let mut c = cap(100, 30, 2.0);
        assert_eq!(c.for_allocation(Allocation::Thin), 170);
        c.cap_left_bytes = Some(40);
        assert_eq!(c.for_allocation(Allocation::Thin), 40);
        assert_eq!(c.for_allocation(Allocation::Thick), 40);
        c.cap_left_bytes = Some(0);
        assert_eq!(c.headroom(), 0);
    }

    #[test]
    fn no_overcommit_backs_every_promise() {
        let c = cap(100, 30, 1.0);
        assert_eq!(c.for_allocation(Allocation::Thin), 70);
        assert_eq!(c.for_allocation(Allocation::Thick), 70);
        assert_eq!(cap(10, 30, 1.0).headroom(), 0);
    }

    #[test]
    fn overcommit_stretches_thin_but_not_thick() {
        let c = cap(100, 30, 2.0);
        assert_eq!(c.for_allocation(Allocation::Thin), 170);
        assert_eq!(c.for_allocation(Allocation::Thick), 100);
    }

    #[test]
    fn measures_a_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let c = Capacity::measure(dir.path(), 0, 1.0).unwrap();
        assert!(c.total_bytes > 0 && c.available_bytes <= c.total_bytes);
    }
}
