//! Everything one run measured, as written to `benchmarks.json` and read back by the report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::driver::StartTiming;
use crate::fio::{Figures, Pattern};
use crate::stats::{median, ratio, Summary};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub provisioning: Option<Provisioning>,
    pub attach: Option<Attach>,
    pub data_path: Option<DataPath>,
    /// Encrypted (fscrypt) against unencrypted volumes; absent in runs before it existed.
    #[serde(default)]
    pub encryption: Option<crate::encryption::Encryption>,
    pub scale: Option<Scale>,
    #[serde(default)]
    pub io_limits: Option<IoLimits>,
    #[serde(default)]
    pub cross_node: Option<crate::crossnode::CrossNode>,
    pub footprint: Option<Footprint>,
    /// What could not be measured, or was measured differently than asked, and why.
    pub notes: Vec<String>,
    /// What the final check found of ours still mounted or attached (must be empty).
    pub leftover_mounts: Vec<String>,
    pub leftover_loops: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    pub date_utc: String,
    pub commit: String,
    /// "quick" or "full".
    pub mode: String,
    pub duration_s: f64,
    pub machine: Machine,
    pub loopvol_binary: String,
    pub loopvol_args: Vec<String>,
    /// Versions of the tools the floor and the driver use.
    pub tools: BTreeMap<String, String>,
    pub sections: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    pub cpu: String,
    pub pool_dir: String,
    pub pool_fs: String,
    pub pool_device: String,
    /// Loop device nodes on the machine when the run started (loopvol scans them all).
    pub loop_devices: usize,
    /// Of which attached (to anything, not only this run).
    pub loop_devices_attached: usize,
}

/// A bound a ratio is held to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Target {
    /// e.g. "≤ 1.10× floor".
    pub text: String,
    pub limit: f64,
    /// True when the measured ratio must be at least `limit`, false when at most.
    pub at_least: bool,
    pub measured: Option<f64>,
    pub met: Option<bool>,
}

impl Target {
    pub fn at_most(limit: f64, what: &str, measured: Option<f64>) -> Target {
        Target::new(limit, false, format!("≤ {limit:.2}× {what}"), measured)
    }

    pub fn at_least(limit: f64, what: &str, measured: Option<f64>) -> Target {
        Target::new(limit, true, format!("≥ {limit:.2}× {what}"), measured)
    }

    fn new(limit: f64, at_least: bool, text: String, measured: Option<f64>) -> Target {
        let met = measured.map(|m| if at_least { m >= limit } else { m <= limit });
        Target {
            text,
            limit,
            at_least,
            measured,
            met,
        }
    }
}

/// loopvol and the floor over the same operations, and their ratios (loopvol / floor).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Compared {
    pub loopvol: Summary,
    pub floor: Summary,
    pub ratio_p50: Option<f64>,
    pub ratio_p99: Option<f64>,
    /// loopvol ops/s over floor ops/s (1.0 = as fast; lower is slower).
    pub ratio_ops: Option<f64>,
}

impl Compared {
    pub fn new(loopvol: Summary, floor: Summary) -> Compared {
        Compared {
            ratio_p50: ratio(loopvol.p50_ms, floor.p50_ms),
            ratio_p99: ratio(loopvol.p99_ms, floor.p99_ms),
            ratio_ops: ratio(loopvol.ops_per_s, floor.ops_per_s),
            loopvol,
            floor,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Provisioning {
    pub volume_bytes: u64,
    pub fs: String,
    pub prefill: usize,
    pub rows: Vec<ProvisioningRow>,
    /// Cost with `prefill` volumes already in the pool over cost with none.
    pub flatness: Vec<Flatness>,
    /// Wall time of creating the prefill volumes through loopvol (concurrency 32).
    pub prefill_create: Option<Summary>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProvisioningRow {
    /// "CreateVolume" or "DeleteVolume".
    pub op: String,
    pub allocation: String,
    pub prefilled: usize,
    pub concurrency: usize,
    pub figures: Compared,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Flatness {
    pub op: String,
    pub allocation: String,
    pub concurrency: usize,
    pub loopvol_p50_empty_ms: f64,
    pub loopvol_p50_full_ms: f64,
    pub floor_p50_empty_ms: f64,
    pub floor_p50_full_ms: f64,
    /// loopvol's p50 full / p50 empty.
    pub loopvol_ratio: Option<f64>,
    /// The floor's own full/empty ratio: how much of a change is the machine, not loopvol.
    pub floor_ratio: Option<f64>,
    /// Judged on loopvol_ratio.
    pub target: Target,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Attach {
    pub volume_bytes: u64,
    pub iterations: usize,
    pub rows: Vec<AttachRow>,
    /// Whether the floor's loop devices really had direct I/O on, as loopvol's do.
    pub floor_direct_io: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AttachRow {
    pub fs: String,
    /// "stage+publish" or "unpublish+unstage".
    pub phase: String,
    pub figures: Compared,
    pub target: Target,
    /// Per-call and per-step latencies behind the totals (loopvol RPCs, floor steps, and the
    /// extra tools loopvol runs).
    pub breakdown: Vec<Named>,
    pub mkfs_command: String,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Named {
    pub name: String,
    pub summary: Summary,
}

/// What configured IO limits hold fio to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IoLimits {
    pub volume: String,
    pub rows: Vec<IoLimitRow>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IoLimitRow {
    /// The mutable parameter set for this row (all others unlimited).
    pub key: String,
    /// In the row's metric; `None` for the unlimited baseline.
    pub limit: Option<f64>,
    pub job: String,
    /// "IOPS" or "MiB/s".
    pub metric: String,
    pub measured: f64,
    /// measured / limit.
    pub ratio: Option<f64>,
    /// ControllerModifyVolume's latency: the rules are rewritten before it answers, so this is
    /// the time from the request to the limit being in force for the running pod.
    pub modify_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataPath {
    pub engine: String,
    pub file_mib: u64,
    pub runtime_s: u64,
    pub repetitions: usize,
    pub volume: String,
    pub rows: Vec<FioRow>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FioRow {
    pub job: String,
    pub pattern: Option<Pattern>,
    /// "MiB/s" (sequential) or "IOPS" (random): the figure the target is on.
    pub metric: String,
    /// Medians over the repetitions.
    pub volume: Figures,
    pub plain: Figures,
    /// The same kind of volume set up by hand (losetup --direct-io=on, mkfs, mount, bind).
    pub hand_made: Figures,
    pub volume_runs: Vec<Figures>,
    pub plain_runs: Vec<Figures>,
    pub hand_made_runs: Vec<Figures>,
    /// Judged on volume / plain.
    pub target: Target,
    /// volume / hand-made loop volume: loopvol's own share of any gap.
    pub ratio_to_hand_made: Option<f64>,
}

impl FioRow {
    pub fn metric_of(&self, f: &Figures) -> f64 {
        if self.metric == "IOPS" {
            f.iops
        } else {
            f.bw_mib_s
        }
    }
}

/// Per-field medians of fio runs.
pub fn median_figures(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
    Figures {
        bw_mib_s: m(|f| f.bw_mib_s),
        iops: m(|f| f.iops),
        clat_p50_us: m(|f| f.clat_p50_us),
        clat_p99_us: m(|f| f.clat_p99_us),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Scale {
    pub volumes: usize,
    pub concurrency: usize,
    pub volume_bytes: u64,
    pub phases: Vec<ScalePhase>,
    pub loops_when_published: usize,
    pub mounts_when_published: usize,
    pub loops_after_teardown: usize,
    pub mounts_after_teardown: usize,
    pub all_released: bool,
    pub rss_published_bytes: u64,
    pub rss_after_teardown_bytes: u64,
    /// VmHWM of the driver before it was restarted.
    pub peak_rss_bytes: u64,
    /// Start-to-ready of a driver whose pool holds `volumes` volumes.
    pub start_with_volumes: Vec<StartTiming>,
    /// Loop device nodes the kernel added for the run (counted with every volume published),
    /// how many of them were still there after teardown and delete (loopvol removes the nodes
    /// it detaches), and how many of those the harness removed.
    pub loop_nodes_added: usize,
    #[serde(default)]
    pub loop_nodes_left: usize,
    pub loop_nodes_removed: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScalePhase {
    pub name: String,
    pub summary: Summary,
    /// p50 of the first and the last tenth of the calls, by start order.
    pub p50_first_tenth_ms: f64,
    pub p50_last_tenth_ms: f64,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Footprint {
    pub binary_bytes: u64,
    pub rss_idle_bytes: u64,
    pub peak_rss_bytes: u64,
    pub start_empty: Vec<StartTiming>,
}

/// Median of the socket-ready and probe-ready times of several starts.
pub fn median_start(starts: &[StartTiming]) -> StartTiming {
    let m = |f: fn(&StartTiming) -> f64| {
        median(&starts.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
    };
    StartTiming {
        socket_ms: m(|s| s.socket_ms),
        probe_ms: m(|s| s.probe_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_judge_both_directions() {
        assert_eq!(Target::at_most(1.1, "floor", Some(1.05)).met, Some(true));
        assert_eq!(Target::at_most(1.1, "floor", Some(1.2)).met, Some(false));
        assert_eq!(Target::at_least(0.95, "plain", Some(0.97)).met, Some(true));
        assert_eq!(Target::at_least(0.95, "plain", None).met, None);
        assert_eq!(Target::at_most(1.1, "floor", None).text, "≤ 1.10× floor");
    }

    #[test]
    fn medians_of_fio_runs() {
        let f = |bw| Figures {
            bw_mib_s: bw,
            iops: bw * 2.0,
            ..Default::default()
        };
        let m = median_figures(&[f(1.0), f(9.0), f(3.0)]);
        assert_eq!((m.bw_mib_s, m.iops), (3.0, 6.0));
    }
}
