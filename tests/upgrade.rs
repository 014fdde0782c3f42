//! A DaemonSet rolling update of the node plugin, with the embedded default: the driver is
//! stopped (SIGTERM, as the kubelet stops a container) and later killed (SIGKILL, the end of
//! the grace period) while fio writes to a published volume, and restarted each time. Loop
//! devices and mounts belong to the kernel, not to the driver process, so fio must see no
//! error and its data must verify; afterwards the volume is still staged and published, and
//! unpublish and unstage clean up as usual.
//!
//! (tests/restart.rs does the same in separate mount namespaces, as containers do; this test
//! is about I/O integrity under a real workload.)

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use loopvol::csi::*;

fn mounted(path: &std::path::Path) -> bool {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let p = p.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_plugin_restarts_under_fio_lose_no_io() {
    if !root_or_skip("node_plugin_restarts_under_fio_lose_no_io") {
        return;
    }
    let mut d = Driver::start().await;
    let cap = rw_mount("ext4");
    let id = create_volume_id(
        &mut d.controller().await,
        create_req("upgrade", 256 * MIB, cap.clone()),
    )
    .await;
    let staging = d.path("staging");
    let target = d.path("target");
    std::fs::create_dir_all(&staging).unwrap();
    let mut node = d.node().await;
    node.node_stage_volume(stage_req(&id, &staging, cap.clone()))
        .await
        .unwrap();
    node.node_publish_volume(publish_req(&id, &staging, &target, cap.clone()))
        .await
        .unwrap();
    drop(node);

    // 48 MiB of 4 KiB random writes at 8 MiB/s (about 6 s, so both restarts land inside the
    // write phase), direct I/O, every block checksummed and read back at the end.
    let data = target.join("fio.dat");
    let mut fio = Command::new("fio")
        .args([
            "--name=upgrade",
            "--rw=randwrite",
            "--bs=4k",
            "--size=48M",
            "--rate=8m",
            "--ioengine=psync",
            "--direct=1",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify-state file in the working directory.
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", data.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio (scripts/test installs it)");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Rolling update, first half: the old pod gets SIGTERM and exits.
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before the restart"
    );
    let status = d.stop();
    assert!(
        status.success(),
        "SIGTERM exit: {status}; log:\n{}",
        d.log()
    );
    assert!(mounted(&target), "the publish mount left with the driver");
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.spawn().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // And a plugin that does not stop in its grace period is killed.
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before the kill"
    );
    d.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.spawn().await;

    let out = tokio::task::spawn_blocking(move || fio.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed ({}): {}\n{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = stdout.find('{').expect("fio printed JSON");
    let report: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error: {job}");
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    assert_eq!(written, 48 << 20, "fio wrote everything");
    // The verify phase read every block back.
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 48 << 20,
        "{job}"
    );

    // The restarted driver still knows the volume as staged and published.
    let mut node = d.node().await;
    node.node_stage_volume(stage_req(&id, &staging, cap.clone()))
        .await
        .expect("NodeStage after restart is idempotent");
    node.node_publish_volume(publish_req(&id, &staging, &target, cap.clone()))
        .await
        .expect("NodePublish after restart is idempotent");
    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        stats.usage.iter().any(|u| u.used > 0),
        "stats of the published volume after restarts: {stats:?}"
    );
    node.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(!mounted(&target) && !mounted(&staging));
    d.controller()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: id,
            secrets: Default::default(),
        })
        .await
        .unwrap();
    d.assert_clean();
}
