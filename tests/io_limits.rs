//! Per-volume IO limits enforced by the kernel: real cgroups (v1 blkio, as on this machine
//! kind), real loop devices, fio as the load. The driver is started with `--io-cgroup` naming a
//! cgroup the test creates, and fio runs inside it, as a pod's processes run in the pod's.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use loopvol::csi::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use tonic::Code;

const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// A cgroup of this test's own, removed again when dropped (after its processes exited).
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(tag: &str) -> Option<TestCgroup> {
        if !Path::new(BLKIO)
            .join("blkio.throttle.write_iops_device")
            .exists()
        {
            return None;
        }
        let dir = Path::new(BLKIO).join(format!(
            "loopvol-test-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).unwrap();
        Some(TestCgroup(dir))
    }

    /// The rule lines of one throttle file, e.g. `["7:3 300"]`.
    fn rules(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.0.join(format!("blkio.throttle.{file}")))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("could not remove test cgroup {}", self.0.display());
    }
}

/// The cgroup v1 blkio hierarchy, or a skip (a failure where root tests are required).
fn blkio_or_skip(test: &str, tag: &str) -> Option<TestCgroup> {
    let cg = TestCgroup::new(tag);
    if cg.is_none() {
        let required = std::env::var("LOOPVOL_REQUIRE_ROOT").is_ok_and(|v| v == "1");
        assert!(!required, "{test}: no cgroup v1 blkio hierarchy at {BLKIO}");
        eprintln!("SKIP {test}: no cgroup v1 blkio hierarchy at {BLKIO}");
    }
    cg
}

#[derive(Debug, Clone, Copy)]
enum Load {
    RandWrite4k,
    RandRead64k,
}

/// Run fio inside `cg` for `secs` against `file`; (IOPS, bytes per second) of the job.
fn fio_in(cg: &TestCgroup, file: &Path, load: Load, secs: u32) -> (f64, f64) {
    let (rw, bs) = match load {
        Load::RandWrite4k => ("randwrite", "4k"),
        Load::RandRead64k => ("randread", "64k"),
    };
    // The shell only moves itself into the cgroup; every path is an argument, never code.
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec fio "$@""#)
        .arg(&cg.0)
        .args([
            "--name=load",
            "--ioengine=libaio",
            "--direct=1",
            "--iodepth=16",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--runtime={secs}"))
        .arg("--size=32M")
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    let side = match load {
        Load::RandWrite4k => "write",
        Load::RandRead64k => "read",
    };
    let job = &v["jobs"][0][side];
    (
        job["iops"].as_f64().unwrap(),
        job["bw_bytes"].as_f64().unwrap(),
    )
}

fn within(measured: f64, limit: f64, what: &str) {
    eprintln!(
        "{what}: measured {measured:.0} ({:.3}× the limit)",
        measured / limit
    );
    assert!(
        (measured - limit).abs() <= 0.15 * limit,
        "{what}: measured {measured:.0}, limit {limit} (must be within ±15 %)"
    );
}

fn modify(id: &str, pairs: &[(&str, &str)]) -> ControllerModifyVolumeRequest {
    ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// The volume record's `io_limits` as stored on disk.
fn recorded_limits(d: &Driver, id: &str) -> serde_json::Value {
    let hex = id.split('@').next().unwrap().trim_start_matches("vol-");
    let bytes = std::fs::read(d.pool.join("volumes").join(format!("{hex}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v.get("io_limits").cloned().unwrap_or(serde_json::json!({}))
}

/// `MAJ:MIN` of the loop device whose sysfs backing file is `image`.
fn loop_of(image: &Path) -> String {
    let want = std::fs::canonicalize(image).unwrap();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let dir = e.path();
        let Ok(b) = std::fs::read_to_string(dir.join("loop/backing_file")) else {
            continue;
        };
        if Path::new(b.trim_end()) == want {
            return std::fs::read_to_string(dir.join("dev"))
                .unwrap()
                .trim()
                .to_string();
        }
    }
    panic!("{} is not attached", image.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_are_enforced_changed_live_removed_and_survive_restarts() {
    if !root_or_skip("io_limits") {
        return;
    }
    let Some(cg) = blkio_or_skip("io_limits", "live") else {
        return;
    };
    let cg_arg = cg.0.to_string_lossy().into_owned();
    let mut d = Driver::start_with(&["--io-cgroup", &cg_arg]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let cap = rw_mount("ext4");
    let mut req = create_req("limited", 256 * MIB, cap.clone());
    req.parameters = HashMap::from([("writeIOPS".into(), "300".into())]);
    let id = create_volume_id(&mut c, req).await;
    assert_eq!(
        recorded_limits(&d, &id),
        serde_json::json!({"writeIOPS": 300})
    );
    // Operators see them in `volume inspect` and `status`.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_loopvol"))
            .args(args)
            .arg("--pool-dir")
            .arg(&d.pool)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let inspect = cli(&["volume", "inspect", &id]);
    assert!(inspect.contains("io limits    writeIOPS=300"), "{inspect}");
    let status: serde_json::Value =
        serde_json::from_str(&cli(&["status", "--output", "json"])).unwrap();
    assert_eq!(
        status["io_limits"],
        serde_json::json!([{"volume_id": id, "limits": {"writeIOPS": 300}}])
    );

    let staging = d.path("staging");
    let target = d.path("pods/p1/mount");
    let stage = |staging: &Path| stage_req(&id, staging, cap.clone());
    let publish = |staging: &Path, target: &Path| publish_req(&id, staging, target, cap.clone());
    n.node_stage_volume(stage(&staging)).await.unwrap();
    n.node_publish_volume(publish(&staging, &target))
        .await
        .unwrap();
    let dev = loop_of(&d.image_of(&id));
    assert_eq!(cg.rules("write_iops_device"), vec![format!("{dev} 300")]);

    // The data file is laid out from outside the cgroup, unthrottled.
    let file = target.join("fio.dat");
    std::fs::write(&file, pattern(32 * MIB as usize, 7)).unwrap();
    std::fs::File::open(&file).unwrap().sync_all().unwrap();

    let (iops, _) = fio_in(&cg, &file, Load::RandWrite4k, 3);
    within(iops, 300.0, "write IOPS at writeIOPS=300");

    // A live change: the same published volume, no remount, a new process in the same cgroup.
    let started = std::time::Instant::now();
    c.controller_modify_volume(modify(&id, &[("writeIOPS", "600"), ("readBPS", "8Mi")]))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(cg.rules("write_iops_device"), vec![format!("{dev} 600")]);
    assert_eq!(cg.rules("read_bps_device"), vec![format!("{dev} 8388608")]);
    eprintln!("ModifyVolume to effect: {took:?}");
    let (iops, _) = fio_in(&cg, &file, Load::RandWrite4k, 3);
    within(iops, 600.0, "write IOPS at writeIOPS=600");
    let (_, bw) = fio_in(&cg, &file, Load::RandRead64k, 3);
    within(bw, (8 << 20) as f64, "read bandwidth at readBPS=8Mi");

    // Removing a limit restores full speed.
    c.controller_modify_volume(modify(&id, &[("writeIOPS", "unlimited")]))
        .await
        .unwrap();
    assert!(cg.rules("write_iops_device").is_empty());
    let (iops, _) = fio_in(&cg, &file, Load::RandWrite4k, 2);
    eprintln!("write IOPS with the limit removed: {iops:.0}");
    assert!(
        iops > 5.0 * 600.0,
        "unlimited writes ran at only {iops:.0} IOPS"
    );
    assert_eq!(
        recorded_limits(&d, &id),
        serde_json::json!({"readBPS": 8388608})
    );

    // Bad changes are refused whole and change nothing.
    for bad in [
        &[("readBPS", "1Mi"), ("bogus", "1")][..],
        &[("writeIOPS", "-3")],
        &[("readBPS", "lots")],
    ] {
        let e = c.controller_modify_volume(modify(&id, bad)).await;
        assert_eq!(code_of(e), Code::InvalidArgument, "{bad:?}");
    }
    assert_eq!(
        recorded_limits(&d, &id),
        serde_json::json!({"readBPS": 8388608})
    );
    assert_eq!(cg.rules("read_bps_device"), vec![format!("{dev} 8388608")]);

    // A restart keeps records and rules.
    d.stop();
    d.spawn().await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    assert_eq!(cg.rules("read_bps_device"), vec![format!("{dev} 8388608")]);
    c.controller_modify_volume(modify(&id, &[("writeIOPS", "400")]))
        .await
        .unwrap();
    assert_eq!(cg.rules("write_iops_device"), vec![format!("{dev} 400")]);

    // Unpublish removes the rules; a re-stage and publish puts them on the device the volume
    // has now.
    n.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    assert!(cg.rules("write_iops_device").is_empty());
    assert!(cg.rules("read_bps_device").is_empty());
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    let staging2 = d.path("staging2");
    n.node_stage_volume(stage(&staging2)).await.unwrap();
    n.node_publish_volume(publish(&staging2, &target))
        .await
        .unwrap();
    let dev2 = loop_of(&d.image_of(&id));
    assert_eq!(cg.rules("write_iops_device"), vec![format!("{dev2} 400")]);
    assert_eq!(cg.rules("read_bps_device"), vec![format!("{dev2} 8388608")]);
    n.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging2))
        .await
        .unwrap();
    assert!(cg.rules("write_iops_device").is_empty());
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_limited_volume_is_not_published_where_limits_cannot_be_enforced() {
    if !root_or_skip("io_limits_unenforceable") {
        return;
    }
    // No --io-cgroup and no pod UID: nowhere to put the rules.
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let cap = rw_mount("ext4");
    let mut req = create_req("unenforceable", 64 * MIB, cap.clone());
    req.mutable_parameters = HashMap::from([("readIOPS".into(), "100".into())]);
    let id = create_volume_id(&mut c, req).await;
    let staging = d.path("staging");
    let target = d.path("pods/p/mount");
    n.node_stage_volume(stage_req(&id, &staging, cap.clone()))
        .await
        .unwrap();
    let mut publish = publish_req(&id, &staging, &target, cap.clone());
    let e = n.node_publish_volume(publish.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("readIOPS=100"), "{}", e.message());
    assert!(loopvol::fs::mount::mount_at(&target).unwrap().is_none());
    // A pod UID whose cgroup does not exist here is refused the same way, naming the pod.
    publish.volume_context = HashMap::from([(
        "csi.storage.k8s.io/pod.uid".into(),
        "0f3c2a1e-7b9d-4c1a-9e8f-123456789abc".into(),
    )]);
    let e = n.node_publish_volume(publish.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("0f3c2a1e-7b9d-4c1a-9e8f-123456789abc"));
    // Removing the limit makes the same publish work.
    c.controller_modify_volume(modify(&id, &[("readIOPS", "0")]))
        .await
        .unwrap();
    publish.volume_context.clear();
    n.node_publish_volume(publish).await.unwrap();
    n.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    d.assert_clean();
}

/// Mutable parameters as an attacker or a typo would write them.
fn mutable_parameters() -> impl Strategy<Value = Vec<(String, String)>> {
    let key = prop_oneof![
        Just("readIOPS".to_string()),
        Just("writeIOPS".to_string()),
        Just("readBPS".to_string()),
        Just("writeBPS".to_string()),
        "[a-zA-Z]{1,12}",
        Just("writeiops".to_string()),
    ];
    let value = prop_oneof![
        Just("0".to_string()),
        Just("unlimited".to_string()),
        "[0-9]{1,6}",
        "-[0-9]{1,4}",
        "[0-9]{1,3}(\\.[0-9])?(Ki|Mi|Gi|k|M|G|m|)",
        ".{0,8}",
    ];
    proptest::collection::vec((key, value), 1..4)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_mutable_parameter_is_invalid_argument_and_changes_nothing() {
    if !root_or_skip("io_limits_proptest") {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let id = create_volume_id(&mut c, create_req("prop", 16 * MIB, rw_mount("ext4"))).await;
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 128,
        ..ProptestConfig::default()
    });
    let cases: Vec<Vec<(String, String)>> = (0..128)
        .map(|_| {
            mutable_parameters()
                .new_tree(&mut runner)
                .unwrap()
                .current()
        })
        .collect();
    for params in cases {
        // What goes on the wire is a map: a repeated key keeps its last value.
        let map: HashMap<String, String> = params.into_iter().collect();
        let pairs: Vec<(&str, &str)> = map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let expected = provisioner::IoLimitsChange::parse_mutable(pairs.iter().copied());
        let before = recorded_limits(&d, &id);
        let r = c.controller_modify_volume(modify(&id, &pairs)).await;
        match expected {
            Ok(change) => {
                r.unwrap_or_else(|e| panic!("{pairs:?} refused: {e:?}"));
                let want = serde_json::from_value::<provisioner::IoLimits>(before)
                    .unwrap()
                    .with(&change);
                assert_eq!(
                    recorded_limits(&d, &id),
                    serde_json::to_value(want).unwrap()
                );
            }
            Err(_) => {
                assert_eq!(code_of(r), Code::InvalidArgument, "{pairs:?}");
                assert_eq!(
                    recorded_limits(&d, &id),
                    before,
                    "{pairs:?} changed the record"
                );
            }
        }
    }
    d.assert_clean();
}
