//! How much of everything a run does: the full run, or `--quick` for a smoke test.

use serde::{Deserialize, Serialize};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub quick: bool,
    /// Client concurrency for CreateVolume/DeleteVolume (100 = csi-provisioner's default
    /// worker count).
    pub concurrencies: Vec<usize>,
    /// Volumes already in the pool for the "full pool" provisioning figures.
    pub prefill: usize,
    /// Size of the volumes provisioning and scale create (small, so thick ones are cheap).
    pub small_volume_bytes: u64,
    /// Size of the volumes staged and published against the floor.
    pub attach_volume_bytes: u64,
    pub attach_iterations: usize,
    pub fio_file_mib: u64,
    pub fio_runtime_s: u64,
    pub fio_repetitions: usize,
    pub scale_volumes: usize,
    pub scale_concurrency: usize,
    pub start_repetitions: usize,
    pub restart_repetitions: usize,
    /// Bytes sent across the namespaces' network by each cross-node floor.
    #[serde(default)]
    pub crossnode_bytes: u64,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        Plan {
            quick,
            concurrencies: vec![1, 8, 64, 100],
            prefill: if quick { 200 } else { 1000 },
            small_volume_bytes: 16 * MIB,
            attach_volume_bytes: GIB,
            attach_iterations: if quick { 6 } else { 100 },
            fio_file_mib: 256,
            fio_runtime_s: if quick { 2 } else { 4 },
            fio_repetitions: if quick { 1 } else { 5 },
            scale_volumes: if quick { 50 } else { 1000 },
            scale_concurrency: 32,
            start_repetitions: if quick { 3 } else { 7 },
            restart_repetitions: if quick { 1 } else { 3 },
            crossnode_bytes: if quick { 64 * MIB } else { GIB },
        }
    }

    /// Operations per provisioning batch at `concurrency`: enough for a p99 and for several
    /// waves of the highest concurrency, few enough that thick batches stay a few GiB.
    pub fn ops_at(&self, concurrency: usize) -> usize {
        if self.quick {
            (2 * concurrency).clamp(20, 200)
        } else {
            (8 * concurrency).clamp(400, 600)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_several_waves() {
        let full = Plan::new(false);
        assert_eq!(full.ops_at(1), 400);
        assert_eq!(full.ops_at(100), 600);
        assert!(full.concurrencies.contains(&100));
        let quick = Plan::new(true);
        assert!(quick.ops_at(100) >= 100 && quick.scale_volumes < full.scale_volumes);
    }
}
