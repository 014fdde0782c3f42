//! The storage subsystem behind loopvol: a *pool* is a directory of backing files (one sparse or
//! fully allocated image per volume) plus one small JSON record per volume. Everything here is
//! plain blocking Rust with no gRPC types, so the CLI, the driver and tests share one
//! implementation of the on-disk format and its crash-safety rules.

pub mod atomic;
pub mod capacity;
pub mod chunk_digest;
pub mod copy;
pub mod encryption;
pub mod error;
pub mod extents;
pub mod ids;
pub mod in_use;
pub mod io_limits;
pub mod keyed_lock;
pub mod listing;
pub mod params;
pub mod pool;
pub mod pools;
pub mod quantity;
pub mod record;
pub mod size;
pub mod snapshot;
pub mod snapshot_metadata;
pub mod transfer;

pub use error::PoolError;
pub use ids::{validate_name, VolumeId};
pub use in_use::InUse;
pub use io_limits::{IoLimits, IoLimitsChange};
pub use params::{Allocation, FsType, VolumeParams};
/// Group snapshots live with the pool (its start-up repair finishes interrupted groups).
pub use pool::group_snapshot;
pub use pool::{CreateRequest, Pool, PoolOptions};
pub use pools::Pools;
pub use record::{SnapshotRecord, VolumeRecord};
