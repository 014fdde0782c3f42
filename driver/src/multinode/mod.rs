//! Multi-node: the router a controller becomes when it serves many nodes' pools, how it finds
//! them, and the mTLS material their pool API uses.

#[cfg(feature = "certs")]
pub mod cert_bootstrap;
#[cfg(feature = "certs")]
pub mod certs;
#[cfg(feature = "kubernetes")]
pub mod discovery;
pub mod group_router;
pub mod router;
pub mod snapshot_metadata_router;
pub mod tls;
