//! loopvol's CSI driver: gRPC services over the `provisioner` pool, plus the node-side kernel work
//! (loop devices, mkfs, mounts). The binary in `main.rs` is a thin CLI over this library so tests
//! and tools can reuse the generated CSI types and client.

pub mod admin;
pub mod advertise;
pub mod capability;
pub mod cert_bootstrap;
pub mod certs;
pub mod cli;
pub mod controller_service;
pub mod discovery;
pub mod error;
pub mod format;
pub mod freeze;
pub mod group_controller_service;
pub mod group_router;
pub mod health;
pub mod identity_service;
pub mod io_throttle;
pub mod kernel;
pub mod logsafe;
pub mod loop_device;
pub mod metrics;
pub mod mount;
pub mod node_ops;
pub mod node_service;
pub mod node_state;
pub mod paths;
pub mod router;
pub mod server;
pub mod snapshot_metadata_router;
pub mod snapshot_metadata_service;
pub mod static_volume;
pub mod targets;
pub mod tls;
pub mod tools;
pub mod unix_authority;

/// The CSI v1 API generated from `proto/csi.proto`.
pub mod csi {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// The topology key every loopvol volume and node is labelled with.
pub const TOPOLOGY_KEY: &str = "topology.loopvol.csi.dev/node";
