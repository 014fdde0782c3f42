//! End-to-end tests of the operations surface: Prometheus metrics and health endpoints, the
//! JSON log (no secrets in it), `loopvol doctor`, `loopvol status`, `volume inspect` and the
//! `loopvol csi` client, all against the real binary on a private pool.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use loopvol::csi::*;
use serde_json::Value;
use tonic::Code;

/// A port that was free a moment ago: bind port 0, read the port, let it go.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.1 GET over TCP; returns (status, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

/// The value of the sample named exactly `series` (name plus labels), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn loopvol(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(args)
        .output()
        .expect("run loopvol")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "loopvol failed ({}): {}{}",
        o.status,
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health_follow_a_workload() {
    if !root_or_skip("metrics") {
        return;
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Driver::start_with(&["--metrics-address", &addr]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;

    let id = create_volume_id(&mut c, create_req("metered", 64 * MIB, rw_mount("ext4"))).await;
    let staging = d.path("staging");
    let target = d.path("target");
    n.node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
        .await
        .unwrap();
    n.node_publish_volume(NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(rw_mount("ext4")),
        ..Default::default()
    })
    .await
    .unwrap();

    let (status, busy) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&busy, r#"loopvol_pool_volumes{pool="default"}"#),
        Some(1.0),
        "{busy}"
    );
    assert_eq!(
        sample(&busy, r#"loopvol_node_staged_volumes{pool="default"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&busy, r#"loopvol_loop_devices_attached{pool="default"}"#),
        Some(1.0)
    );
    assert!(sample(&busy, r#"loopvol_pool_reserved_bytes{pool="default"}"#).unwrap() > 0.0);

    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: id.clone(),
        secrets: HashMap::new(),
    })
    .await
    .unwrap();
    // The failing call: the volume is gone.
    let err = n
        .node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let (status, text) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    let count = |series: &str| sample(&text, series).unwrap_or(0.0);
    for method in [
        "CreateVolume",
        "NodeStageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeUnstageVolume",
        "DeleteVolume",
    ] {
        let series = format!(r#"loopvol_rpc_requests_total{{method="{method}",code="OK"}}"#);
        assert!(count(&series) >= 1.0, "{series} missing:\n{text}");
    }
    assert_eq!(
        count(r#"loopvol_rpc_requests_total{method="NodeStageVolume",code="NOT_FOUND"}"#),
        1.0
    );
    assert!(count(r#"loopvol_errors_total{code="NOT_FOUND"}"#) >= 1.0);
    assert!(
        text.lines()
            .any(|l| l.starts_with("loopvol_rpc_duration_seconds_bucket{")
                && l.contains(r#"method="CreateVolume""#)
                && l.contains(r#"le="+Inf""#)),
        "no latency histogram for CreateVolume:\n{text}"
    );
    assert_eq!(
        count(r#"loopvol_stage_duration_seconds_count{fs_type="ext4"}"#),
        1.0
    );
    assert_eq!(
        count(r#"loopvol_mkfs_duration_seconds_count{fs_type="ext4"}"#),
        1.0
    );
    assert!(text
        .lines()
        .any(|l| l.starts_with("loopvol_stage_duration_seconds_bucket{")));
    assert!(count(r#"loopvol_pool_capacity_bytes{pool="default"}"#) > 0.0);
    assert!(count(r#"loopvol_pool_available_bytes{pool="default"}"#) > 0.0);
    assert!(sample(&text, r#"loopvol_pool_reserved_bytes{pool="default"}"#).is_some());
    assert_eq!(
        sample(&text, r#"loopvol_pool_volumes{pool="default"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"loopvol_pool_snapshots{pool="default"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"loopvol_node_staged_volumes{pool="default"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"loopvol_loop_devices_attached{pool="default"}"#),
        Some(0.0)
    );
    assert!(text.ends_with("# EOF\n"));

    assert_eq!(http_get(port, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(port, "/readyz").0, 200);
    assert_eq!(http_get(port, "/nope").0, 404);
    // A pool whose volume directory is gone is not usable: both probes say so.
    let volumes = d.pool.join("volumes");
    let aside = d.pool.join("volumes.aside");
    std::fs::rename(&volumes, &aside).unwrap();
    let (status, body) = http_get(port, "/readyz");
    std::fs::rename(&aside, &volumes).unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("not usable"), "{body}");
    assert_eq!(http_get(port, "/healthz").0, 200);
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_the_json_log() {
    if !root_or_skip("secrets_log") {
        return;
    }
    const MARKER: &str = "s3cr3t-marker-7f1c2e";
    let d = Driver::start_with(&["--log-format", "json"]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let secrets = HashMap::from([("password".to_string(), MARKER.to_string())]);

    let mut req = create_req("secretive", 16 * MIB, rw_mount("ext4"));
    req.secrets = secrets.clone();
    let id = create_volume_id(&mut c, req).await;
    // A refused request logs its error: the secret must not ride along.
    let mut bad = create_req("secretive-bad", 16 * MIB, rw_mount("ext4"));
    bad.secrets = secrets.clone();
    bad.parameters = HashMap::from([("nope".to_string(), MARKER.to_string())]);
    assert_eq!(code_of(c.create_volume(bad).await), Code::InvalidArgument);
    let mut stage = stage_req(&id, &d.path("staging"), rw_mount("ext4"));
    stage.secrets = secrets.clone();
    n.node_stage_volume(stage).await.unwrap();
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: d.path("staging").to_string_lossy().into(),
    })
    .await
    .unwrap();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: id.clone(),
        secrets,
    })
    .await
    .unwrap();

    let log = d.log();
    assert!(!log.contains(MARKER), "a secret reached the log:\n{log}");
    // Every line is JSON, and each RPC's span carries the volume ID.
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for rpc in ["NodeStageVolume", "NodeUnstageVolume", "DeleteVolume"] {
        assert!(
            lines
                .iter()
                .any(|l| l["span"]["name"] == rpc && l["span"]["volume_id"] == id),
            "no {rpc} span with volume_id in:\n{log}"
        );
    }
    d.assert_clean();
}

/// A directory holding symlinks to every tool doctor looks for, except `missing`.
fn path_without(dir: &Path, missing: &str) -> String {
    path_without_all(dir, &[missing])
}

/// The same without any of `missing`.
fn path_without_all(dir: &Path, missing: &[&str]) -> String {
    let tools = [
        "mkfs.ext4",
        "e2fsck",
        "resize2fs",
        "mkfs.xfs",
        "xfs_growfs",
        "mkfs.btrfs",
        "btrfs",
        "blkid",
    ];
    std::fs::create_dir_all(dir).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    for t in tools.iter().filter(|t| !missing.contains(t)) {
        let real = std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join(t))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{t} is not installed"));
        std::os::unix::fs::symlink(real, dir.join(t)).unwrap();
    }
    dir.to_string_lossy().into_owned()
}

/// The status of a call that must fail because `program` is missing: FAILED_PRECONDITION, and
/// a message that names the program and the package to install.
fn assert_missing<T: std::fmt::Debug>(r: Result<T, tonic::Status>, program: &str, package: &str) {
    let e = r.expect_err("must fail without the tool");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(program) && e.message().contains(package),
        "message must name {program} and {package}: {}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_tools_are_failed_precondition_naming_the_package() {
    if !root_or_skip("missing_tools") {
        return;
    }
    let bin = tempfile::Builder::new()
        .prefix("loopvol-test-bin-")
        .tempdir()
        .unwrap();
    let path = path_without_all(bin.path(), &["blkid", "xfs_growfs", "mkfs.btrfs", "btrfs"]);
    let d = Driver::start_with_env(&[], &[("PATH", &path)]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;

    // A blank btrfs volume could never be formatted here: refused before anything is made.
    let r = c
        .create_volume(create_req("no-btrfs", 256 * MIB, rw_mount("btrfs")))
        .await;
    assert_missing(r, "mkfs.btrfs", "btrfs-progs");
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    let files: Vec<_> = std::fs::read_dir(d.pool.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(files.is_empty(), "CreateVolume left {files:?}");

    // ext4: a never-written volume is formatted without asking blkid; a second stage must
    // probe it, and that needs blkid.
    let id = create_volume_id(&mut c, create_req("no-blkid", 64 * MIB, rw_mount("ext4"))).await;
    let staging = d.path("staging-ext4");
    n.node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
        .await
        .unwrap();
    std::fs::write(staging.join("kept"), b"data").unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert_missing(
        n.node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
            .await,
        "blkid",
        "util-linux",
    );
    assert!(
        d.leftovers().0.is_empty() && d.leftovers().1.is_empty(),
        "a failed stage leaves nothing attached or mounted: {:?}",
        d.leftovers()
    );

    // xfs: staged fine, but growing it needs xfs_growfs.
    let cap = rw_mount("xfs");
    let id = create_volume_id(&mut c, create_req("no-growfs", 300 * MIB, cap.clone())).await;
    let staging = d.path("staging-xfs");
    n.node_stage_volume(stage_req(&id, &staging, cap.clone()))
        .await
        .unwrap();
    c.controller_expand_volume(ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 400 * MIB,
            limit_bytes: 0,
        }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = n
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: staging.to_string_lossy().into(),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await;
    assert_missing(r, "xfs_growfs", "xfsprogs");
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    d.assert_clean();
}

fn doctor(d: &Driver, pool: &Path, path_env: Option<&str>) -> (bool, String) {
    doctor_with(d, pool, path_env, &[])
}

fn doctor_with(d: &Driver, pool: &Path, path_env: Option<&str>, extra: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loopvol"));
    cmd.arg("doctor")
        .arg("--pool-dir")
        .arg(pool)
        .arg("--kubelet-dir")
        .arg(d.path("no-kubelet-here"))
        .args(extra)
        .env_remove("LOOPVOL_NODE_ID");
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    let out = cmd.output().unwrap();
    let text = stdout(&out);
    assert!(space_runs(&text).is_empty(), "{text}");
    (out.status.success(), text)
}

/// `loopvol doctor [extra] --pool-dir pool`, started through `wrapper` (a program and its
/// arguments, such as `setpriv` dropping a capability; none when empty): (passed, output).
fn doctor_via(wrapper: &[&str], pool: &Path, extra: &[&str]) -> (bool, String) {
    let bin = env!("CARGO_BIN_EXE_loopvol");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("doctor")
        .args(extra)
        .arg("--pool-dir")
        .arg(pool)
        .arg("--kubelet-dir")
        .arg(pool.join("no-kubelet-here"));
    let out = cmd.output().unwrap();
    let text = stdout(&out);
    assert!(space_runs(&text).is_empty(), "{text}");
    (out.status.success(), text)
}

/// Where loopvol works, but less well than an operator would expect, doctor warns and still
/// passes: a pool filesystem without reflink (snapshots and clones freeze their source for the
/// whole copy), and a process without CAP_SYS_RESOURCE (a mounted ext4 grows only when it is
/// next staged). Each warning follows the real condition: an xfs reflink pool has none, and
/// the capability warning appears exactly when the capability is missing.
#[test]
fn doctor_warns_about_copying_snapshots_and_offline_ext4_growth() {
    if !root_or_skip("doctor_warnings") {
        return;
    }
    let ext4 = SmallFs::new(64 * MIB as u64);
    let (ok, out) = doctor_via(&[], &ext4.mount_point.join("pool"), &[]);
    assert!(ok, "a warning is not a failure:\n{out}");
    assert!(!out.contains('✘'), "{out}");
    assert!(
        out.contains("⚠ reflink (FICLONE): not supported by ext4"),
        "{out}"
    );
    assert!(out.contains("frozen for the whole copy"), "{out}");
    assert!(out.contains("mkfs.xfs -m reflink=1"), "{out}");
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with("all ") && last.contains("with warning"),
        "{out}"
    );

    let xfs = SmallFs::of("xfs", 300 * MIB as u64);
    let (ok, out) = doctor_via(&[], &xfs.mount_point.join("pool"), &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("✔ reflink (FICLONE): xfs shares extents"),
        "{out}"
    );
    assert!(!out.contains("⚠ reflink"), "{out}");

    // Without CAP_SYS_RESOURCE: dropped from the bounding set before exec, so root's doctor
    // does not get it back.
    let drop_cap = ["setpriv", "--bounding-set", "-sys_resource", "--"];
    let (ok, out) = doctor_via(&drop_cap, &xfs.mount_point.join("pool"), &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("⚠ online ext4 growth: this process lacks CAP_SYS_RESOURCE"),
        "{out}"
    );
    assert!(out.contains("next staged"), "{out}");
    assert!(
        out.lines().last().unwrap().contains("(1 with a warning)"),
        "{out}"
    );
    // With it, if this machine grants it at all (some sandboxes drop it even for root).
    let held = loopvol::shared::kernel::has_capability(loopvol::shared::kernel::CAP_SYS_RESOURCE);
    let (_, out) = doctor_via(&[], &xfs.mount_point.join("pool"), &[]);
    if held == Some(true) {
        assert!(
            out.contains("✔ online ext4 growth: CAP_SYS_RESOURCE is held"),
            "{out}"
        );
    } else {
        eprintln!("this process lacks CAP_SYS_RESOURCE: only the warning could be checked");
        assert!(out.contains("⚠ online ext4 growth"), "{out}");
    }
    // Only ext4 grows this way: no such check when the node uses none.
    let (_, out) = doctor_via(
        &drop_cap,
        &xfs.mount_point.join("pool"),
        &["--fs-type", "xfs,btrfs"],
    );
    assert!(!out.contains("online ext4 growth"), "{out}");
    assert!(out.lines().last().unwrap().starts_with("all "), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_checks_a_served_pool_and_names_each_fix() {
    if !root_or_skip("doctor") {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let id = create_volume_id(&mut c, create_req("doc", 16 * MIB, rw_mount("ext4"))).await;
    n.node_stage_volume(stage_req(&id, &d.path("staging"), rw_mount("ext4")))
        .await
        .unwrap();

    // Healthy, next to the running driver that holds the pool's locks.
    let (ok, out) = doctor(&d, &d.pool, None);
    assert!(ok, "doctor failed on a healthy node:\n{out}");
    assert!(!out.contains('✘'), "{out}");
    assert!(out.contains("✔ orphaned loop devices: 1 attached"), "{out}");
    assert!(out.lines().last().unwrap().starts_with("all "), "{out}");
    assert!(
        out.contains(&format!(
            "✔ node ID: the pool belongs to node \"{NODE}\": serve it with --node-id {NODE}"
        )),
        "{out}"
    );
    let (ok, out) = doctor_with(&d, &d.pool, None, &["--node-id", NODE]);
    assert!(ok, "{out}");
    // The node ID a serve would be given, when it is not the pool's.
    let (ok, out) = doctor_with(&d, &d.pool, None, &["--node-id", "elsewhere"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "✘ node ID: the pool {} belongs to node \"{NODE}\"",
            d.pool.display()
        )) && out.contains("not to \"elsewhere\"")
            && out.contains("fix: see \"Moving a pool to another node ID\""),
        "{out}"
    );

    // A tool hidden from PATH.
    let path = path_without(&d.path("bin"), "resize2fs");
    let (ok, out) = doctor(&d, &d.pool, Some(&path));
    assert!(!ok, "{out}");
    assert!(
        out.contains("✘ ext4 tools: resize2fs not found in PATH"),
        "{out}"
    );
    assert!(out.contains("install e2fsprogs"), "{out}");
    assert!(out.contains("✔ xfs tools"), "{out}");

    // A loop device over a pool file that no volume owns.
    let stray = d.pool.join("tmp/stray.img");
    std::fs::File::create(&stray)
        .unwrap()
        .set_len(4 * MIB as u64)
        .unwrap();
    let att = loopvol::datapath::loop_device::attach(&stray, false, false).unwrap();
    let (ok, out) = doctor(&d, &d.pool, None);
    loopvol::datapath::loop_device::detach(&att.device).unwrap();
    std::fs::remove_file(&stray).unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("✘ orphaned loop devices"), "{out}");
    assert!(out.contains(&*stray.to_string_lossy()), "{out}");
    assert!(out.contains("losetup -d"), "{out}");

    // A record whose image is gone.
    let lost = c
        .create_volume(create_req("lost", 16 * MIB, rw_mount("ext4")))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    std::fs::remove_file(d.image_of(&lost)).unwrap();
    let (ok, out) = doctor(&d, &d.pool, None);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("✘ orphaned records: volume {lost} has no image")),
        "{out}"
    );
    c.delete_volume(DeleteVolumeRequest {
        volume_id: lost,
        secrets: HashMap::new(),
    })
    .await
    .unwrap();

    // A pool on a filesystem without O_DIRECT. tmpfs gained O_DIRECT in Linux 6.6, ramfs never
    // had it.
    let ram = d.path("ramfs");
    std::fs::create_dir_all(&ram).unwrap();
    nix::mount::mount(
        Some("ramfs"),
        &ram,
        Some("ramfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let (ok, out) = doctor(&d, &ram.join("pool"), None);
    nix::mount::umount(&ram).unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("✘ direct I/O (O_DIRECT)"), "{out}");
    assert!(out.contains("(ramfs) refuses O_DIRECT"), "{out}");

    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: d.path("staging").to_string_lossy().into(),
    })
    .await
    .unwrap();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: id,
        secrets: HashMap::new(),
    })
    .await
    .unwrap();
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_client_drives_the_lifecycle_and_status_reports_it() {
    if !root_or_skip("csi_client") {
        return;
    }
    let d = Driver::start().await;
    let endpoint = format!("unix://{}", d.socket.display());
    let pool = d.pool.to_string_lossy().into_owned();
    let staging = d.path("staging").to_string_lossy().into_owned();
    let target = d.path("target").to_string_lossy().into_owned();
    let csi = |args: &[&str]| {
        let mut all = vec!["csi", "--endpoint", &endpoint];
        all.extend_from_slice(args);
        loopvol(&all)
    };

    let info = json_of(&csi(&["info"]));
    assert_eq!(info["plugin"]["name"], "loopvol.csi.dev");
    assert_eq!(info["node"]["node_id"], NODE);
    assert_eq!(info["ready"], true);
    assert!(info["node_capabilities"]
        .as_array()
        .unwrap()
        .contains(&Value::from("STAGE_UNSTAGE_VOLUME")));

    let created = json_of(&csi(&[
        "create-volume",
        "--name",
        "by-hand",
        "--size",
        "64Mi",
        "--fs-type",
        "ext4",
        "--param",
        "allocation=thin",
    ]));
    let id = created["volume_id"].as_str().unwrap().to_string();
    assert_eq!(created["capacity_bytes"], 64 * MIB);
    assert_eq!(created["volume_context"]["fsType"], "ext4");

    json_of(&csi(&[
        "stage",
        &id,
        "--staging-path",
        &staging,
        "--fs-type",
        "ext4",
    ]));
    json_of(&csi(&[
        "publish",
        &id,
        "--staging-path",
        &staging,
        "--target-path",
        &target,
    ]));
    let mut f = std::fs::File::create(Path::new(&target).join("hello")).unwrap();
    f.write_all(&[7u8; 1 << 20]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let stats = json_of(&csi(&["stats", &id, "--path", &target]));
    let bytes = &stats["usage"][0];
    assert_eq!(bytes["unit"], "BYTES");
    assert!(bytes["used"].as_i64().unwrap() >= 1 << 20, "{stats}");
    assert!(bytes["total"].as_i64().unwrap() > 0);
    let listed = json_of(&csi(&["list-volumes"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // status and inspect read the served pool without its locks.
    let status = json_of(&loopvol(&[
        "status",
        "--pool-dir",
        &pool,
        "--output",
        "json",
    ]));
    assert_eq!(status["volumes"], 1);
    assert_eq!(status["snapshots"], 0);
    assert_eq!(
        status["filesystem"],
        loopvol::ops::admin::fs_name::of(&d.pool).unwrap().as_str()
    );
    let staged = status["staged"].as_array().unwrap();
    assert_eq!(staged.len(), 1, "{status}");
    assert_eq!(staged[0]["volume_id"], id.as_str());
    assert_eq!(staged[0]["state"], "staged");
    assert_eq!(staged[0]["staging_path"], staging.as_str());
    let loops = status["loop_devices"].as_array().unwrap();
    assert_eq!(loops.len(), 1);
    assert_eq!(loops[0]["volume_id"], id.as_str());
    assert!(status["capacity"]["reserved_bytes"].as_u64().unwrap() > 0);
    // The text form: its summary lines are a label, padding, then a sentence without runs of
    // spaces (the tables below them are columns).
    let text = loopvol(&["status", "--pool-dir", &pool]);
    assert!(text.status.success());
    let text = stdout(&text);
    let summary: Vec<&str> = text
        .lines()
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once("  ").map(|(_, rest)| rest.trim_start()))
        .collect();
    assert!(summary.len() >= 4, "{text}");
    assert!(space_runs(&summary.join("\n")).is_empty(), "{text}");
    let inspect = json_of(&loopvol(&[
        "volume",
        "inspect",
        "--pool-dir",
        &pool,
        &id,
        "--output",
        "json",
    ]));
    assert_eq!(inspect["record"]["id"], id.as_str());
    assert_eq!(inspect["image_present"], true);
    assert!(inspect["allocated_bytes"].as_u64().unwrap() >= 1 << 20);
    assert_eq!(inspect["staged"]["state"], "staged");
    let listing = loopvol(&["volume", "list", "--pool-dir", &pool]);
    assert!(listing.status.success());
    assert!(stdout(&listing).contains(&id));

    let snap = json_of(&csi(&[
        "snapshot",
        "--name",
        "by-hand-snap",
        "--source",
        &id,
    ]));
    assert_eq!(snap["source_volume_id"], id.as_str());
    // Controller side only: growing a mounted ext4 needs CAP_SYS_RESOURCE, which some
    // sandboxes drop even for root (tests/node.rs covers node expansion).
    let expanded = json_of(&csi(&["expand", &id, "--size", "96Mi"]));
    assert_eq!(expanded["capacity_bytes"], 96 * MIB);
    assert_eq!(expanded["node_expansion_required"], true);
    json_of(&csi(&[
        "delete-snapshot",
        snap["snapshot_id"].as_str().unwrap(),
    ]));

    json_of(&csi(&["unpublish", &id, "--target-path", &target]));
    json_of(&csi(&["unstage", &id, "--staging-path", &staging]));
    json_of(&csi(&["delete-volume", &id]));

    // Errors: `CODE: message` on stderr, exit status 1.
    let bad = csi(&["delete-volume", "../escape"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.starts_with("INVALID_ARGUMENT: "), "{err}");
    let gone = csi(&["stats", &id, "--path", &target]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).starts_with("NOT_FOUND: "));

    let status = json_of(&loopvol(&[
        "status",
        "--pool-dir",
        &pool,
        "--output",
        "json",
    ]));
    assert_eq!(status["volumes"], 0);
    assert!(status["staged"].as_array().unwrap().is_empty());
    assert!(status["loop_devices"].as_array().unwrap().is_empty());
    d.assert_clean();
}
