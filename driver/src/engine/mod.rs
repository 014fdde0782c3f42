//! The node engine: stage, publish, unpublish, unstage, expand, stats, health and start-up
//! recovery of this node's volumes, as plain blocking functions the CSI edge runs on worker
//! threads. It reaches block devices only through the [`crate::datapath`] seam and
//! filesystems only through [`crate::fs`].

pub mod access;
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

use provisioner::Pool;

/// What the node engine works with: the pool, where it may mount, how it freezes and where it
/// enforces IO limits. The CSI edge's [`crate::state::Driver`] holds one and derefs to it.
pub struct Engine {
    pub pool: Pool,
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
        self.pool.node_id()
    }
}
