//! A localhost cluster for multi-node tests: three node plugins on 127.0.0.2/3/4, each serving
//! its own pools over mTLS, and one router on a unix socket that the sidecars would talk to.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::*;
use tonic::transport::{Channel, Endpoint};

use super::*;

/// A loopvol process killed (and waited for) on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(args: Vec<String>, socket: PathBuf, log: PathBuf) -> Proc {
        Self::start_with_env(args, Vec::new(), socket, log)
    }

    pub fn start_with_env(
        args: Vec<String>,
        env: Vec<(String, String)>,
        socket: PathBuf,
        log: PathBuf,
    ) -> Proc {
        let mut p = Proc {
            child: None,
            args,
            env,
            socket,
            log,
        };
        p.spawn();
        p
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_loopvol"))
                .args(&self.args)
                .env_remove("KUBERNETES_SERVICE_HOST")
                .env_remove("KUBERNETES_SERVICE_PORT")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "loopvol exited ({s}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "loopvol did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, and wait for it: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `loopvol serve --mode node` for node `name`: its socket, its pools under `dir` (the default
/// one and `fast`), staging allowed under `dir/<name>/stage`, and the pool API on `listen` with
/// the certificates in `certs`.
pub fn node_args(name: &str, sock: &Path, dir: &Path, listen: &str, certs: &Path) -> Vec<String> {
    vec![
        "serve".into(),
        "--mode".into(),
        "node".into(),
        "--node-id".into(),
        name.into(),
        "--endpoint".into(),
        format!("unix://{}", s(sock)),
        "--allowed-root".into(),
        s(&dir.join(format!("{name}/stage"))),
        "--pool-dir".into(),
        s(&dir.join(format!("{name}/pool"))),
        "--pool".into(),
        format!("fast={}", s(&dir.join(format!("{name}/fast")))),
        "--pool-listen".into(),
        listen.into(),
        "--tls-cert".into(),
        s(&certs.join("server.crt")),
        "--tls-key".into(),
        s(&certs.join("server.key")),
        "--tls-ca".into(),
        s(&certs.join("ca.crt")),
    ]
}

pub fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Proc>,
    pub ports: Vec<u16>,
    pub router: Proc,
    pub router_socket: PathBuf,
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(&|_| Vec::new())
    }

    /// [`Cluster::start`], node `i` (1..=3) getting the extra arguments `extra(i)`.
    pub fn start_with(extra: &dyn Fn(u8) -> Vec<String>) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("loopvol-multi-")
            .tempdir()
            .unwrap();
        for out in ["certs", "rogue"] {
            write_certs(&dir.path().join(out));
        }
        let certs = dir.path().join("certs");
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        let mut endpoints = Vec::new();
        for i in 1..=3u8 {
            let ip = format!("127.0.0.{}", i + 1);
            let port = std::net::TcpListener::bind((ip.as_str(), 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let sock = dir.path().join(format!("n{i}.sock"));
            std::fs::create_dir_all(dir.path().join(format!("n{i}/stage"))).unwrap();
            let mut args = node_args(
                &format!("n{i}"),
                &sock,
                dir.path(),
                &format!("{ip}:{port}"),
                &certs,
            );
            args.extend(extra(i));
            nodes.push(Proc::start(
                args,
                sock,
                dir.path().join(format!("n{i}.log")),
            ));
            ports.push(port);
            endpoints.push(format!("n{i}=https://{ip}:{port}"));
        }
        let router_socket = dir.path().join("router.sock");
        let args = vec![
            "serve".into(),
            "--mode".into(),
            "controller".into(),
            "--node-id".into(),
            "router".into(),
            "--endpoint".into(),
            format!("unix://{}", s(&router_socket)),
            "--node-endpoints".into(),
            endpoints.join(","),
            "--tls-cert".into(),
            s(&certs.join("client.crt")),
            "--tls-key".into(),
            s(&certs.join("client.key")),
            "--tls-ca".into(),
            s(&certs.join("ca.crt")),
        ];
        let router = Proc::start(args, router_socket.clone(), dir.path().join("router.log"));
        Cluster {
            dir,
            nodes,
            ports,
            router,
            router_socket,
        }
    }

    pub async fn router(&self) -> ControllerClient<Channel> {
        let ch = Endpoint::from_shared(format!("unix://{}", s(&self.router_socket)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        ControllerClient::new(ch)
    }

    /// Where node `node` may stage (its `--allowed-root`).
    pub fn stage_dir(&self, node: u8) -> PathBuf {
        self.dir.path().join(format!("n{node}/stage"))
    }

    /// A Node client on node `node`'s CSI socket.
    pub async fn node_client(&self, node: u8) -> loopvol::csi::node_client::NodeClient<Channel> {
        let ch = Endpoint::from_shared(format!(
            "unix://{}",
            s(&self.nodes[node as usize - 1].socket)
        ))
        .unwrap()
        .connect()
        .await
        .unwrap();
        loopvol::csi::node_client::NodeClient::new(ch)
    }

    pub fn pool(&self, node: u8) -> PathBuf {
        self.dir.path().join(format!("n{node}/pool"))
    }

    pub fn image(&self, node: u8, id: &str) -> PathBuf {
        let hex = id.split_once('-').unwrap().1.split_once('@').unwrap().0;
        self.pool(node).join("volumes").join(format!("{hex}.img"))
    }
}

pub fn on_node(name: &str, node: u8) -> CreateVolumeRequest {
    let mut r = create_req(name, 16 * MIB, rw_mount("ext4"));
    let t = loopvol::edge::controller::topology(&format!("n{node}"));
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![t.clone()],
        preferred: vec![t],
    });
    r
}

/// Even after a failed assertion: the processes first, then whatever a test staged under the
/// cluster's directory (deepest mounts first), then the loop devices over its pools.
impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill9();
        }
        let Ok(root) = std::fs::canonicalize(self.dir.path()) else {
            return;
        };
        let mut mounts: Vec<PathBuf> = loopvol::fs::mount::mounts()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&root))
            .map(|m| m.mount_point)
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for i in 1..=self.nodes.len() {
            for pool in ["pool", "fast"] {
                let dir = root.join(format!("n{i}/{pool}"));
                for l in loopvol::datapath::loop_device::loops_under(&dir) {
                    let _ = loopvol::datapath::loop_device::detach(&l.device);
                }
            }
        }
    }
}
