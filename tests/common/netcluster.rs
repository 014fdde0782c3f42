//! A loopvol cluster across real network namespaces: N node plugins, each in a network
//! namespace of its own ([`super::netns`]) and a mount namespace of its own (its container,
//! [`super::container`]), each with its own pool on a filesystem of its own, serving the pool
//! API over real TCP with mTLS on an address of the test's private network; and a router in a
//! network namespace of its own, reaching them over that network. The test talks CSI to the
//! router (as the sidecars do) and to each node plugin (as kubelet does) through unix sockets
//! in the temp dir: a path is reachable from every network namespace.
//!
//! Fault tooling for kill -9 rounds: every process can be killed with SIGKILL and restarted
//! with the same arguments in the same namespaces, and [`NetCluster::assert_settled`] checks
//! what must hold of a pool once the dust has settled.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::identity_client::IdentityClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::*;
use tonic::transport::{Channel, Endpoint};

use super::netns::{tcp_listeners, Lan, Member};
use super::{container, rw_mount, write_certs, SmallFs};

/// The pool API's port. Every node has an address of its own in a namespace of its own, so
/// all of them (and every parallel test) use the same one without a race for free ports.
pub const POOL_PORT: u16 = 7443;

/// Each node's pool lives on an ext4 filesystem of this size, so that its free space moves
/// only with what the cluster does (the capacity invariant compares exact figures).
const POOL_FS_BYTES: u64 = 1 << 30;

/// A loopvol process inside a network namespace; SIGKILLed and waited for on drop.
pub struct NsProc {
    pub name: String,
    /// The whole command line, `nsenter …` first: a restart runs exactly this again.
    argv: Vec<OsString>,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl NsProc {
    async fn start(name: &str, argv: Vec<OsString>, socket: PathBuf, log: PathBuf) -> NsProc {
        let mut p = NsProc {
            name: name.to_string(),
            argv,
            socket,
            log,
            child: None,
        };
        p.spawn().await;
        p
    }

    /// Start (again) with the same arguments in the same namespaces, and wait until its CSI
    /// socket answers a Probe (the socket of a killed predecessor stays behind, refusing).
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = std::process::Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(ch) = unix_channel(&self.socket).await {
                if IdentityClient::new(ch).probe(ProbeRequest {}).await.is_ok() {
                    return;
                }
            }
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited early ({s}); log:\n{}", self.name, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not come up; log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9, as a crash (or an OOM kill) would; the namespaces stay.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        let _ = c.kill();
        let _ = c.wait();
    }

    /// The process's pid: `nsenter`, `unshare` and `sh` all exec, so this is loopvol's.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NsProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("unix://{}", path.display()))
        .unwrap()
        .connect()
        .await
}

/// A process of the cluster a fault round kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    /// Node plugin `n<i>` (1-based).
    Node(usize),
    Router,
}

/// How [`NetCluster::start_with`] departs from the defaults.
#[derive(Default)]
pub struct Options<'a> {
    /// The size of each node's pool filesystem (default 1 GiB).
    pub pool_bytes: Option<u64>,
    /// Extra `serve` flags for node `n<i>` (1-based), e.g. `--transfer-rate-limit`.
    pub node_args: Option<&'a dyn Fn(usize) -> Vec<String>>,
}

/// One node: its network identity, its directories as the host sees them, its plugin.
pub struct ClusterNode {
    pub member: Member,
    /// The pool as the host sees it (the container sees it bound at `ctr/pool`).
    pub pool: PathBuf,
    /// The kubelet directory as the host sees it; what the plugin mounts appears here.
    pub host_kubelet: PathBuf,
    /// The kubelet directory as the plugin sees it: the paths CSI node requests name.
    pub kubelet: PathBuf,
    pub plugin: NsProc,
}

impl ClusterNode {
    /// A path below the kubelet directory: (as the plugin sees it, as the host sees it).
    pub fn kubelet_path(&self, rel: &str) -> (PathBuf, PathBuf) {
        (self.kubelet.join(rel), self.host_kubelet.join(rel))
    }

    pub fn image(&self, volume_id: &str) -> PathBuf {
        self.pool
            .join("volumes")
            .join(format!("{}.img", super::hex_of(volume_id)))
    }

    /// A snapshot's image in this node's pool.
    pub fn snapshot_image(&self, snapshot_id: &str) -> PathBuf {
        self.pool.join("snapshots").join(format!(
            "{}.img",
            provisioner::VolumeId::parse(provisioner::ids::Kind::Snapshot, snapshot_id)
                .expect("a loopvol snapshot id")
                .hex
        ))
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(unix_channel(&self.plugin.socket).await.unwrap())
    }
}

pub struct NetCluster {
    pub nodes: Vec<ClusterNode>,
    pub router: NsProc,
    pub lan: Lan,
    /// The canonical temp dir: sockets, logs, certificates, kubelet directories.
    pub root: PathBuf,
    pools: Vec<SmallFs>,
    _dir: tempfile::TempDir,
}

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

impl NetCluster {
    /// `nodes` node plugins `n1`…`nN` and a router `r`, each in its own network namespace on
    /// one private /24, started and answering.
    pub async fn start(nodes: usize) -> NetCluster {
        NetCluster::start_with(nodes, &Options::default()).await
    }

    /// [`NetCluster::start`] with pools of another size and extra `serve` flags per node.
    pub async fn start_with(nodes: usize, opts: &Options<'_>) -> NetCluster {
        let names: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
        let mut members: Vec<&str> = names.iter().map(String::as_str).collect();
        members.push("r");
        let lan = Lan::new(&members).expect("build the test's network namespaces");
        let dir = tempfile::Builder::new()
            .prefix("loopvol-netns-")
            .tempdir()
            .unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let certs = root.join("certs");
        write_certs(&certs);
        let cert = |f: &str| os(certs.join(f));
        let bin = os(env!("CARGO_BIN_EXE_loopvol"));
        let mut kubelets = Vec::new();
        for name in &names {
            for sub in ["kubelet", "ctr/pool", "ctr/kubelet"] {
                std::fs::create_dir_all(root.join(name).join(sub)).unwrap();
            }
            kubelets.push(root.join(name).join("kubelet"));
        }
        container::fence(
            &root,
            &kubelets.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
        );
        let mut pools = Vec::new();
        let mut started = Vec::new();
        for (name, host_kubelet) in names.iter().zip(kubelets) {
            let member = lan.member(name).clone();
            let fs = SmallFs::new(opts.pool_bytes.unwrap_or(POOL_FS_BYTES));
            let pool = fs.mount_point.join("pool");
            std::fs::create_dir(&pool).unwrap();
            pools.push(fs);
            let ctr = root.join(name).join("ctr");
            let socket = root.join(format!("{name}.sock"));
            let mut argv = vec![
                os("nsenter"),
                os(format!("--net={}", member.ns_path().display())),
                os("--"),
            ];
            argv.extend(container::unshare_args().into_iter().map(os));
            argv.extend([
                os(&pool),
                os(&host_kubelet),
                os(ctr.join("pool")),
                os(ctr.join("kubelet")),
            ]);
            argv.extend([
                bin.clone(),
                os("serve"),
                os("--mode"),
                os("node"),
                os("--node-id"),
                os(name),
                os("--log-level"),
                os("info"),
                os("--endpoint"),
                os(format!("unix://{}", socket.display())),
                os("--pool-dir"),
                os(ctr.join("pool")),
                os("--kubelet-dir"),
                os(ctr.join("kubelet")),
                os("--pool-listen"),
                os(format!("{}:{POOL_PORT}", member.ip)),
                os("--tls-cert"),
                cert("server.crt"),
                os("--tls-key"),
                cert("server.key"),
                os("--tls-ca"),
                cert("ca.crt"),
            ]);
            if let Some(extra) = opts.node_args {
                argv.extend(extra(started.len() + 1).into_iter().map(os));
            }
            let log = root.join(format!("{name}.log"));
            let plugin = NsProc::start(name, argv, socket, log).await;
            started.push(ClusterNode {
                kubelet: ctr.join("kubelet"),
                member,
                pool,
                host_kubelet,
                plugin,
            });
        }
        let endpoints: Vec<String> = started
            .iter()
            .map(|n| format!("{}=https://{}:{POOL_PORT}", n.member.name, n.member.ip))
            .collect();
        let r = lan.member("r");
        let socket = root.join("router.sock");
        let argv = vec![
            os("nsenter"),
            os(format!("--net={}", r.ns_path().display())),
            os("--"),
            bin,
            os("serve"),
            os("--mode"),
            os("controller"),
            os("--node-id"),
            os("router"),
            os("--log-level"),
            os("info"),
            os("--endpoint"),
            os(format!("unix://{}", socket.display())),
            os("--node-endpoints"),
            os(endpoints.join(",")),
            os("--tls-cert"),
            cert("client.crt"),
            os("--tls-key"),
            cert("client.key"),
            os("--tls-ca"),
            cert("ca.crt"),
        ];
        let router = NsProc::start("router", argv, socket, root.join("router.log")).await;
        NetCluster {
            nodes: started,
            router,
            lan,
            root,
            pools,
            _dir: dir,
        }
    }

    /// Node `n<i>` (1-based, as named).
    pub fn node(&self, i: usize) -> &ClusterNode {
        &self.nodes[i - 1]
    }

    pub async fn router(&self) -> ControllerClient<Channel> {
        ControllerClient::new(unix_channel(&self.router.socket).await.unwrap())
    }

    /// kill -9 of `who`, for fault rounds that pick their victim.
    pub fn kill9(&mut self, who: Victim) {
        match who {
            Victim::Node(i) => self.kill9_node(i),
            Victim::Router => self.kill9_router(),
        }
    }

    /// Restart `who` with its arguments and namespaces, once it answers.
    pub async fn restart(&mut self, who: Victim) {
        match who {
            Victim::Node(i) => self.restart_node(i).await,
            Victim::Router => self.restart_router().await,
        }
    }

    pub fn kill9_node(&mut self, i: usize) {
        self.nodes[i - 1].plugin.kill9();
    }

    pub async fn restart_node(&mut self, i: usize) {
        self.nodes[i - 1].plugin.spawn().await;
    }

    pub fn kill9_router(&mut self) {
        self.router.kill9();
    }

    pub async fn restart_router(&mut self) {
        self.router.spawn().await;
    }

    /// The pool port listens on each node's own address inside its own namespace, and
    /// nothing of the cluster listens in the root namespace (where the test runs).
    pub fn assert_no_listener_outside(&mut self) {
        let root = tcp_listeners(Path::new("/proc/self/net/tcp"));
        assert!(
            !root.iter().any(|(_, p)| *p == POOL_PORT),
            "the pool port listens in the root namespace: {root:?}"
        );
        for n in &mut self.nodes {
            let own = tcp_listeners(Path::new(&format!("/proc/{}/net/tcp", n.plugin.pid())));
            assert!(
                own.contains(&(n.member.ip, POOL_PORT)),
                "{} does not listen on {}:{POOL_PORT} in its namespace: {own:?}",
                n.member.name,
                n.member.ip
            );
        }
    }

    /// What must hold of node `i`'s pool once nothing is in flight and every process has
    /// been (re)started: no file in `tmp/` (the start clears what a crash left), no transfer
    /// record (`transfers/`, design §2: every job ended one way or the other), every image
    /// with its record and every record with its image of the recorded size, and the
    /// capacity the running node offers equal to what its records say (`loopvol status`
    /// computes it from the records alone), so nothing stays promised to a dead job.
    pub async fn assert_settled(&self, i: usize) {
        let v = self.violations(i, Duration::from_secs(15)).await;
        assert!(v.is_empty(), "n{i} is not settled: {v:#?}");
    }

    /// The breaches of [`NetCluster::assert_settled`]'s rules on node `i`; the capacity
    /// figures may take up to `patience` to agree (the node caches its reserved total).
    pub async fn violations(&self, i: usize, patience: Duration) -> Vec<String> {
        let n = self.node(i);
        let entries = |d: &str| -> Vec<String> {
            std::fs::read_dir(n.pool.join(d))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut bad = Vec::new();
        for f in entries("tmp") {
            bad.push(format!("tmp/{f} left over"));
        }
        // A transfer record exists only while its job runs, and nothing runs now.
        for (f, record) in transfer_records(&n.pool) {
            bad.push(match record {
                Some(r) => format!(
                    "transfers/{f} left over: transfer {} into {} from {} outlived its job",
                    r.transfer_id, r.volume.id, r.endpoint
                ),
                None => format!("transfers/{f} left over (unreadable)"),
            });
        }
        let listing = provisioner::listing::read_records(&n.pool).unwrap();
        for u in &listing.unreadable {
            bad.push(format!("unreadable record {}", u.display()));
        }
        for v in &listing.volumes {
            let len = std::fs::metadata(&v.image).map(|m| m.len()).ok();
            if len != Some(v.record.size_bytes) {
                bad.push(format!(
                    "volume {}: image of {len:?} bytes, record says {}",
                    v.hex, v.record.size_bytes
                ));
            }
        }
        for f in entries("volumes") {
            if let Some(hex) = f.strip_suffix(".img") {
                if listing.volume(hex).is_none() {
                    bad.push(format!("image {f} without a record"));
                }
            }
        }
        let deadline = Instant::now() + patience;
        loop {
            let offered = self.offered(&n.member.name).await;
            let recorded = recorded_headroom(&n.pool);
            if offered == recorded {
                break;
            }
            if Instant::now() >= deadline {
                bad.push(format!(
                    "offers {offered} bytes of capacity, its records leave {recorded}"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bad
    }

    /// What must hold of node `i` at any moment, mid-copy included (a kill -9 round checks it
    /// while a process is down): every transfer record reads as one, and the volume it fills
    /// is visible nowhere — no volume record in the pool, not in ListVolumes through the
    /// router — unless the job has committed it (the record then goes next, design §2's order:
    /// image, volume record, transfer record), so a half-copied image is never a volume.
    pub async fn in_flight_violations(&self, i: usize) -> Vec<String> {
        let n = self.node(i);
        let mut bad = Vec::new();
        let listing = match unix_channel(&self.router.socket).await {
            Ok(ch) => ControllerClient::new(ch)
                .list_volumes(ListVolumesRequest::default())
                .await
                .ok(),
            Err(_) => None,
        };
        let listed: Vec<String> = match listing {
            Some(r) => r
                .into_inner()
                .entries
                .into_iter()
                .filter_map(|e| e.volume.map(|v| v.volume_id))
                .collect(),
            // The router or the node is down: ListVolumes shows nothing of it then.
            None => Vec::new(),
        };
        for (f, record) in transfer_records(&n.pool) {
            let Some(r) = record else {
                // Written atomically, so never torn; but it may vanish between the listing
                // and the read (the job ended).
                if n.pool.join("transfers").join(&f).exists() {
                    bad.push(format!("transfers/{f} is not a transfer record"));
                }
                continue;
            };
            let hex = super::hex_of(&r.volume.id);
            let committed = n.pool.join(format!("volumes/{hex}.json")).exists();
            if !committed && listed.contains(&r.volume.id) {
                bad.push(format!(
                    "{} is listed by ListVolumes while transfer {} still fills it",
                    r.volume.id, r.transfer_id
                ));
            }
        }
        bad
    }

    /// GetCapacity for thin volumes on `node`, through the router.
    async fn offered(&self, node: &str) -> i64 {
        self.router()
            .await
            .get_capacity(GetCapacityRequest {
                volume_capabilities: vec![rw_mount("")],
                accessible_topology: Some(loopvol::edge::controller::topology(node)),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("GetCapacity on {node}: {e}"))
            .into_inner()
            .available_capacity
    }
}

/// `transfers/*.json` of a pool: each file's name and its record, `None` if it does not read
/// as one (h3's format, `provisioner::pool::transfers::TransferRecord`).
fn transfer_records(
    pool: &Path,
) -> Vec<(String, Option<provisioner::pool::transfers::TransferRecord>)> {
    std::fs::read_dir(pool.join("transfers"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let record = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            (e.file_name().to_string_lossy().into_owned(), record)
        })
        .collect()
}

/// `loopvol status --pool-dir` (records and statvfs only, no driver asked): the headroom.
fn recorded_headroom(pool: &Path) -> i64 {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(["status", "-o", "json", "--pool-dir"])
        .arg(pool)
        .output()
        .unwrap();
    assert!(out.status.success(), "loopvol status: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["capacity"]["headroom_bytes"].as_i64().unwrap()
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.plugin.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Deepest first: volume mounts, kubelet directories, the fence.
        let mut mounts: Vec<PathBuf> = loopvol::fs::mount::mounts()
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&self.root))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for n in &self.nodes {
            for l in loopvol::datapath::loop_device::loops_under(&n.pool) {
                let _ = loopvol::datapath::loop_device::detach(&l.device);
            }
        }
        // Then (fields) the router, the namespaces, the pools' filesystems, the temp dir.
        let _ = &self.pools;
    }
}
