//! Stopping a node plugin: SIGTERM ends the process within `--shutdown-timeout` even while the
//! router holds connections to its pool API and a call is in flight, and the idle loop nodes
//! the driver used are removed before it exits.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::volume_capability;
use loopvol::csi::*;
use tonic::transport::{Channel, Endpoint};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A `--mode node --pool-listen` plugin in a temp dir of its own. On drop: killed, its
/// filesystems thawed (a test that failed mid-freeze), mounts under the dir unmounted, and
/// loop devices over its pool detached.
struct NodePlugin {
    dir: tempfile::TempDir,
    child: Option<Child>,
    socket: PathBuf,
    pool_url: String,
}

impl NodePlugin {
    fn start(extra: &[&str]) -> NodePlugin {
        let dir = tempfile::Builder::new()
            .prefix("loopvol-shutdown-")
            .tempdir()
            .unwrap();
        let certs = dir.path().join("certs");
        write_certs(&certs);
        let port = std::net::TcpListener::bind("127.0.0.2:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let socket = dir.path().join("node.sock");
        let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_loopvol"))
            .args(["serve", "--mode", "node", "--node-id", "n1", "--endpoint"])
            .arg(format!("unix://{}", s(&socket)))
            .arg("--pool-dir")
            .arg(dir.path().join("pool"))
            .arg("--allowed-root")
            .arg(dir.path())
            .arg("--pool-listen")
            .arg(format!("127.0.0.2:{port}"))
            .arg("--tls-cert")
            .arg(certs.join("server.crt"))
            .arg("--tls-key")
            .arg(certs.join("server.key"))
            .arg("--tls-ca")
            .arg(certs.join("ca.crt"))
            .args(extra)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut p = NodePlugin {
            dir,
            child: Some(child),
            socket,
            pool_url: format!("https://127.0.0.2:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&p.socket).is_err() {
            if let Some(st) = p.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("loopvol exited ({st}): {}", p.log());
            }
            assert!(Instant::now() < deadline, "loopvol did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    fn pool(&self) -> PathBuf {
        self.dir.path().join("pool")
    }

    /// A new HTTP/2 connection to the pool API with the router's certificate.
    async fn pool_api(&self) -> ControllerClient<Channel> {
        let certs = self.dir.path().join("certs");
        ControllerClient::new(pool_api_channel(&certs, self.pool_url.clone()).await)
    }

    async fn node(&self) -> NodeClient<Channel> {
        let ch = Endpoint::from_shared(format!("unix://{}", s(&self.socket)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        NodeClient::new(ch)
    }

    /// SIGTERM, then wait (at most `limit`) for the exit: how long it took, or `None` when the
    /// process was still running at `limit`.
    fn sigterm_and_time(
        &mut self,
        limit: Duration,
    ) -> Option<(Duration, std::process::ExitStatus)> {
        let child = self.child.as_mut().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some((t.elapsed(), st));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for NodePlugin {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let root = std::fs::canonicalize(self.dir.path()).unwrap();
        let mut mounts: Vec<PathBuf> = loopvol::fs::mount::mounts()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&root))
            .map(|m| m.mount_point)
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            let _ = Command::new("fsfreeze").arg("-u").arg(&m).output();
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for l in loopvol::datapath::loop_device::loops_under(&self.pool()) {
            let _ = loopvol::datapath::loop_device::detach(&l.device);
        }
    }
}

/// Issue 27 (1b): a node plugin that the router keeps connected, with a snapshot in flight
/// that would hold its freeze for a minute, used to wait for that call after SIGTERM (the
/// kubelet killed it 30 s later). Now the pool API and the socket drain for at most half of
/// `--shutdown-timeout`, the process exits, and the freeze guardian thaws the filesystem
/// the abandoned snapshot froze.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_plugin_exits_within_its_budget_with_the_router_connected_and_a_call_in_flight() {
    if !root_or_skip("node_stop_bounded") {
        return;
    }
    let mut p = NodePlugin::start(&["--shutdown-timeout", "6", "--test-freeze-hold-ms", "60000"]);
    let mut api = p.pool_api().await;
    let id = api
        .create_volume(create_req("held", 16 * MIB, rw_mount("ext4")))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = p.dir.path().join("staging");
    p.node()
        .await
        .node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
        .await
        .unwrap();

    // The router's long-lived connection, idle after a call.
    let mut idle = p.pool_api().await;
    idle.controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap();
    // A snapshot whose freeze the test hook holds for 60 s: a call in flight.
    let snap = tokio::spawn(async move {
        api.create_snapshot(CreateSnapshotRequest {
            source_volume_id: id,
            name: "slow".into(),
            ..Default::default()
        })
        .await
    });
    let t = Instant::now();
    while !p.log().contains("filesystem frozen") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no freeze: {}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stopped = tokio::task::block_in_place(|| p.sigterm_and_time(Duration::from_secs(40)));
    let (took, status) = stopped.unwrap_or_else(|| panic!("still running 40 s after SIGTERM"));
    println!("exited {took:?} after SIGTERM ({status})");
    assert!(
        took < Duration::from_secs(8),
        "a 6 s budget took {took:?}; log:\n{}",
        p.log()
    );
    assert!(status.success(), "{status}");
    // "stopped" comes last, once nothing is waited for any more.
    let log = p.log();
    let (abandoned, stopped) = (
        log.find("calls still in flight at the shutdown deadline"),
        log.rfind("loopvol stopped"),
    );
    assert!(
        matches!((abandoned, stopped), (Some(a), Some(s)) if a < s),
        "{log}"
    );
    assert!(
        snap.await.unwrap().is_err(),
        "the abandoned snapshot answered OK"
    );
    drop(idle);

    // The guardian thaws what the abandoned snapshot froze: a write goes through.
    let probe = staging.join("after-stop");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(std::fs::write(probe, b"x").is_ok()));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "the staged filesystem stayed frozen after the stop"
    );
}

/// Idle connections alone (the router's HTTP/2 connection after a call, and a TCP connection
/// that never finished its TLS handshake) do not hold a stop: GOAWAY closes the first, and the
/// second is dropped with the listener. No call is in flight, so the stop is immediate.
#[tokio::test(flavor = "multi_thread")]
async fn idle_router_connections_do_not_delay_a_stop() {
    if !root_or_skip("node_stop_idle") {
        return;
    }
    let mut p = NodePlugin::start(&["--shutdown-timeout", "20"]);
    let mut idle = p.pool_api().await;
    idle.controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap();
    let half_open =
        std::net::TcpStream::connect(p.pool_url.trim_start_matches("https://")).unwrap();
    let stopped = tokio::task::block_in_place(|| p.sigterm_and_time(Duration::from_secs(40)));
    let (took, status) = stopped.unwrap_or_else(|| panic!("still running 40 s after SIGTERM"));
    println!("exited {took:?} after SIGTERM ({status})");
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(3),
        "idle connections held the stop for {took:?}; log:\n{}",
        p.log()
    );
    assert!(!p.log().contains("calls still in flight"), "{}", p.log());
    drop((idle, half_open));
}

/// Loop numbers of `devices` whose node is still there and attached to nothing.
fn idle_nodes(devices: &[u32]) -> Vec<u32> {
    devices
        .iter()
        .copied()
        .filter(|n| {
            let sys = PathBuf::from(format!("/sys/block/loop{n}"));
            sys.exists() && !sys.join("loop/backing_file").exists()
        })
        .collect()
}

/// Issue 27 (10): a burst of unstages right before SIGTERM used to leave hundreds of idle
/// `/dev/loopN` (2 s of removal, then a hand-over to the next start). Now the removal gets
/// what the drain left of `--shutdown-timeout`, with more threads, and every node the driver
/// used is gone when it exits. Only the nodes this driver attached are counted: other tests
/// make loop devices at the same time (and may take a number over once it is removed, so a
/// node found attached again is someone else's).
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_removes_the_idle_loop_nodes_the_driver_used() {
    if !root_or_skip("stop_removes_idle_nodes") {
        return;
    }
    let count: usize = std::env::var("LOOPVOL_STOP_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    // Boot-time nodes and nodes idle before the driver started are not the driver's to remove.
    let loop_numbers = || -> Vec<u32> {
        std::fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("loop")?.parse().ok())
            .collect()
    };
    let spare_before = idle_nodes(&loop_numbers());
    let mut d = Driver::start_with(&["--shutdown-timeout", "20"]).await;
    let (c, n) = (d.controller().await, d.node().await);
    let cap = || block_cap(volume_capability::access_mode::Mode::SingleNodeWriter);
    let mut vols = Vec::new();
    for i in 0..count {
        let id = c
            .clone()
            .create_volume(create_req(&format!("v{i}"), MIB, cap()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        vols.push((id, d.path(&format!("staging/{i}"))));
    }
    let stages: Vec<_> = vols
        .iter()
        .map(|(id, staging)| {
            let (mut n, req) = (n.clone(), stage_req(id, staging, cap()));
            tokio::spawn(async move { n.node_stage_volume(req).await.unwrap() })
        })
        .collect();
    for t in stages {
        t.await.unwrap();
    }
    let used: Vec<u32> = loopvol::datapath::loop_device::loops_under(&d.pool)
        .iter()
        .filter_map(|l| l.device.to_str()?.strip_prefix("/dev/loop")?.parse().ok())
        .collect();
    assert_eq!(used.len(), count, "one loop device per staged volume");
    let used: Vec<u32> = used
        .into_iter()
        .filter(|n| *n >= 8 && !spare_before.contains(n))
        .collect();
    let t = Instant::now();
    let unstages: Vec<_> = vols
        .iter()
        .map(|(id, staging)| {
            let (mut n, req) = (n.clone(), unstage_req(id, staging));
            tokio::spawn(async move { n.node_unstage_volume(req).await.unwrap() })
        })
        .collect();
    for t in unstages {
        t.await.unwrap();
    }
    let unstaged = t.elapsed();
    let left_at_stop = idle_nodes(&used).len();
    let t = Instant::now();
    assert!(d.stop().success());
    let stop_took = t.elapsed();
    println!(
        "{count} unstaged in {unstaged:?}; {left_at_stop} idle nodes at SIGTERM; \
         stopped in {stop_took:?}"
    );
    assert!(stop_took < Duration::from_secs(21), "{stop_took:?}");
    let idle = idle_nodes(&used);
    assert!(
        idle.is_empty(),
        "{} of the {count} nodes the driver used are left idle: {idle:?}\n{}",
        idle.len(),
        d.log()
    );
    assert!(
        !d.pool.join("node/loop-nodes-to-remove").exists(),
        "nothing should be left for the next start"
    );
}
