//! The node engine: stage, publish, unpublish, unstage, expand, stats, health and start-up
//! recovery of this node's volumes, as plain blocking functions the CSI edge runs on worker
//! threads. It reaches block devices only through the [`crate::datapath`] seam and
//! filesystems only through [`crate::fs`].

pub mod access;
pub mod encryption;
mod expand;
pub mod health;
pub mod io_throttle;
pub mod paths;
pub mod pod_cgroup;
mod publish;
mod quiesce;
mod recover;
mod stage;
mod stats;
mod steps;
pub mod targets;
mod unstage;
mod volume;
mod volume_health;

pub use expand::expand;
pub use publish::{publish, unpublish};
pub use quiesce::quiesce;
pub use recover::recover;
pub use stage::stage;
pub use stats::stats;
pub use unstage::unstage;
pub use volume::{attached_device, check_path, volume, Vol};
pub use volume_health::volume_health;

use std::path::PathBuf;

use provisioner::Pools;

/// What the node engine works with: the node's pools, where it may mount, how it freezes and
/// where it enforces IO limits. The CSI edge's [`crate::state::Driver`] holds one and derefs
/// to it.
pub struct Engine {
    /// Every pool of the node; a volume's ID names its pool ([`volume()`] finds it).
    pub pools: Pools,
    /// Where IO limits are enforced.
    pub cgroups: io_throttle::CgroupConfig,
    /// How snapshots and clones freeze mounted sources.
    pub freeze: crate::fs::freeze::Settings,
    /// Where the node plugin may stage and publish.
    pub paths: paths::Confinement,
    /// How images become block devices on this node.
    pub data_path: &'static dyn crate::datapath::BlockDataPath,
}

impl Engine {
    pub fn node_id(&self) -> &str {
        self.pools.node_id()
    }

    /// The node-side state directory of the pool holding volume `hex` (a name lives in one
    /// pool, so a hex is one volume on the node), for state kept by hex alone; the default
    /// pool's when no pool holds it (any more).
    pub fn node_dir_of(&self, hex: &str) -> PathBuf {
        self.pools
            .iter()
            .find(|p| p.has_volume(hex))
            .unwrap_or(self.pools.default_pool())
            .node_state_dir()
    }
}
