//! Prometheus metrics. One process-wide registry (a `OnceLock`) so that every instrumentation
//! point in the driver is a one-line call (`metrics::observe_mkfs(fs, elapsed)`) instead of a
//! handle threaded through every function. Event metrics (RPCs, errors, stage and mkfs times)
//! live in that registry; pool state (capacity, counts, loop devices) is measured when
//! `/metrics` is scraped, so it is never stale and costs nothing between scrapes.
//!
//! Counters are registered without their `_total` suffix: the OpenMetrics encoder appends it.

pub mod rpc_layer;

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::Code;

use provisioner::IoLimits;

/// What `/metrics` reports about one pool (every series carries its `pool` label).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSample {
    /// The pool's name (`default` for `--pool-dir`).
    pub pool: String,
    pub capacity_bytes: u64,
    pub available_bytes: u64,
    pub reserved_bytes: u64,
    /// Logical: the sizes of the pool's volumes, summed (what was promised).
    pub provisioned_bytes: u64,
    /// Physical: the blocks its volume and snapshot images take on the filesystem.
    pub allocated_bytes: u64,
    pub volumes: u64,
    pub snapshots: u64,
    /// Staging records in `<pool>/node/`; `None` when this process does not serve Node.
    pub staged_volumes: Option<u64>,
    /// Loop devices backed by files under the pool.
    pub loop_devices: u64,
    /// The configured IO limits of every volume that has any.
    pub io_limits: Vec<(String, IoLimits)>,
}

/// Every metric name starts with this (`loopvol_...`).
pub const PREFIX: &str = "loopvol";

/// RPC latencies: from 1 ms (Identity calls) to minutes (mkfs of a large xfs, thick allocation).
const RPC_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Stage and mkfs take at least a few milliseconds and, for big volumes, minutes.
const SLOW_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IoLimitLabels {
    volume_id: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FsLabels {
    fs_type: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<RpcLabels>,
    errors: Family<CodeLabels, Counter>,
    stage_duration: HistogramFamily<FsLabels>,
    mkfs_duration: HistogramFamily<FsLabels>,
    transfer_bytes: Counter,
    transfers_in_flight: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let rpc_requests = Family::default();
        let rpc_duration: HistogramFamily<RpcLabels> =
            Family::new_with_constructor(|| Histogram::new(RPC_BUCKETS.iter().copied()));
        let errors = Family::default();
        let stage_duration: HistogramFamily<FsLabels> =
            Family::new_with_constructor(|| Histogram::new(SLOW_BUCKETS.iter().copied()));
        let mkfs_duration: HistogramFamily<FsLabels> =
            Family::new_with_constructor(|| Histogram::new(SLOW_BUCKETS.iter().copied()));
        registry.register(
            "rpc_requests",
            "CSI RPCs answered, by method and gRPC status code",
            rpc_requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "Time to answer a CSI RPC, by method and gRPC status code",
            rpc_duration.clone(),
        );
        registry.register(
            "errors",
            "Errors returned to CSI callers, by gRPC status code",
            errors.clone(),
        );
        registry.register(
            "stage_duration_seconds",
            "Time of a NodeStageVolume that attached and mounted a volume, by filesystem \
             (\"block\" for raw block volumes)",
            stage_duration.clone(),
        );
        registry.register(
            "mkfs_duration_seconds",
            "Time to make a filesystem on a blank volume, by filesystem",
            mkfs_duration.clone(),
        );
        let transfer_bytes = Counter::default();
        let transfers_in_flight = Gauge::default();
        registry.register(
            "transfer_bytes",
            "Image data received by this node's transfers from other nodes (restores and clones \
             across nodes; holes never travel)",
            transfer_bytes.clone(),
        );
        registry.register(
            "transfers_in_flight",
            "Transfers this node is receiving now",
            transfers_in_flight.clone(),
        );
        Metrics {
            registry,
            transfer_bytes,
            transfers_in_flight,
            rpc_requests,
            rpc_duration,
            errors,
            stage_duration,
            mkfs_duration,
        }
    }
}

fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// One answered RPC (called by [`rpc_layer`] for every request on the CSI socket).
pub fn observe_rpc(method: &'static str, code: Code, elapsed: Duration) {
    let m = get();
    let labels = RpcLabels {
        method,
        code: code_name(code),
    };
    m.rpc_requests.get_or_create(&labels).inc();
    m.rpc_duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
}

/// One error leaving the driver through its error → status mapping.
pub fn count_error(code: Code) {
    get()
        .errors
        .get_or_create(&CodeLabels {
            code: code_name(code),
        })
        .inc();
}

/// One stage that attached (and for mount access, mounted) a volume.
/// `fs` is the staged filesystem, `None` for raw block access.
pub fn observe_stage(fs: Option<provisioner::FsType>, elapsed: Duration) {
    let fs_type = fs.map_or("block", |f| f.as_str());
    get()
        .stage_duration
        .get_or_create(&FsLabels { fs_type })
        .observe(elapsed.as_secs_f64());
}

/// One mkfs run.
pub fn observe_mkfs(fs: provisioner::FsType, elapsed: Duration) {
    get()
        .mkfs_duration
        .get_or_create(&FsLabels {
            fs_type: fs.as_str(),
        })
        .observe(elapsed.as_secs_f64());
}

/// `n` bytes of a transfer received and written.
pub fn count_transfer_bytes(n: u64) {
    get().transfer_bytes.inc_by(n);
}

/// A transfer job started receiving.
pub fn transfer_started() {
    get().transfers_in_flight.inc();
}

/// A transfer job ended, either way.
pub fn transfer_finished() {
    get().transfers_in_flight.dec();
}

/// The whole exposition in OpenMetrics text: the event metrics, then the gauges of every pool
/// in `samples` (none when this process serves no pool).
pub fn encode(samples: &[PoolSample]) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail, and our label values need no escaping that could.
    let _ = encode_registry(&mut out, &get().registry);
    if !samples.is_empty() {
        let _ = encode_registry(&mut out, &pool_registry(samples));
    }
    let _ = encode_eof(&mut out);
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

/// A throwaway registry holding one scrape's pool gauges, one series per pool: pools are
/// different disks, so their bytes are never summed here.
fn pool_registry(samples: &[PoolSample]) -> Registry {
    let mut r = Registry::with_prefix(PREFIX);
    let mut family = |name: &str, help: &str, value: &dyn Fn(&PoolSample) -> Option<u64>| {
        let f: Family<PoolLabels, Gauge> = Family::default();
        for s in samples {
            if let Some(v) = value(s) {
                let labels = PoolLabels {
                    pool: s.pool.clone(),
                };
                f.get_or_create(&labels)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
        if samples.iter().any(|s| value(s).is_some()) {
            r.register(name, help, f);
        }
    };
    family(
        "pool_capacity_bytes",
        "Size of the filesystem holding the pool",
        &|s| Some(s.capacity_bytes),
    );
    family(
        "pool_available_bytes",
        "Free bytes of the pool's filesystem",
        &|s| Some(s.available_bytes),
    );
    family(
        "pool_reserved_bytes",
        "Bytes promised to thin volumes but not yet written",
        &|s| Some(s.reserved_bytes),
    );
    family(
        "pool_provisioned_bytes",
        "Logical: the sizes of the pool's volumes, summed",
        &|s| Some(s.provisioned_bytes),
    );
    family(
        "pool_allocated_bytes",
        "Physical: blocks the pool's volume and snapshot images take on its filesystem",
        &|s| Some(s.allocated_bytes),
    );
    family("pool_volumes", "Volumes in the pool", &|s| Some(s.volumes));
    family("pool_snapshots", "Snapshots in the pool", &|s| {
        Some(s.snapshots)
    });
    family(
        "node_staged_volumes",
        "Volumes this node has staged (staging records in <pool>/node/)",
        &|s| s.staged_volumes,
    );
    family(
        "loop_devices_attached",
        "Loop devices backed by files of this pool",
        &|s| Some(s.loop_devices),
    );
    let limits: Family<IoLimitLabels, Gauge> = Family::default();
    for (id, l) in samples.iter().flat_map(|s| &s.io_limits) {
        for (limit, v) in [
            ("read_iops", l.read_iops),
            ("write_iops", l.write_iops),
            ("read_bps", l.read_bps),
            ("write_bps", l.write_bps),
        ] {
            if let Some(v) = v {
                let labels = IoLimitLabels {
                    volume_id: id.clone(),
                    limit,
                };
                limits
                    .get_or_create(&labels)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
    }
    r.register(
        "volume_io_limit",
        "Configured IO limit of a volume: operations per second (read_iops, write_iops) or \
         bytes per second (read_bps, write_bps); no series means unlimited",
        limits,
    );
    r
}

/// The canonical gRPC name of a status code (`OK`, `NOT_FOUND`...), as label value.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_prefixed_names_and_eof() {
        observe_rpc("Probe", Code::Ok, Duration::from_millis(3));
        count_error(Code::NotFound);
        observe_mkfs(provisioner::FsType::Xfs, Duration::from_millis(300));
        let sample = PoolSample {
            pool: "default".into(),
            provisioned_bytes: 30,
            allocated_bytes: 20,
            capacity_bytes: 100,
            available_bytes: 60,
            reserved_bytes: 10,
            volumes: 2,
            snapshots: 1,
            staged_volumes: Some(1),
            loop_devices: 1,
            io_limits: vec![(
                "vol-0123456789abcdef0123@n1".into(),
                provisioner::IoLimits {
                    write_iops: Some(300),
                    ..Default::default()
                },
            )],
        };
        let fast = PoolSample {
            pool: "fast".into(),
            available_bytes: 7,
            staged_volumes: None,
            io_limits: vec![],
            ..sample.clone()
        };
        let text = encode(&[sample, fast]);
        assert!(text.contains(r#"loopvol_rpc_requests_total{method="Probe",code="OK"} "#));
        assert!(
            text.contains(
                r#"loopvol_rpc_duration_seconds_bucket{le="0.005",method="Probe",code="OK"} "#
            ) || text.contains(
                r#"loopvol_rpc_duration_seconds_bucket{method="Probe",code="OK",le="0.005"} "#
            ),
            "{text}"
        );
        assert!(text.contains(r#"loopvol_errors_total{code="NOT_FOUND"} "#));
        assert!(text.contains(r#"loopvol_mkfs_duration_seconds_count{fs_type="xfs"} "#));
        assert!(
            text.contains("loopvol_pool_available_bytes{pool=\"default\"} 60\n"),
            "{text}"
        );
        assert!(
            text.contains("loopvol_pool_available_bytes{pool=\"fast\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("loopvol_pool_provisioned_bytes{pool=\"fast\"} 30\n"));
        assert!(text.contains("loopvol_pool_allocated_bytes{pool=\"fast\"} 20\n"));
        assert!(text.contains("loopvol_node_staged_volumes{pool=\"default\"} 1\n"));
        assert!(!text.contains("loopvol_node_staged_volumes{pool=\"fast\"}"));
        assert!(
            text.contains(
                r#"loopvol_volume_io_limit{volume_id="vol-0123456789abcdef0123@n1",limit="write_iops"} 300"#
            ),
            "{text}"
        );
        assert!(!text.contains(r#"limit="read_iops""#));
        assert!(text.ends_with("# EOF\n"));
        assert!(!encode(&[]).contains("loopvol_pool_"));
    }
}
