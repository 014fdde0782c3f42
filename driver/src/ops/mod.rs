//! Operations: the admin tools (`status`, `doctor`, `volume`, `csi`, `snapshot`), the offline
//! volume commands, and the metrics and health HTTP endpoints.

pub mod admin;
pub mod metrics_http;
pub mod pool_args;
pub mod pool_gauges;
pub mod pool_identity;
pub mod static_volume;
