//! `loopvol volume ...`: work on a pool directly, for admins preparing static PVs.

use anyhow::{bail, Context};
use provisioner::ids::Kind;
use provisioner::pool::CreateRequest;
use provisioner::{Pool, PoolOptions, VolumeId, VolumeParams, VolumeRecord};

use crate::ops::pool_args::{PoolArgs, VolumeCreateArgs};
use crate::TOPOLOGY_KEY;

/// The node ID to open the pool as: `--node-id` when given (the pool refuses it when it
/// belongs to another node), else the node the pool belongs to (its `.node-id`, or for an
/// older pool the node its records name), else (a new pool) the hostname. The hostname alone
/// would be right only for a pool served with the default `--node-id`.
pub fn pool_node_id(pool: &PoolArgs) -> anyhow::Result<String> {
    if let Some(id) = &pool.node_id {
        return Ok(id.clone());
    }
    let owner = if pool.pool_dir.is_dir() {
        provisioner::pool::identity::identity(&pool.pool_dir)?.owner
    } else {
        None
    };
    Ok(owner.unwrap_or_else(|| pool.node_id()))
}

/// Open the pool at `--pool-dir` as the pool `name` (the IDs it issues and accepts carry it).
fn open(pool: &PoolArgs, name: &str) -> anyhow::Result<Pool> {
    let (p, repairs) = Pool::open(PoolOptions {
        dir: pool.pool_dir.clone(),
        name: name.into(),
        node_id: pool_node_id(pool)?,
        overcommit_ratio: pool.overcommit_ratio,
        writer: true,
        node: false,
        in_use: crate::datapath::in_use_hook(crate::datapath::default_path()),
    })
    .map_err(|e| match e {
        provisioner::PoolError::PoolLocked(dir) => anyhow::anyhow!(
            "{} is being served by a running loopvol; stop it or create the volume through CSI",
            dir.display()
        ),
        e => anyhow::Error::from(e),
    })?;
    for r in repairs {
        eprintln!("repaired: {r}");
    }
    Ok(p)
}

/// Kubernetes object names must be DNS-1123 subdomains; check before printing a manifest that
/// `kubectl apply` would reject.
fn check_k8s_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        bail!("--name {name:?} must be a Kubernetes object name: lowercase letters, digits, '-' and '.'");
    }
    Ok(())
}

pub fn create(args: &VolumeCreateArgs) -> anyhow::Result<()> {
    check_k8s_name(&args.name)?;
    let params = VolumeParams::parse(
        [
            ("fsType", args.fs_type.as_str()),
            ("allocation", args.allocation.as_str()),
        ],
        None,
    )?;
    let pool = open(&args.pool, &args.pool_name)?;
    let record = pool
        .create_volume(&CreateRequest {
            name: args.name.clone(),
            required_bytes: i64::try_from(args.size).context("--size is too large")?,
            limit_bytes: 0,
            params,
            needs_filesystem: true,
            source: None,
        })
        .context("create volume")?;
    crate::ops::admin::csi::note_rounding(args.size, record.size_bytes);
    print!(
        "{}",
        static_manifest(&record, &args.driver_name, pool.node_id(), &args.namespace)
    );
    Ok(())
}

/// A PersistentVolume naming the volume by ID, pinned to its node, and a claim bound to it.
pub fn static_manifest(r: &VolumeRecord, driver: &str, node: &str, namespace: &str) -> String {
    let name = &r.name;
    let size = r.size_bytes;
    let fs = r.fs_type;
    let id = &r.id;
    format!(
        "apiVersion: v1
kind: PersistentVolume
metadata:
  name: {name}
spec:
  capacity:
    storage: \"{size}\"
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: \"\"
  volumeMode: Filesystem
  csi:
    driver: {driver}
    volumeHandle: {id}
    fsType: {fs}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions:
            - key: {TOPOLOGY_KEY}
              operator: In
              values: [\"{node}\"]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {name}-claim
  namespace: {namespace}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: \"\"
  volumeName: {name}
  resources:
    requests:
      storage: \"{size}\"
"
    )
}

/// Delete by ID. An ID of another node, or one the pool does not hold, is an error (exit 1):
/// an admin deleting by hand means a volume that exists, and must not be told "done".
pub fn delete(args: &PoolArgs, id: &str) -> anyhow::Result<()> {
    // The ID names its pool; the directory is the operator's word for where that pool is.
    let name = VolumeId::parse(Kind::Volume, id).map(|v| v.pool_name().to_string());
    let pool = open(
        args,
        name.as_deref().unwrap_or(provisioner::ids::DEFAULT_POOL),
    )?;
    if let Some(v) = VolumeId::parse(Kind::Volume, id) {
        if v.node != pool.node_id() {
            bail!(
                "{id} is a volume of node {:?}, but the pool {} belongs to node {:?}",
                v.node,
                args.pool_dir.display(),
                pool.node_id()
            );
        }
    }
    if !pool.delete_volume(id)? {
        bail!("volume {id} does not exist in {}", args.pool_dir.display());
    }
    println!("deleted {id}");
    Ok(())
}
