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
    /// The name the driver serves --pool-dir under (`serve --pool NAME=DIR`); it is part of the
    /// volume's ID, so it must be the one the driver uses.
    #[arg(long, default_value = provisioner::ids::DEFAULT_POOL, value_parser = parse_pool_name)]
    pub pool_name: String,
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

fn parse_pool_name(s: &str) -> Result<String, String> {
    provisioner::ids::validate_pool_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// One `serve --pool NAME=DIR[,overcommit-ratio=R][,max-bytes=SIZE]`: everything about one
/// pool in one argument, so a DaemonSet patch adds one line per disk.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    pub dir: PathBuf,
    pub overcommit_ratio: f64,
    pub max_bytes: Option<u64>,
}

impl PoolSpec {
    /// The `default` pool as `--pool-dir`, `--overcommit-ratio` and `--max-pool-bytes` say.
    pub fn default_of(args: &PoolArgs) -> Self {
        PoolSpec {
            name: provisioner::ids::DEFAULT_POOL.to_string(),
            dir: args.pool_dir.clone(),
            overcommit_ratio: args.overcommit_ratio,
            max_bytes: args.max_pool_bytes,
        }
    }
}

/// Parse a `--pool` value. A directory holding `,` cannot be named here (use a symlink).
pub fn parse_pool_spec(s: &str) -> Result<PoolSpec, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=DIR[,overcommit-ratio=R][,max-bytes=SIZE]"))?;
    provisioner::ids::validate_pool_name(name).map_err(|e| e.to_string())?;
    let mut parts = rest.split(',');
    let dir = PathBuf::from(parts.next().unwrap_or_default());
    if !dir.is_absolute() {
        return Err(format!(
            "pool {name}: the directory must be an absolute path, not {:?}",
            dir.display()
        ));
    }
    let mut spec = PoolSpec {
        name: name.to_string(),
        dir,
        overcommit_ratio: 1.0,
        max_bytes: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("overcommit-ratio", v)) => spec.overcommit_ratio = parse_overcommit_ratio(v)?,
            Some(("max-bytes", v)) => spec.max_bytes = Some(parse_size(v)?),
            _ => {
                return Err(format!(
                    "pool {name}: unknown option {opt:?}; a pool takes overcommit-ratio=R and \
                     max-bytes=SIZE"
                ))
            }
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_specs_parse_with_their_options() {
        let s =
            parse_pool_spec("fast=/mnt/nvme/loopvol,overcommit-ratio=2,max-bytes=500Gi").unwrap();
        assert_eq!(s.name, "fast");
        assert_eq!(s.dir, PathBuf::from("/mnt/nvme/loopvol"));
        assert_eq!(s.overcommit_ratio, 2.0);
        assert_eq!(s.max_bytes, Some(500 << 30));
        let s = parse_pool_spec("b=/x").unwrap();
        assert_eq!((s.overcommit_ratio, s.max_bytes), (1.0, None));
        for bad in [
            "fast",
            "Fast=/x",
            "fast=rel/dir",
            "fast=/x,speed=9",
            "fast=/x,overcommit-ratio=0.5",
            "fast=/x,max-bytes=0",
        ] {
            assert!(parse_pool_spec(bad).is_err(), "{bad}");
        }
    }
}
