//! The pool's state at scrape time. A process that manages the pool's records (controller or
//! all) reads its own in-memory view; a node-only process reads the records from disk, because
//! the controller process owns them and the node's in-memory view of them is empty.

use std::path::Path;

use provisioner::capacity::Capacity;
use provisioner::{listing, Pool};

use crate::metrics::PoolSample;
use crate::node_state;

/// Measure `pool` (blocking: statvfs, a sysfs walk, and in node-only mode a read of the
/// record files). `serves_node` is true in the node and all modes.
pub fn measure(pool: &Pool, serves_node: bool) -> Result<PoolSample, provisioner::PoolError> {
    let (capacity, volumes, snapshots, io_limits) = if pool.is_writer() {
        (
            pool.capacity()?,
            pool.len() as u64,
            pool.snapshot_count() as u64,
            pool.io_limited(),
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
        (
            cap,
            l.volumes.len() as u64,
            l.snapshots.len() as u64,
            limited,
        )
    };
    Ok(PoolSample {
        capacity_bytes: capacity.total_bytes,
        available_bytes: capacity.available_bytes,
        reserved_bytes: capacity.reserved_bytes,
        volumes,
        snapshots,
        staged_volumes: serves_node.then(|| staged_count(&pool.node_state_dir())),
        loop_devices: crate::datapath::default_path().list_under(pool.dir()).len() as u64,
        io_limits,
    })
}

fn staged_count(state_dir: &Path) -> u64 {
    node_state::all(state_dir).len() as u64
}
