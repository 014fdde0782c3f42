//! The CSI edge: one file per gRPC service. Each validates its requests, maps them onto the
//! node engine or the pool, and maps the answers back; no kernel work happens here.

pub mod capability;
pub mod content_source;
pub mod controller;
pub mod group_controller;
pub mod identity;
pub mod node;
pub mod snapshot_metadata;
pub mod transfer;
