//! `loopvol certs bootstrap` makes certificates that the real router and node plugin accept
//! for their mTLS link (the same flags as manifests/), and a CA rotation done the documented way
//! keeps every old/new pairing that can meet during the rollouts talking. The CA is kept in a
//! directory store (`--store-dir`), the stand-in for the Kubernetes Secret.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use loopvol::csi::controller_client::ControllerClient;
use tonic::transport::Endpoint;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

struct Proc(Child, PathBuf);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: Vec<String>, socket: &Path, log: &Path) -> Proc {
    let log_file = std::fs::File::create(log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .arg("serve")
        .args(&args)
        .arg("--endpoint")
        .arg(format!("unix://{}", s(socket)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "loopvol exited ({st}): {}",
                std::fs::read_to_string(log).unwrap()
            );
        }
        assert!(Instant::now() < deadline, "loopvol did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Proc(child, socket.to_path_buf())
}

fn certs(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .arg("certs")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tls(dir: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        s(&dir.join("tls.crt")),
        "--tls-key".into(),
        s(&dir.join("tls.key")),
        "--tls-ca".into(),
        s(&dir.join("ca.crt")),
    ]
}

struct Setup {
    dir: tempfile::TempDir,
    store: String,
}

impl Setup {
    fn issue(&self, role: &str, name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        certs(&[
            "bootstrap",
            "--store-dir",
            &self.store,
            "--role",
            role,
            "--out",
            &s(&out),
        ]);
        out
    }

    fn node(&self, name: &str, certs: &Path, port: u16) -> Proc {
        let mut args: Vec<String> = [
            "--mode",
            "node",
            "--node-id",
            "n1",
            "--pool-listen",
            &format!("127.0.0.1:{port}"),
            "--pool-dir",
            &s(&self.dir.path().join("pool")),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(tls(certs));
        let p = self.dir.path();
        serve(
            args,
            &p.join(format!("{name}.sock")),
            &p.join(format!("{name}.log")),
        )
    }

    fn router(&self, name: &str, certs: &Path, port: u16) -> Proc {
        let mut args: Vec<String> = [
            "--mode",
            "controller",
            "--node-id",
            "router",
            "--node-endpoints",
            &format!("n1=https://127.0.0.1:{port}"),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(tls(certs));
        let p = self.dir.path();
        serve(
            args,
            &p.join(format!("{name}.sock")),
            &p.join(format!("{name}.log")),
        )
    }
}

/// Whether a GetCapacity through the router reaches the node (it needs the mTLS link).
async fn reaches_node(router: &Proc) -> Result<i64, tonic::Status> {
    let ch = Endpoint::from_shared(format!("unix://{}", s(&router.1)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ControllerClient::new(ch);
    let mut last = None;
    // The router may still be dialling: retry UNAVAILABLE for a moment.
    for _ in 0..20 {
        match c
            .get_capacity(loopvol::csi::GetCapacityRequest {
                volume_capabilities: vec![rw_mount("ext4")],
                parameters: Default::default(),
                accessible_topology: Some(loopvol::edge::controller::topology("n1")),
            })
            .await
        {
            Ok(r) => return Ok(r.into_inner().available_capacity),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrapped_certificates_carry_mtls_through_a_ca_rotation() {
    if !root_or_skip("bootstrapped_certificates_carry_mtls_through_a_ca_rotation") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("loopvol-certs-")
        .tempdir()
        .unwrap();
    let store = s(&dir.path().join("store"));
    let st = Setup { dir, store };

    // First install: both pods bootstrap from a CA the first one creates.
    let port = free_port();
    let node0 = st.node("node0", &st.issue("node", "node0"), port);
    let router0 = st.router("router0", &st.issue("router", "router0"), port);
    assert!(reaches_node(&router0).await.unwrap() > 0);

    // Step 1: stage a new CA; restarted pods trust both and still sign with the old one.
    certs(&["rotate", "--store-dir", &st.store]);
    let router1 = st.router("router1", &st.issue("router", "router1"), port);
    assert!(
        reaches_node(&router1).await.is_ok(),
        "staged router vs old node"
    );
    drop(node0);
    let port = free_port();
    let node1 = st.node("node1", &st.issue("node", "node1"), port);
    let router1 = {
        drop(router1);
        st.router("router1b", &st.dir.path().join("router1"), port)
    };
    assert!(
        reaches_node(&router1).await.is_ok(),
        "staged router vs staged node"
    );

    // Step 2: promote; a node restarted now is signed by the new CA, and the routers of step 1
    // (trusting both) accept it. A router from before the rotation trusts only the old CA and
    // is refused: the link really is verified.
    certs(&["rotate", "--store-dir", &st.store, "--promote"]);
    drop(node1);
    let port = free_port();
    let _node2 = st.node("node2", &st.issue("node", "node2"), port);
    let router1 = {
        drop(router1);
        st.router("router1c", &st.dir.path().join("router1"), port)
    };
    assert!(
        reaches_node(&router1).await.is_ok(),
        "staged router vs promoted node"
    );
    let router2 = st.router("router2", &st.issue("router", "router2"), port);
    assert!(
        reaches_node(&router2).await.is_ok(),
        "promoted router vs promoted node"
    );
    drop(router0);
    let stale = st.router("router0b", &st.dir.path().join("router0"), port);
    let e = reaches_node(&stale)
        .await
        .expect_err("a router trusting only the old CA reached a new-CA node");
    eprintln!("refused as expected: {e:?}");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
}
