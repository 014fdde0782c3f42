//! Multi-node: the router a controller becomes when it serves many nodes' pools, how it finds
//! them, and the mTLS material their pool API uses.

pub mod certs;
pub mod discovery;
pub mod router;
pub mod snapshot_metadata_router;
pub mod tls;
