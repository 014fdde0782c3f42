//! loopvol's CSI driver: gRPC services over the `provisioner` pool, plus the node-side kernel work
//! (loop devices, mkfs, mounts). The binary in `main.rs` is a thin CLI over this library so tests
//! and tools can reuse the generated CSI types and client.
//!
//! The modules are the layers of `docs/architecture.md`, each importing only the ones below it
//! (`tests/architecture.rs` keeps it so):
//!
//! ```text
//! cli ─▶ server ─▶ multinode ─▶ edge ─▶ state ─▶ engine ─▶ fs ─▶ datapath
//!   └──▶ ops ───────────────────────────────────────┘        node_state, shared, error, metrics
//! ```

pub mod cli;
pub mod csi;
pub mod datapath;
pub mod edge;
pub mod engine;
pub mod error;
pub mod fs;
pub mod metrics;
pub mod multinode;
pub mod node_state;
pub mod ops;
pub mod server;
pub mod shared;
pub mod state;
pub mod transfer_api;

/// The topology key every loopvol volume and node is labelled with.
pub const TOPOLOGY_KEY: &str = "topology.loopvol.csi.dev/node";
