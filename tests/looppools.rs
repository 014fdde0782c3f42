//! Pools as Kubernetes objects (issue 25, item 3): `serve --publish-pools kubernetes` keeps one
//! LoopPool per pool current on a fake API server (tests/common/fake_kube.rs) that checks the
//! server-side apply it gets. Two named pools on filesystems of their own (an ext4 and an xfs
//! image mounted under the test's temp dir) next to the default pool, as in tests/pools.rs.

mod common;
#[path = "common/fake_kube.rs"]
mod fake_kube;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use fake_kube::{FakeKube, Mode};
use loopvol::csi::*;
use serde_json::{json, Value};

/// Field order is drop order: the driver before the filesystems its pools live on.
struct Node {
    d: Driver,
    ext: SmallFs,
    xfs: SmallFs,
    api: FakeKube,
    _kube_dir: tempfile::TempDir,
}

impl Node {
    async fn start(setup: impl FnOnce(&FakeKube)) -> Node {
        let api = FakeKube::start().await;
        setup(&api);
        let kube_dir = tempfile::Builder::new()
            .prefix("loopvol-kube-")
            .tempdir()
            .unwrap();
        let kubeconfig = kube_dir.path().join("kubeconfig");
        api.kubeconfig(&kubeconfig);
        let ext = SmallFs::new(160 << 20);
        let xfs = SmallFs::xfs(512 << 20);
        let args = pool_args(&ext, Some(&xfs));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let d =
            Driver::start_with_env(&args, &[("KUBECONFIG", &kubeconfig.to_string_lossy())]).await;
        Node {
            d,
            ext,
            xfs,
            api,
            _kube_dir: kube_dir,
        }
    }

    fn dir(&self, pool: &str) -> PathBuf {
        match pool {
            "ext" => self.ext.mount_point.join("pool"),
            "xfs" => self.xfs.mount_point.join("pool"),
            _ => self.d.pool.clone(),
        }
    }

    /// `loopvol status -o json` over the pools, by name: what an operator reads on the node.
    fn status(&self) -> HashMap<String, Value> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
            .args(["status", "-o", "json", "--pool-dir"])
            .arg(&self.d.pool)
            .arg("--pool")
            .arg(format!("ext={}", self.dir("ext").display()))
            .arg("--pool")
            .arg(format!("xfs={}", self.dir("xfs").display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        all.into_iter()
            .map(|s| (s["name"].as_str().unwrap().to_string(), s))
            .collect()
    }

    /// The status of `<node>.<pool>` once `ok` holds for it, waiting at most `within`.
    async fn wait_status(
        &self,
        pool: &str,
        within: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let name = format!("{NODE}.{pool}");
        let deadline = Instant::now() + within;
        loop {
            let obj = self.api.object(&name);
            if let Some(s) = obj.as_ref().map(|o| &o["status"]) {
                if !s.is_null() && ok(s) {
                    return s.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "LoopPool {name} did not get there in {within:?}: {obj:#?}\nrequests: {}\nlog:\n{}",
                self.api.requests().len(),
                self.d.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn pool_args(ext: &SmallFs, xfs: Option<&SmallFs>) -> Vec<String> {
    let mut a = vec![
        "--publish-pools".to_string(),
        "kubernetes".to_string(),
        "--pool".to_string(),
        format!("ext={}", ext.mount_point.join("pool").display()),
    ];
    if let Some(xfs) = xfs {
        a.push("--pool".into());
        a.push(format!("xfs={}", xfs.mount_point.join("pool").display()));
    }
    a
}

fn req(
    name: &str,
    bytes: i64,
    params: &[(&str, &str)],
    cap: VolumeCapability,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..create_req(name, bytes, cap)
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Created at start with the figures `loopvol status` shows; updated within seconds of a
/// change; objects of pools this node no longer serves marked Missing (at start, and after a
/// restart without one of the pools) and kept, with their last figures; other nodes' objects
/// left alone.
#[tokio::test(flavor = "multi_thread")]
async fn looppools_are_created_updated_and_marked_missing() {
    if !root_or_skip("LoopPool objects") {
        return;
    }
    let stale = |node: &str, pool: &str| {
        json!({"apiVersion": "loopvol.csi.dev/v1alpha1", "kind": "LoopPool",
            "metadata": {"name": format!("{node}.{pool}"), "creationTimestamp": "2026-12-01T00:00:00Z",
                "labels": {"loopvol.csi.dev/node": node, "loopvol.csi.dev/pool": pool}},
            "status": {"node": node, "pool": pool, "volumes": 3, "health": "Healthy", "conditions": []}})
    };
    let mut t = Node::start(|api| {
        // A pool this node served before (its disk was removed), and another node's pool.
        api.insert(stale(NODE, "old"));
        api.insert(stale("other-node", "old"));
    })
    .await;

    let healthy = |s: &Value| s["health"] == "Healthy";
    let def = t
        .wait_status("default", Duration::from_secs(10), healthy)
        .await;
    let ext = t.wait_status("ext", Duration::from_secs(10), healthy).await;
    let xfs = t.wait_status("xfs", Duration::from_secs(10), healthy).await;
    let on_node = t.status();
    for (pool, s, fs, reflink) in [("ext", &ext, "ext4", false), ("xfs", &xfs, "xfs", true)] {
        let obj = t.api.object(&format!("{NODE}.{pool}")).unwrap();
        assert_eq!(obj["metadata"]["labels"]["loopvol.csi.dev/node"], NODE);
        assert_eq!(obj["metadata"]["labels"]["loopvol.csi.dev/pool"], pool);
        assert_eq!(
            (s["node"].as_str(), s["pool"].as_str()),
            (Some(NODE), Some(pool))
        );
        assert_eq!(s["filesystem"], fs, "{pool}");
        assert_eq!(s["reflink"], reflink, "{pool}");
        assert_eq!(s["path"], t.dir(pool).display().to_string());
        let st = &on_node[pool];
        assert_eq!(s["filesystem"], st["filesystem"]);
        assert_eq!(
            u(&s["capacityBytes"]),
            u(&st["capacity"]["total_bytes"]),
            "{pool}"
        );
        assert_eq!(u(&s["volumes"]), 0);
        assert_eq!(u(&s["allocatedBytes"]), u(&st["allocated_bytes"]), "{pool}");
        let missing = s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Missing")
            .unwrap();
        assert_eq!(missing["status"], "False");
        assert!(t
            .api
            .managers(&format!("{NODE}.{pool}"))
            .iter()
            .all(|m| m == "loopvol-node"));
    }
    assert_eq!(def["filesystem"], on_node["default"]["filesystem"]);
    // Every write was a server-side apply.
    let writes: Vec<_> = t
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .collect();
    assert!(!writes.is_empty());
    for w in &writes {
        assert_eq!(w.method, "PATCH");
        assert!(w.path.starts_with(fake_kube::PREFIX), "{w:?}");
        assert_eq!(w.content_type, "application/apply-patch+yaml", "{w:?}");
        assert!(w.query.contains("fieldManager=loopvol-node"), "{w:?}");
    }
    // The start-up sweep listed only this node's objects, and marked the pool it lost.
    let lists: Vec<_> = t
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    assert!(!lists.is_empty());
    for r in &lists {
        let selector = fake_kube::query_param(&r.query, "labelSelector");
        assert_eq!(
            selector.as_deref(),
            Some("loopvol.csi.dev/node=test-node"),
            "{r:?}"
        );
    }
    let old = t
        .wait_status("old", Duration::from_secs(5), |s| s["health"] == "Missing")
        .await;
    assert_eq!(u(&old["volumes"]), 3, "the last figures are kept");
    let other = t.api.object("other-node.old").unwrap();
    assert_eq!(
        other["status"]["health"], "Healthy",
        "another node's object is not ours"
    );

    // A change: a thick volume in the xfs pool shows within a few seconds (debounce 1 s).
    let mut c = t.d.controller().await;
    let started = Instant::now();
    let vol = create_volume_id(
        &mut c,
        req(
            "in-xfs",
            32 * MIB,
            &[("pool", "xfs"), ("allocation", "thick")],
            block_cap(volume_capability::access_mode::Mode::SingleNodeWriter),
        ),
    )
    .await;
    // And a snapshot of it: physical figures count snapshot images too, everywhere.
    let snap = create_snapshot_id(&mut c, &vol, "in-xfs-snap").await;
    let xfs = t
        .wait_status("xfs", Duration::from_secs(5), |s| {
            u(&s["volumes"]) == 1 && u(&s["snapshots"]) == 1
        })
        .await;
    eprintln!(
        "LoopPool updated {:?} after CreateVolume",
        started.elapsed()
    );
    let on_node = t.status();
    assert_eq!(
        u(&xfs["allocatedBytes"]),
        u(&on_node["xfs"]["allocated_bytes"]) + u(&on_node["xfs"]["snapshot_allocated_bytes"])
    );
    assert!(u(&xfs["allocatedBytes"]) >= 32 << 20);
    assert_eq!(u(&xfs["provisionedBytes"]), 32 << 20);
    assert_eq!(
        u(&t.api.object(&format!("{NODE}.ext")).unwrap()["status"]["volumes"]),
        0
    );

    // An encrypted volume is counted as such (the operator's view of issue 26).
    let sealed = create_volume_id(
        &mut c,
        req(
            "sealed-in-ext",
            32 * MIB,
            &[("pool", "ext"), ("encryption", "fscrypt")],
            mount_cap(
                "ext4",
                volume_capability::access_mode::Mode::SingleNodeWriter,
            ),
        ),
    )
    .await;
    let ext = t
        .wait_status("ext", Duration::from_secs(5), |s| u(&s["volumes"]) == 1)
        .await;
    assert_eq!(u(&ext["encryptedVolumes"]), 1);
    assert_eq!(u(&xfs["encryptedVolumes"]), 0);

    // Restart without the xfs pool: its object is marked Missing, not deleted, and keeps the
    // figures it had; the pools still served stay Healthy.
    t.d.stop();
    let args = pool_args(&t.ext, None);
    t.d.set_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    t.d.spawn().await;
    let gone = t
        .wait_status("xfs", Duration::from_secs(10), |s| s["health"] == "Missing")
        .await;
    assert_eq!(u(&gone["volumes"]), 1);
    let cond = gone["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Missing")
        .unwrap();
    assert_eq!(cond["status"], "True");
    assert_eq!(
        t.api.object(&format!("{NODE}.ext")).unwrap()["status"]["health"],
        "Healthy"
    );
    assert!(t.api.names().contains(&format!("{NODE}.xfs")));
    // Served again: no longer missing.
    t.d.stop();
    let args = pool_args(&t.ext, Some(&t.xfs));
    t.d.set_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    t.d.spawn().await;
    t.wait_status("xfs", Duration::from_secs(10), healthy).await;
    let mut c = t.d.controller().await;
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap,
        ..Default::default()
    })
    .await
    .unwrap();
    for volume_id in [vol, sealed] {
        c.delete_volume(DeleteVolumeRequest {
            volume_id,
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// With the API server failing (500, connections dropped, 409) CSI answers as fast as ever;
/// the publisher backs off (a handful of requests, not a loop); and when the API server is
/// back the objects catch up.
#[tokio::test(flavor = "multi_thread")]
async fn an_api_outage_does_not_block_csi_and_the_objects_catch_up() {
    if !root_or_skip("LoopPool objects") {
        return;
    }
    let t = Node::start(|_| {}).await;
    t.wait_status("ext", Duration::from_secs(10), |s| s["health"] == "Healthy")
        .await;
    let mut c = t.d.controller().await;
    let mut n = t.d.node().await;

    let outage = Instant::now();
    let before = t.api.requests().len();
    t.api.set_mode(Mode::Fail(500));
    let started = Instant::now();
    let vol = create_volume_id(
        &mut c,
        req(
            "during-outage",
            32 * MIB,
            &[("pool", "ext")],
            rw_mount("ext4"),
        ),
    )
    .await;
    let create = started.elapsed();
    let staging = t.d.dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let started = Instant::now();
    n.node_stage_volume(stage_req(&vol, &staging, rw_mount("ext4")))
        .await
        .unwrap();
    let stage = started.elapsed();
    eprintln!("during the outage: CreateVolume {create:?}, NodeStageVolume {stage:?}");
    assert!(
        create < Duration::from_secs(2),
        "CreateVolume took {create:?}"
    );
    assert!(
        stage < Duration::from_secs(5),
        "NodeStageVolume took {stage:?}"
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    t.api.set_mode(Mode::Down);
    let started = Instant::now();
    let vol2 = create_volume_id(
        &mut c,
        req("while-down", 16 * MIB, &[("pool", "ext")], rw_mount("ext4")),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "CreateVolume took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    t.api.set_mode(Mode::Fail(409));
    tokio::time::sleep(Duration::from_secs(4)).await;

    // 12 s of outage: backoff 1, 2, 4, 8 s gives about four attempts of one request each;
    // a loop on the 250 ms tick would be about fifty.
    let seen: Vec<_> = t.api.requests()[before..].to_vec();
    let gaps: Vec<f64> = seen
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64())
        .collect();
    eprintln!(
        "{} requests in {:?} of outage, gaps {gaps:.1?}",
        seen.len(),
        outage.elapsed()
    );
    assert!(
        (2..=7).contains(&seen.len()),
        "{} requests during the outage: {gaps:?}",
        seen.len()
    );
    assert!(
        gaps.windows(2).all(|g| g[1] >= g[0] * 1.5),
        "the waits between attempts grow: {gaps:?}"
    );

    // Back: caught up at the next attempt (at most the 8 s or 16 s wait then due).
    t.api.set_mode(Mode::Up);
    let back = Instant::now();
    let ext = t
        .wait_status("ext", Duration::from_secs(30), |s| u(&s["volumes"]) == 2)
        .await;
    eprintln!(
        "caught up {:?} after the API server returned",
        back.elapsed()
    );
    assert_eq!(u(&ext["provisionedBytes"]), 48 << 20);

    n.node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
    for v in [vol, vol2] {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: v,
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// Without a client configuration the flag is a start-up error, not a silent no-op.
#[tokio::test(flavor = "multi_thread")]
async fn publishing_without_a_kubernetes_configuration_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args([
            "serve",
            "--mode",
            "controller",
            "--node-id",
            "n1",
            "--publish-pools",
            "kubernetes",
        ])
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.path().join("csi.sock").display()))
        .arg("--pool-dir")
        .arg(dir.path().join("pool"))
        .env("KUBECONFIG", dir.path().join("none"))
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Kubernetes client configuration"), "{err}");
}
