//! A pool's state at scrape time, one sample per pool (pools are never summed). A process
//! that manages the pool's records (controller or all) reads its own in-memory view; a
//! node-only process reads the records from disk, because the controller process owns them and
//! the node's in-memory view of them is empty.

use std::path::Path;

use provisioner::capacity::Capacity;
use provisioner::ids::Kind;
use provisioner::{listing, Pool, VolumeId};

use crate::metrics::PoolSample;
use crate::node_state;

/// Measure `pool` (blocking: statvfs, a sysfs walk, and in node-only mode a read of the
/// record files). `serves_node` is true in the node and all modes.
pub fn measure(pool: &Pool, serves_node: bool) -> Result<PoolSample, provisioner::PoolError> {
    measure_with_capacity(pool, serves_node).map(|(sample, _)| sample)
}

/// [`measure`], with the capacity the sample's figures came from (its headroom is what
/// GetCapacity offers a thin volume): the LoopPool status reports both from one measurement.
pub fn measure_with_capacity(
    pool: &Pool,
    serves_node: bool,
) -> Result<(PoolSample, Capacity), provisioner::PoolError> {
    let (capacity, volumes, snapshots, io_limits, sizes, encrypted) = if pool.is_writer() {
        let (vols, _) = pool.list_page(None, 0);
        let (snaps, _) = pool.list_snapshots(None, None, 0);
        let hex = |kind, id: &str| VolumeId::parse(kind, id).map(|v| v.hex).unwrap_or_default();
        let allocated = (vols.iter())
            .map(|r| pool.allocated_bytes(&hex(Kind::Volume, &r.id)))
            .chain(
                (snaps.iter()).map(|r| pool.snapshot_allocated_bytes(&hex(Kind::Snapshot, &r.id))),
            )
            .map(|b| b.unwrap_or(0))
            .sum();
        let provisioned = vols.iter().map(|r| r.size_bytes).sum();
        let encrypted = vols.iter().filter(|r| r.encryption.is_some()).count() as u64;
        (
            pool.capacity()?,
            vols.len() as u64,
            snaps.len() as u64,
            pool.io_limited(),
            (provisioned, allocated),
            encrypted,
        )
    } else {
        let l = listing::read_records(pool.dir())?;
        let cap = Capacity::measure(pool.dir(), l.reserved_bytes(), pool.overcommit_ratio())?;
        let limited = l
            .volumes
            .iter()
            .filter(|v| !v.record.io_limits.is_empty())
            .map(|v| (v.record.id.clone(), v.record.io_limits))
            .collect();
        let allocated = (l.volumes.iter().map(|v| v.allocated_bytes()))
            .chain(l.snapshots.iter().map(|s| s.allocated_bytes()))
            .map(|b| b.unwrap_or(0))
            .sum();
        let provisioned = l.volumes.iter().map(|v| v.record.size_bytes).sum();
        let encrypted = (l.volumes.iter())
            .filter(|v| v.record.encryption.is_some())
            .count() as u64;
        (
            cap,
            l.volumes.len() as u64,
            l.snapshots.len() as u64,
            limited,
            (provisioned, allocated),
            encrypted,
        )
    };
    let sample = PoolSample {
        pool: pool.name().to_string(),
        provisioned_bytes: sizes.0,
        allocated_bytes: sizes.1,
        capacity_bytes: capacity.total_bytes,
        available_bytes: capacity.available_bytes,
        reserved_bytes: capacity.reserved_bytes,
        volumes,
        encrypted_volumes: encrypted,
        snapshots,
        staged_volumes: serves_node.then(|| staged_count(&pool.node_state_dir())),
        loop_devices: crate::datapath::default_path().list_under(pool.dir()).len() as u64,
        io_limits,
    };
    Ok((sample, capacity))
}

fn staged_count(state_dir: &Path) -> u64 {
    node_state::all(state_dir).len() as u64
}
