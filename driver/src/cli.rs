//! Command-line interface. Flag names are part of loopvol's contract with its manifests.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub use crate::ops::pool_args::{PoolArgs, VolumeCreateArgs};
pub use crate::shared::units::{parse_overcommit_ratio, parse_size};
pub use crate::shared::Mode;

#[derive(Debug, Parser)]
#[command(
    name = "loopvol",
    version,
    about = "CSI driver for node-local persistent volumes backed by loop devices",
    long_about = "loopvol serves the CSI Identity, Controller and Node services for a pool of \
                  backing files on this machine. `loopvol serve` with no flags runs the embedded \
                  default: all services on one unix socket over /var/lib/loopvol."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parse the command line with the checks clap cannot express; exits on a usage error.
    pub fn parse_checked() -> Cli {
        Self::try_parse_checked_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// [`Cli::parse_checked`] over given arguments, returning the usage error.
    pub fn try_parse_checked_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command().try_get_matches_from(args)?;
        let cli = Cli::from_arg_matches(&matches)?;
        if let (Command::Serve(a), Some(m)) = (&cli.command, matches.subcommand_matches("serve")) {
            let explicit_dir = matches!(
                m.value_source("pool_dir"),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            );
            let default = provisioner::ids::DEFAULT_POOL;
            if explicit_dir && a.pools.iter().any(|p| p.name == default) {
                return Err(Cli::command().error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "--pool {default}=DIR and --pool-dir both name the pool {default:?}; \
                         give one of them"
                    ),
                ));
            }
        }
        Ok(cli)
    }
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the serve variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve the CSI gRPC services on a unix socket.
    Serve(Box<ServeArgs>),
    /// Work on the volumes of a local pool directly (create and delete need the driver
    /// stopped; list and inspect work while it serves the pool).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Work on a pool as a whole (needs the driver stopped): move it to another node ID.
    #[command(subcommand)]
    Pool(crate::ops::pool_identity::PoolCommand),
    /// Report on a pool: capacity, volumes, what this node staged and attached. Read-only.
    Status(crate::ops::admin::status::StatusArgs),
    /// Check that this node can run loopvol and that its pool is sound; exit 1 on a failure.
    Doctor(crate::ops::admin::doctor::DoctorArgs),
    /// A CSI client, to drive a running driver by hand (create, stage, publish...).
    Csi(crate::ops::admin::csi::CsiArgs),
    /// Changed-block tracking of snapshots, asked of a running driver: the ranges a full
    /// (`allocated`) or incremental (`diff`) backup would read.
    Snapshot(crate::ops::admin::snapshot::SnapshotArgs),
    /// Internal: the process that guards one filesystem freeze (started by the driver).
    #[command(hide = true)]
    FreezeGuard(crate::fs::freeze::GuardArgs),
    /// The pool API's mTLS certificates: bootstrap them in the cluster (CA kept in a Secret),
    /// rotate the CA, or write a set into a directory with --out.
    #[cfg(feature = "certs")]
    Certs(crate::multinode::cert_bootstrap::CertsArgs),
}

/// Where a router finds the node plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NodesFrom {
    /// Watch the node plugin pods through the Kubernetes API.
    Kubernetes,
}

/// Where the node's pools are published as objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishPools {
    /// LoopPool objects (CRD looppools.loopvol.csi.dev).
    Kubernetes,
}

#[derive(Debug, Clone, Args)]
pub struct MultiNodeArgs {
    /// Node mode: also serve this pool's Controller API on ADDR:PORT for the router (mTLS only).
    #[arg(long, value_name = "ADDR:PORT")]
    pub pool_listen: Option<std::net::SocketAddr>,
    /// PEM certificate: the node's server certificate, or the router's client certificate.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA that signs every peer's certificate; peers without one are refused.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Controller mode: route to node plugins found this way (router mode).
    #[arg(long, value_enum, conflicts_with = "node_endpoints")]
    pub nodes_from: Option<NodesFrom>,
    /// Controller mode: route to these node plugins: `name=https://host:port,...`.
    #[arg(long, value_name = "LIST")]
    pub node_endpoints: Option<String>,
    /// With --nodes-from kubernetes: namespace of the node plugin pods.
    #[arg(long, env = "POD_NAMESPACE", default_value = "loopvol-system")]
    pub node_pod_namespace: String,
    /// With --nodes-from kubernetes: label selector of the node plugin pods.
    #[arg(
        long,
        default_value = "app.kubernetes.io/name=loopvol,app.kubernetes.io/component=node"
    )]
    pub node_pod_selector: String,
    /// With --nodes-from kubernetes: the port the node plugins' --pool-listen uses.
    #[arg(long, default_value_t = 9820)]
    pub node_pool_port: u16,
}

impl MultiNodeArgs {
    pub fn tls(&self) -> Option<crate::multinode::tls::TlsFiles> {
        Some(crate::multinode::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
        })
    }

    /// Router mode: a controller that forwards to node plugins instead of owning a pool.
    pub fn is_router(&self) -> bool {
        self.nodes_from.is_some() || self.node_endpoints.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Which CSI services to serve.
    #[arg(long, value_enum, default_value_t = Mode::All)]
    pub mode: Mode,
    /// Where to listen: unix:///path/to.sock (a plain absolute path works too).
    #[arg(
        long,
        default_value = "unix:///run/loopvol/csi.sock",
        env = "CSI_ENDPOINT"
    )]
    pub endpoint: String,
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Another pool of this node (repeatable), chosen by the StorageClass parameter `pool`:
    /// NAME=DIR[,overcommit-ratio=R][,max-bytes=SIZE]. --pool-dir is the pool `default`.
    #[arg(long = "pool", value_name = "NAME=DIR[,OPTS]", value_parser = crate::ops::pool_args::parse_pool_spec)]
    pub pools: Vec<crate::ops::pool_args::PoolSpec>,
    /// The CSI driver name reported by GetPluginInfo; must match the CSIDriver object.
    #[arg(long, default_value = "loopvol.csi.dev")]
    pub driver_name: String,
    /// Largest number of loopvol volumes the CO may place on this node (NodeGetInfo).
    #[arg(long, default_value_t = 1024)]
    pub max_volumes_per_node: i64,
    /// Kernel work (mkfs, mounts, allocation) running at once; further requests queue, so a
    /// burst of 100 provisioner workers cannot overload the node.
    #[arg(long, default_value_t = 16)]
    pub max_concurrent_ops: usize,
    /// Log lines as text for people or as one JSON object each, for log pipelines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// tracing filter, e.g. `info` or `loopvol=debug`.
    #[arg(long, default_value = "info", env = "LOOPVOL_LOG")]
    pub log_level: String,
    /// Serve /metrics (Prometheus), /healthz and /readyz over HTTP here; off when not given.
    #[arg(long, value_name = "ADDR:PORT", env = "LOOPVOL_METRICS_ADDRESS")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The host's cgroup filesystem as this process sees it (a container needs the host's
    /// /sys/fs/cgroup mounted here), where pods' cgroups are found to enforce IO limits.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// The cgroup whose IO limits apply to publishes without a pod UID (plain CSI clients,
    /// the embedded default): a v1 blkio or v2 directory the callers' processes run in.
    #[arg(long, value_name = "DIR")]
    pub io_cgroup: Option<PathBuf>,
    /// Also advertise capability groups that the released sidecars and csi-test v5.4 cannot
    /// name: `volume-health` (CSI v1.13), `get-snapshot`. Their RPCs are served either way.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    pub advertise_capabilities: Vec<crate::shared::advertise::Extra>,
    #[command(flatten)]
    pub multi: MultiNodeArgs,
    /// Keep a LoopPool object per pool of this node current through the Kubernetes API
    /// (in-cluster credentials, else KUBECONFIG): `kubectl get looppools`. Off when not given.
    #[arg(long, value_enum, value_name = "WHERE")]
    pub publish_pools: Option<PublishPools>,
    /// The kubelet's root directory: staging and target paths must lie inside it (or inside
    /// an --allowed-root).
    #[arg(long, default_value = "/var/lib/kubelet", env = "LOOPVOL_KUBELET_DIR")]
    pub kubelet_dir: PathBuf,
    /// Another directory the node plugin may stage and publish inside (repeatable), e.g. the
    /// temp dir of csi-sanity or of a manual `loopvol csi` session.
    #[arg(long, value_name = "DIR")]
    pub allowed_root: Vec<PathBuf>,
    /// The longest a snapshot or clone may keep a mounted source filesystem frozen; a freeze
    /// that lasts longer is lifted, and the copy fails instead of being torn.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub freeze_timeout: u64,
    /// The longest a stop (SIGTERM, SIGINT) takes: in-flight calls get up to half of it, and
    /// removing the idle loop nodes the node plugin used gets the rest; what does not fit is
    /// left to the next start. Keep it under the pod's terminationGracePeriodSeconds (30).
    #[arg(long, value_name = "SECONDS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..))]
    pub shutdown_timeout: u64,
    /// Test hook: keep each freeze this many milliseconds before copying.
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_freeze_hold_ms: u64,
    /// The most this node receives per second for restores and clones from other nodes, all
    /// transfers together (a quantity, e.g. 100Mi; 0 = no limit), so a copy cannot starve
    /// the pods' IO.
    #[arg(long, value_name = "BYTES/s", default_value = "256Mi",
          value_parser = crate::shared::units::parse_rate)]
    pub transfer_rate_limit: u64,
    /// Test-only fault injection: the source flips a byte of this transfer chunk (0-based)
    /// after digesting it, so tests can see a corrupt transfer refused.
    #[arg(long, hide = true)]
    pub test_corrupt_transfer_chunk: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume in the pool and print a PersistentVolume + PersistentVolumeClaim that
    /// bind to it 1:1 (a static PV).
    Create(VolumeCreateArgs),
    /// List the pool's volumes. Works while the driver serves.
    List {
        #[command(flatten)]
        pool: PoolArgs,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: crate::ops::admin::output::ListOutput,
    },
    /// Delete a volume by ID (the driver must be stopped).
    Delete {
        #[command(flatten)]
        pool: PoolArgs,
        /// The volume ID, `vol-<20 hex>@<node>`.
        id: String,
    },
    /// Show one volume: record, image, staging, loop device. Works while the driver serves.
    Inspect {
        #[command(flatten)]
        pool: PoolArgs,
        /// The volume ID, `vol-<20 hex>@<node>`, or its name (unique in a pool: the PVC's
        /// `pvc-<uid>`, or the name given to `volume create`).
        #[arg(value_name = "ID|NAME")]
        id: String,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: crate::ops::admin::Output,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overcommit_ratio_flag_is_checked() {
        assert!(Cli::try_parse_from(["loopvol", "serve", "--overcommit-ratio", "0"]).is_err());
    }

    #[test]
    fn the_default_pool_is_named_once() {
        let both = [
            "loopvol",
            "serve",
            "--pool-dir",
            "/a",
            "--pool",
            "default=/b",
        ];
        let e = Cli::try_parse_checked_from(both).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(e.to_string().contains("--pool-dir"), "{e}");
        let ok = [
            "loopvol",
            "serve",
            "--pool",
            "default=/b",
            "--pool",
            "fast=/c",
        ];
        let Command::Serve(a) = Cli::try_parse_checked_from(ok).unwrap().command else {
            panic!()
        };
        assert_eq!(a.pools.len(), 2);
        let ok = ["loopvol", "serve", "--pool-dir", "/a", "--pool", "fast=/c"];
        assert!(Cli::try_parse_checked_from(ok).is_ok());
        let twice = ["loopvol", "serve", "--pool", "x=/c", "--pool", "Bad=/d"];
        assert!(Cli::try_parse_checked_from(twice).is_err());
    }

    #[test]
    fn defaults_match_the_contract() {
        let cli = Cli::parse_from(["loopvol", "serve"]);
        let Command::Serve(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.mode, Mode::All);
        assert_eq!(a.endpoint, "unix:///run/loopvol/csi.sock");
        assert_eq!(a.pool.pool_dir, PathBuf::from("/var/lib/loopvol"));
        assert_eq!(a.driver_name, "loopvol.csi.dev");
        assert_eq!(a.kubelet_dir, PathBuf::from("/var/lib/kubelet"));
        assert!(a.allowed_root.is_empty());
        assert_eq!(a.freeze_timeout, 300);
        assert_eq!(a.shutdown_timeout, 25);
    }
}
