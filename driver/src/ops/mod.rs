//! Operations: the admin tools (`status`, `doctor`, `volume`, `csi`, `snapshot`), the offline
//! volume commands, the metrics and health HTTP endpoints, and the LoopPool objects.

pub mod admin;
#[cfg(feature = "kubernetes")]
pub mod looppool;
pub mod metrics_http;
pub mod pool_args;
pub mod pool_gauges;
pub mod pool_identity;
pub mod static_volume;
