//! `loopvol volume ...`: work on a pool directly, for admins preparing static PVs.

use anyhow::{bail, Context};
use provisioner::pool::CreateRequest;
use provisioner::{Pool, PoolOptions, VolumeParams, VolumeRecord};

use crate::cli::{PoolArgs, VolumeCreateArgs};
use crate::TOPOLOGY_KEY;

fn open(pool: &PoolArgs) -> anyhow::Result<Pool> {
    let (p, repairs) = Pool::open(PoolOptions {
        dir: pool.pool_dir.clone(),
        node_id: pool.node_id(),
        overcommit_ratio: pool.overcommit_ratio,
        writer: true,
        node: false,
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
    let pool = open(&args.pool)?;
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

/// Reads the records without the pool's lock, so it also works while a driver serves the pool.
pub fn list(pool: &PoolArgs) -> anyhow::Result<()> {
    let listing = provisioner::listing::read_records(&pool.pool_dir)?;
    let all = listing.volumes.iter().map(|v| &v.record);
    println!(
        "{:<48} {:<32} {:>14} {:<6} {:<6}",
        "ID", "NAME", "SIZE", "FS", "ALLOC"
    );
    for r in all {
        println!(
            "{:<48} {:<32} {:>14} {:<6} {:<6}",
            r.id,
            r.name,
            r.size_bytes,
            r.fs_type,
            r.allocation.as_str()
        );
    }
    Ok(())
}

pub fn delete(pool: &PoolArgs, id: &str) -> anyhow::Result<()> {
    let pool = open(pool)?;
    if pool.delete_volume(id)? {
        println!("deleted {id}");
    } else {
        println!("{id} does not exist");
    }
    Ok(())
}
