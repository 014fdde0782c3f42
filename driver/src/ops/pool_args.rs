//! The pool arguments every command that opens a pool takes, and `volume create`'s.

use std::path::PathBuf;

use clap::Args;

use crate::shared::units::{parse_overcommit_ratio, parse_pool_bytes, parse_size};

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
    /// The most the pool's volumes may be provisioned in total (a quantity, e.g. 500Gi), so a
    /// pool on a shared disk cannot promise all of it; unlimited when not given.
    #[arg(long, value_name = "SIZE", value_parser = parse_pool_bytes, allow_hyphen_values = true,
          env = "LOOPVOL_MAX_POOL_BYTES")]
    pub max_pool_bytes: Option<u64>,
}

#[derive(Debug, Args)]
pub struct VolumeCreateArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Name of the volume (and of the printed PV; the PVC gets `<name>-claim`).
    #[arg(long)]
    pub name: String,
    /// Size as a Kubernetes quantity: 10Gi, 1.5Gi, 512Mi, 10G or a number of bytes.
    #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
    pub size: u64,
    /// Filesystem to format the volume with on first stage: ext4, xfs or btrfs.
    #[arg(long, default_value = "ext4")]
    pub fs_type: String,
    /// thin (sparse, blocks allocated on write) or thick (allocated now).
    #[arg(long, default_value = "thin")]
    pub allocation: String,
    /// The CSI driver name the printed PersistentVolume names.
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
