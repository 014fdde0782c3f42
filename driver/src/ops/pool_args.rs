//! The pool arguments every command that opens a pool takes, and `volume create`'s.

use std::path::PathBuf;

use clap::Args;

use crate::shared::units::{parse_overcommit_ratio, parse_size};

#[derive(Debug, Clone, Args)]
pub struct PoolArgs {
    /// Directory holding the pool's backing files and records.
    #[arg(long, default_value = "/var/lib/loopvol", env = "LOOPVOL_POOL_DIR")]
    pub pool_dir: PathBuf,
    /// This node's ID (also the topology value). Defaults to the hostname.
    #[arg(long, env = "LOOPVOL_NODE_ID")]
    pub node_id: Option<String>,
    /// How far thin volumes may overcommit the pool's free space (1.0 = never).
    #[arg(long, default_value_t = 1.0, value_parser = parse_overcommit_ratio)]
    pub overcommit_ratio: f64,
}

#[derive(Debug, Args)]
pub struct VolumeCreateArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Name of the volume (and of the printed PV; the PVC gets `<name>-claim`).
    #[arg(long)]
    pub name: String,
    /// Size, e.g. 10Gi, 512Mi or a number of bytes.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    #[arg(long, default_value = "ext4")]
    pub fs_type: String,
    #[arg(long, default_value = "thin")]
    pub allocation: String,
    #[arg(long, default_value = "loopvol.csi.dev")]
    pub driver_name: String,
    /// Namespace of the printed PVC.
    #[arg(long, default_value = "default")]
    pub namespace: String,
}

impl PoolArgs {
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }
}
