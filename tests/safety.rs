//! Node-side safety under faults and hostile input (issue 17), against the real binary:
//!
//! - a driver killed at any point of a snapshot or clone never leaves the source filesystem
//!   frozen, and the retry succeeds; health and `doctor` report a freeze left behind;
//! - NodeUnpublishVolume removes only a target loopvol made for that volume;
//! - staging and target paths are confined to the allowed roots: no pool, no symlinks;
//! - health sees a filesystem the kernel forced read-only or that recorded errors;
//! - request text cannot forge or bloat log lines;
//! - the offline CLI finds the pool's own node ID.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::volume_capability::access_mode::Mode;
use loopvol::csi::*;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic::Code;

type Ctl = ControllerClient<Channel>;
type Nod = NodeClient<Channel>;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

async fn create(c: &mut Ctl, req: CreateVolumeRequest) -> Result<String, tonic::Status> {
    c.create_volume(req)
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
}

async fn delete(c: &mut Ctl, id: &str) {
    c.delete_volume(DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

fn snapshot_req(name: &str, source: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn clone_req(name: &str, source: &str) -> CreateVolumeRequest {
    let mut r = create_req(name, 0, rw_mount("ext4"));
    r.capacity_range = None;
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: source.into(),
            },
        )),
    });
    r
}

fn stage_req(id: &str, staging: &Path, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s(staging),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s(staging),
        target_path: s(target),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: s(target),
    }
}

fn unstage_req(id: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s(staging),
    }
}

/// A volume staged and published with ext4 under the test's temp dir.
struct Staged {
    id: String,
    staging: PathBuf,
    target: PathBuf,
}

async fn staged(d: &Driver, c: &mut Ctl, n: &mut Nod, name: &str, bytes: i64) -> Staged {
    let id = create(c, create_req(name, bytes, rw_mount("ext4")))
        .await
        .unwrap();
    let staging = d.path(&format!("plugins/{name}/globalmount"));
    let target = d.path(&format!("pods/{name}/mount"));
    n.node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, rw_mount("ext4")))
        .await
        .unwrap();
    Staged {
        id,
        staging,
        target,
    }
}

async fn take_down(c: &mut Ctl, n: &mut Nod, v: &Staged) {
    n.node_unpublish_volume(unpublish_req(&v.id, &v.target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&v.id, &v.staging))
        .await
        .unwrap();
    delete(c, &v.id).await;
}

// ---------------------------------------------------------------------------------------------
// Finding 1: freezes never outlive the driver.

/// A process writing through a published volume, 4 KiB and an fdatasync at a time, recording
/// when each write completed. A frozen filesystem stops it in D state until thawed.
struct Writer {
    /// Milliseconds since `epoch` of the last completed write.
    last: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(dir: &Path) -> Writer {
        let file = std::fs::File::create(dir.join("writer.dat")).unwrap();
        let last = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let (l, st) = (last.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let block = pattern(4096, 7);
            let mut n = 0u64;
            while !st.load(SeqCst) {
                file.write_at(&block, (n % 256) * 4096).unwrap();
                file.sync_data().unwrap();
                n += 1;
                l.store(epoch.elapsed().as_millis() as u64, SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        });
        Writer {
            last,
            stop,
            epoch,
            thread: Some(thread),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Wait until a write completes after `since` (ms since epoch); how long that took.
    async fn progress_after(&self, since: u64, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.last.load(SeqCst) > since {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

fn markers(pool: &Path) -> Vec<String> {
    std::fs::read_dir(pool.join("node"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".frozen"))
                .collect()
        })
        .unwrap_or_default()
}

enum Copy {
    Snapshot(String),
    Clone(String),
}

async fn send_copy(c: &mut Ctl, op: &Copy, source: &str) -> Result<(), tonic::Status> {
    match op {
        Copy::Snapshot(name) => c
            .create_snapshot(snapshot_req(name, source))
            .await
            .map(drop),
        Copy::Clone(name) => create(c, clone_req(name, source)).await.map(drop),
    }
}

/// Undo a copy that succeeded (or that a kill may have completed): delete it by name.
async fn remove_copy(c: &mut Ctl, op: &Copy, source: &str) {
    match op {
        Copy::Snapshot(name) => {
            let snap = c
                .create_snapshot(snapshot_req(name, source))
                .await
                .unwrap()
                .into_inner()
                .snapshot
                .unwrap();
            c.delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        Copy::Clone(name) => {
            let id = create(c, clone_req(name, source)).await.unwrap();
            delete(c, &id).await;
        }
    }
}

/// kill -9 at random points of snapshots and clones of a staged volume that a writer keeps
/// writing to: before the freeze, while frozen, after. After every kill the writer moves again
/// within a bound (the guardian thaws when the driver dies; the restart would too), no marker
/// is left once the driver is back, and the same request then succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_during_a_freeze_never_leaves_the_source_frozen() {
    if !root_or_skip("kill9_freeze") {
        return;
    }
    let rounds: u64 = std::env::var("LOOPVOL_FREEZE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed: u64 = rand::random();
    println!("kill9_freeze seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Each freeze lasts at least 300 ms, so random kills land inside it often.
    let mut d = Driver::start_with(&["--test-freeze-hold-ms", "300"]).await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let v = staged(&d, &mut c, &mut n, "frozen-src", 16 * MIB).await;
    let _thaw = ThawOnDrop(v.staging.clone());
    let writer = Writer::start(&v.target);
    let bound = Duration::from_secs(5);
    let (mut killed_frozen, mut worst) = (0, Duration::ZERO);
    for round in 0..rounds {
        let op = if round % 2 == 0 {
            Copy::Snapshot(format!("snap-{round}"))
        } else {
            Copy::Clone(format!("clone-{round}"))
        };
        let mut cl = c.clone();
        let source = v.id.clone();
        let call = tokio::spawn(async move {
            let r = send_copy(&mut cl, &op, &source).await;
            (op, r)
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..450))).await;
        let frozen_now = !markers(&d.pool).is_empty();
        d.kill9();
        let (killed, killed_at) = (Instant::now(), writer.now());
        let (op, _) = call.await.unwrap();
        killed_frozen += frozen_now as u32;
        d.spawn().await;
        c = d.controller().await;
        // Measured from the kill, across the restart.
        if writer.progress_after(killed_at, bound).await.is_none() {
            panic!(
                "round {round}: the writer is still blocked {bound:?} after the kill; markers \
                 {:?}\n{}",
                markers(&d.pool),
                d.log()
            );
        }
        worst = worst.max(killed.elapsed());
        assert!(
            markers(&d.pool).is_empty(),
            "round {round}: freeze markers left after the restart: {:?}",
            markers(&d.pool)
        );
        // The retry succeeds (before: INTERNAL "freeze ... Device or resource busy" forever).
        send_copy(&mut c, &op, &v.id)
            .await
            .unwrap_or_else(|e| panic!("round {round}: retry after the kill: {e}"));
        remove_copy(&mut c, &op, &v.id).await;
    }
    let writes = writer.finish();
    println!(
        "kill9_freeze: {rounds} kills, {killed_frozen} with a freeze under way, {writes} writes, \
         longest stall of the writer from a kill (restart included) {worst:?}"
    );
    n = d.node().await;
    take_down(&mut c, &mut n, &v).await;
    d.assert_clean();
}

async fn volume_health(n: &mut Nod, id: &str) -> Vec<volume_health::VolumeHealthEntry> {
    n.node_get_volume_health(NodeGetVolumeHealthRequest {
        volume_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .volume_health
    .unwrap()
    .health_statuses
}

async fn controller_health(c: &mut Ctl, id: &str) -> Vec<volume_health::VolumeHealthEntry> {
    c.controller_get_volume_health(ControllerGetVolumeHealthRequest {
        volume_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .volume_health
    .unwrap()
    .health_statuses
}

fn reasons(h: &[volume_health::VolumeHealthEntry]) -> Vec<&str> {
    h.iter().map(|e| e.reason.as_str()).collect()
}

/// `loopvol doctor` on the driver's pool: (passed, output).
fn doctor(d: &Driver) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .arg("doctor")
        .arg("--pool-dir")
        .arg(&d.pool)
        .arg("--kubelet-dir")
        .arg(d.path("no-kubelet-here"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(space_runs(&text).is_empty(), "{text}");
    (out.status.success(), text)
}

/// Health messages are sentences: no run of spaces left by a broken string continuation.
fn assert_single_spaced(h: &[volume_health::VolumeHealthEntry]) {
    for e in h {
        assert!(space_runs(&e.message).is_empty(), "{:?}", e.message);
    }
}

async fn wait_for_marker(pool: &Path) {
    let t = Instant::now();
    while markers(pool).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "no freeze began");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// When the guardian dies with the driver (a container's whole process tree killed), the
/// filesystem stays frozen: `doctor` says so, and the restarted driver thaws it before serving.
/// A long freeze in progress shows in node and controller health, and one that outlasts
/// --freeze-timeout is lifted, with the copy failing instead of being kept torn.
#[tokio::test(flavor = "multi_thread")]
async fn freezes_are_reported_bounded_and_thawed_at_start_when_everything_died() {
    if !root_or_skip("freeze_tree_killed") {
        return;
    }
    let mut d = Driver::start_with(&["--test-freeze-hold-ms", "8000"]).await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let v = staged(&d, &mut c, &mut n, "tree", 16 * MIB).await;
    let _thaw = ThawOnDrop(v.staging.clone());
    let writer = Writer::start(&v.target);
    assert!(volume_health(&mut n, &v.id).await.is_empty());

    let mut cl = c.clone();
    let id = v.id.clone();
    let snap = tokio::spawn(async move { cl.create_snapshot(snapshot_req("held", &id)).await });
    wait_for_marker(&d.pool).await;
    tokio::time::sleep(Duration::from_millis(5500)).await;
    // A freeze of more than 5 s is news for whoever watches health.
    let h = volume_health(&mut n, &v.id).await;
    assert_eq!(reasons(&h), ["FilesystemFrozen"], "{h:?}");
    assert_eq!(h[0].status, VolumeHealthErrorType::Degraded as i32);
    assert_single_spaced(&h);
    let h = controller_health(&mut c, &v.id).await;
    assert_eq!(reasons(&h), ["FilesystemFrozen"], "{h:?}");

    // The whole tree dies: guardian first, so that it cannot thaw.
    let guardians = guardians_of(d.pid());
    assert_eq!(guardians.len(), 1, "one guardian per freeze");
    for g in guardians {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(g),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    d.kill9();
    let _ = snap.await;
    let killed_at = writer.now();
    assert!(
        writer
            .progress_after(killed_at, Duration::from_millis(1500))
            .await
            .is_none(),
        "the filesystem should still be frozen with no loopvol process left"
    );
    let (ok, out) = doctor(&d);
    assert!(!ok, "{out}");
    assert!(out.contains("✘ frozen filesystems"), "{out}");
    assert!(out.contains(&*v.staging.to_string_lossy()), "{out}");
    assert!(out.contains("fsfreeze -u"), "{out}");

    // The restart thaws before serving.
    d.set_args(&["--freeze-timeout", "1", "--test-freeze-hold-ms", "2500"]);
    d.spawn().await;
    assert!(
        writer
            .progress_after(killed_at, Duration::from_secs(5))
            .await
            .is_some(),
        "the restarted driver did not thaw the filesystem"
    );
    assert!(markers(&d.pool).is_empty(), "{:?}", markers(&d.pool));
    assert!(
        d.log().contains("left frozen by a killed loopvol"),
        "{}",
        d.log()
    );
    let (ok, out) = doctor(&d);
    assert!(!out.contains("✘ frozen filesystems"), "{out}");
    let _ = ok;

    // The watchdog: a 2.5 s hold outlasts the 1 s bound. The freeze is lifted after 1 s and the
    // snapshot is refused rather than kept as a copy of a moving filesystem.
    c = d.controller().await;
    let started = Instant::now();
    let e = c
        .create_snapshot(snapshot_req("held", &v.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(e.message().contains("freeze-timeout"), "{}", e.message());
    assert!(started.elapsed() >= Duration::from_millis(2500));
    assert!(markers(&d.pool).is_empty(), "{:?}", markers(&d.pool));
    assert!(d.log().contains("freeze watchdog"), "{}", d.log());
    let listed = c
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");

    // And with time enough, the same snapshot succeeds.
    d.stop();
    d.set_args(&[]);
    d.spawn().await;
    c = d.controller().await;
    n = d.node().await;
    let snap = c
        .create_snapshot(snapshot_req("held", &v.id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();
    writer.finish();
    take_down(&mut c, &mut n, &v).await;
    d.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Finding 2: unpublish removes only what loopvol made.

/// `loopvol csi` against the driver; returns (success, stdout+stderr).
fn csi_cli(d: &Driver, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(["csi", "--endpoint", &format!("unix://{}", s(&d.socket))])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn unpublish_removes_only_targets_loopvol_made_for_that_volume() {
    if !root_or_skip("unpublish_foreign") {
        return;
    }
    let d = Driver::start().await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let v = staged(&d, &mut c, &mut n, "owner", 16 * MIB).await;

    // A file and an empty directory nobody published: unpublish answers OK (idempotent) and
    // leaves both, through the CLI as in the report and through the RPC.
    let victim = d.path("victim.conf");
    std::fs::write(&victim, b"x\n").unwrap();
    let (ok, out) = csi_cli(&d, &["unpublish", &v.id, "--target-path", &s(&victim)]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"x\n");
    let empty = d.path("pods/other/mount");
    std::fs::create_dir_all(&empty).unwrap();
    n.node_unpublish_volume(unpublish_req(&v.id, &empty))
        .await
        .unwrap();
    assert!(
        empty.is_dir(),
        "an empty directory loopvol never made was removed"
    );
    // An empty file where a block publish would be.
    let file = d.path("pods/other/dev");
    std::fs::File::create(&file).unwrap();
    n.node_unpublish_volume(unpublish_req(&v.id, &file))
        .await
        .unwrap();
    assert!(file.is_file());

    // A target that existed before the publish (made by the kubelet) stays after unpublish.
    n.node_publish_volume(publish_req(&v.id, &v.staging, &empty, rw_mount("ext4")))
        .await
        .unwrap();
    n.node_unpublish_volume(unpublish_req(&v.id, &empty))
        .await
        .unwrap();
    assert!(empty.is_dir(), "a target the kubelet made was removed");
    // The target loopvol made is removed, but only by an unpublish of its own volume.
    let other = staged(&d, &mut c, &mut n, "other", 16 * MIB).await;
    n.node_unpublish_volume(unpublish_req(&other.id, &v.target))
        .await
        .unwrap_err(); // v is mounted there: not other's, refused
    n.node_unpublish_volume(unpublish_req(&v.id, &v.target))
        .await
        .unwrap();
    assert!(!v.target.exists(), "the target loopvol made stayed");
    // Made again by the next publish, removed again by its unpublish.
    n.node_publish_volume(publish_req(&v.id, &v.staging, &v.target, rw_mount("ext4")))
        .await
        .unwrap();
    let m = v.target.clone();
    n.node_unpublish_volume(unpublish_req(&v.id, &m))
        .await
        .unwrap();
    assert!(!m.exists());

    // What loopvol made is known by a mark on the target's inode (no record is written): a
    // directory swapped in at the path after the publish carries none and stays, and one
    // marked for another volume stays too.
    n.node_publish_volume(publish_req(&v.id, &v.staging, &v.target, rw_mount("ext4")))
        .await
        .unwrap();
    assert!(
        !d.pool
            .join("node")
            .join(format!("{}.targets", hex_of(&v.id)))
            .exists(),
        "a target record was written where the target could carry the mark"
    );
    nix::mount::umount2(&v.target, nix::mount::MntFlags::empty()).unwrap();
    std::fs::remove_dir(&v.target).unwrap();
    std::fs::create_dir(&v.target).unwrap();
    n.node_unpublish_volume(unpublish_req(&v.id, &v.target))
        .await
        .unwrap();
    assert!(
        v.target.is_dir(),
        "a directory swapped in after the publish was removed"
    );
    std::fs::remove_dir(&v.target).unwrap();
    let foreign = d.path("pods/foreign/mount");
    std::fs::create_dir_all(&foreign).unwrap();
    xattr::set(
        &foreign,
        "trusted.loopvol.target",
        hex_of(&other.id).as_bytes(),
    )
    .unwrap();
    n.node_unpublish_volume(unpublish_req(&v.id, &foreign))
        .await
        .unwrap();
    assert!(
        foreign.is_dir(),
        "a target marked for another volume was removed"
    );
    std::fs::remove_dir(&foreign).unwrap();

    // A target an older loopvol recorded in <pool>/node/<hex>.targets (before the mark) is
    // still removed by its unpublish, and the record with it.
    let legacy = d.path("pods/legacy/mount");
    std::fs::create_dir_all(&legacy).unwrap();
    let st = std::fs::metadata(&legacy).unwrap();
    let record = d
        .pool
        .join("node")
        .join(format!("{}.targets", hex_of(&v.id)));
    std::fs::write(
        &record,
        serde_json::json!({"targets": [{
            "path": legacy, "kind": "dir",
            "dev": std::os::unix::fs::MetadataExt::dev(&st),
            "ino": std::os::unix::fs::MetadataExt::ino(&st),
        }]})
        .to_string(),
    )
    .unwrap();
    n.node_unpublish_volume(unpublish_req(&v.id, &legacy))
        .await
        .unwrap();
    assert!(
        !legacy.exists(),
        "the target an older loopvol recorded stayed"
    );
    assert!(!record.exists(), "the emptied target record stayed");

    // Raw block: the file loopvol made for the publish is removed; a foreign one is not.
    let blk = create(
        &mut c,
        create_req("blk", 16 * MIB, block_cap(Mode::SingleNodeWriter)),
    )
    .await
    .unwrap();
    let bstage = d.path("plugins/blk");
    let btarget = d.path("pods/blk/dev");
    n.node_stage_volume(stage_req(&blk, &bstage, block_cap(Mode::SingleNodeWriter)))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(
        &blk,
        &bstage,
        &btarget,
        block_cap(Mode::SingleNodeWriter),
    ))
    .await
    .unwrap();
    n.node_unpublish_volume(unpublish_req(&blk, &btarget))
        .await
        .unwrap();
    assert!(!btarget.exists(), "the block target loopvol made stayed");
    n.node_unstage_volume(unstage_req(&blk, &bstage))
        .await
        .unwrap();
    delete(&mut c, &blk).await;

    take_down(&mut c, &mut n, &other).await;
    take_down(&mut c, &mut n, &v).await;
    assert_eq!(std::fs::read(&victim).unwrap(), b"x\n");
    assert!(empty.is_dir() && file.is_file());
    let node_dir: Vec<_> = std::fs::read_dir(d.pool.join("node")).unwrap().collect();
    assert!(
        node_dir.is_empty(),
        "records left in pool/node: {node_dir:?}"
    );
    d.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Finding 3: staging and target paths are confined.

/// Mounts anywhere under the test's temp dir.
fn mounts_under(d: &Driver) -> Vec<PathBuf> {
    d.leftovers().0
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_staging_and_target_paths_are_refused_without_touching_anything() {
    if !root_or_skip("confinement") {
        return;
    }
    // Only <tmp>/kubelet is allowed; <tmp>/etc plays /etc.
    let d = Driver::start_confined(&[]).await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let kubelet = d.path("kubelet");
    let etc = d.path("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("passwd"), b"root:x:0:0\n").unwrap();
    std::fs::create_dir_all(kubelet.join("pods")).unwrap();
    std::os::unix::fs::symlink(&etc, kubelet.join("etc-link")).unwrap();
    std::os::unix::fs::symlink(&etc, kubelet.join("pods/dir-link")).unwrap();

    let id = create(&mut c, create_req("conf", 16 * MIB, rw_mount("ext4")))
        .await
        .unwrap();
    let good_staging = kubelet.join("plugins/conf/globalmount");
    let hostile = [
        etc.clone(),
        etc.join("sub"),
        PathBuf::from("/etc"),
        kubelet.clone(),
        kubelet.join("etc-link"),
        kubelet.join("pods/dir-link/globalmount"),
        d.pool.clone(),
        d.pool.join("volumes"),
    ];
    for p in &hostile {
        let e = n
            .node_stage_volume(stage_req(&id, p, rw_mount("ext4")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "stage at {p:?}: {e:?}");
    }
    assert!(mounts_under(&d).is_empty(), "{:?}", mounts_under(&d));
    assert!(
        loopvol::datapath::loop_device::loops_under(&d.pool).is_empty(),
        "a refused stage attached a loop device"
    );

    // Staged where it should be, the volume cannot be published onto hostile targets, nor
    // from its staging path through a symlink.
    n.node_stage_volume(stage_req(&id, &good_staging, rw_mount("ext4")))
        .await
        .unwrap();
    std::os::unix::fs::symlink(&good_staging, kubelet.join("staging-link")).unwrap();
    for p in hostile.iter().chain([&kubelet.join("pods/dir-link")]) {
        let e = n
            .node_publish_volume(publish_req(&id, &good_staging, p, rw_mount("ext4")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "publish at {p:?}: {e:?}");
        let e = n
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: s(p),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "stats at {p:?}: {e:?}");
        let e = n
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: s(p),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "expand at {p:?}: {e:?}");
        let e = n
            .node_unpublish_volume(unpublish_req(&id, p))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "unpublish at {p:?}: {e:?}");
    }
    let target = kubelet.join("pods/conf/mount");
    let e = n
        .node_publish_volume(publish_req(
            &id,
            &kubelet.join("staging-link"),
            &target,
            rw_mount("ext4"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = n
        .node_unstage_volume(unstage_req(&id, &kubelet.join("staging-link")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        mounts_under(&d),
        [std::fs::canonicalize(&good_staging).unwrap()],
        "only the real staging is mounted"
    );

    // The real paths work end to end.
    n.node_publish_volume(publish_req(&id, &good_staging, &target, rw_mount("ext4")))
        .await
        .unwrap();
    std::fs::write(target.join("f"), b"data").unwrap();
    let stats = n
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: s(&target),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!stats.into_inner().usage.is_empty());
    n.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&id, &good_staging))
        .await
        .unwrap();
    delete(&mut c, &id).await;
    let etc_now: Vec<_> = std::fs::read_dir(&etc)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        etc_now,
        ["passwd"],
        "something was made in the /etc stand-in"
    );
    assert_eq!(std::fs::read(etc.join("passwd")).unwrap(), b"root:x:0:0\n");
    d.assert_clean();
}

/// The pool inside an allowed root (the harness allows its whole temp dir, pool included):
/// the pool, its directories and its parent stay off limits.
#[tokio::test(flavor = "multi_thread")]
async fn the_pool_is_never_a_staging_or_target_path() {
    if !root_or_skip("pool_confinement") {
        return;
    }
    let d = Driver::start().await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let v = staged(&d, &mut c, &mut n, "pooled", 16 * MIB).await;
    for p in [
        d.pool.clone(),
        d.pool.join("volumes"),
        d.pool.join("node/x"),
        d.dir.path().to_path_buf(),
    ] {
        let e = n
            .node_publish_volume(publish_req(&v.id, &v.staging, &p, rw_mount("ext4")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "publish at {p:?}: {e:?}");
        let e = n
            .node_stage_volume(stage_req(&v.id, &p, rw_mount("ext4")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "stage at {p:?}: {e:?}");
    }
    assert!(!d.pool.join("node/x").exists());
    take_down(&mut c, &mut n, &v).await;
    d.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Finding 5: request text cannot forge, corrupt or bloat log lines.

#[tokio::test(flavor = "multi_thread")]
async fn request_text_cannot_forge_or_bloat_text_log_lines() {
    if !root_or_skip("log_injection") {
        return;
    }
    let d = Driver::start().await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let forged = "FORGED level=ERROR admin logged in";
    for name in [
        format!("evil\n{forged}"),
        format!("nul\0{forged}"),
        format!("esc\u{1b}[2K\r{forged}"),
        "n".repeat(10_000),
    ] {
        let e = create(&mut c, create_req(&name, 16 * MIB, rw_mount("ext4")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = n
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: name.clone(),
                volume_path: s(&d.path("x")),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    // A valid path with a newline reaches the driver's own log lines (stage, unstage).
    let id = create(&mut c, create_req("pathy", 16 * MIB, rw_mount("ext4")))
        .await
        .unwrap();
    let staging = d.path(&format!("plugins/a\n{forged}"));
    n.node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    delete(&mut c, &id).await;

    let log = std::fs::read(d.path("driver.log")).unwrap();
    assert!(!log.contains(&0), "a NUL byte reached the log");
    assert!(!log.contains(&0x1b), "an escape sequence reached the log");
    let text = String::from_utf8_lossy(&log);
    for line in text.lines() {
        assert!(!line.starts_with("FORGED"), "forged line: {line:?}");
        assert!(!line.contains('\r'), "{line:?}");
        assert!(line.len() < 2048, "a {} byte line: {line:.200}", line.len());
    }
    assert!(text.contains("evil\\nFORGED"), "{text}");
    assert!(text.contains("…(+9744 bytes)"), "{text}");
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_keep_the_volume_name_apart_from_the_span_name() {
    if !root_or_skip("json_log_fields") {
        return;
    }
    let d = Driver::start_with(&["--log-format", "json"]).await;
    let mut c = d.controller().await;
    let id = create(&mut c, create_req("xfs1", 300 * MIB, rw_mount("xfs")))
        .await
        .unwrap();
    delete(&mut c, &id).await;
    let _ = create(&mut c, create_req("bad\nname", MIB, rw_mount("xfs"))).await;
    let log = d.log();
    let mut seen = false;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON event: {e}: {line}"));
        // serde_json keeps the last of duplicate keys, so check the raw text too.
        assert!(
            !line.contains(r#""name":"xfs1","name""#),
            "duplicate keys: {line}"
        );
        if let Some(span) = v.get("span").filter(|s| s["name"] == "CreateVolume") {
            if span["volume_name"] == "xfs1" {
                seen = true;
            }
        }
    }
    assert!(
        seen,
        "no CreateVolume span carries volume_name=xfs1:\n{log}"
    );
    assert!(log.contains(r#""volume_name":"bad\\nname""#), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Finding 6: the offline CLI works on the pool's own node ID.

fn cli(args: &[&str], pool: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(args)
        .arg("--pool-dir")
        .arg(pool)
        .env_remove("LOOPVOL_NODE_ID")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_volume_commands_use_the_pools_own_node_id() {
    if !root_or_skip("cli_node_id") {
        return;
    }
    let mut d = Driver::start().await;
    let mut c = d.controller().await;
    let id = create(&mut c, create_req("offline", 16 * MIB, rw_mount("ext4")))
        .await
        .unwrap();
    d.stop();
    let record = d.pool.join("volumes").join(format!(
        "{}.json",
        id.strip_prefix("vol-").unwrap().split_once('@').unwrap().0
    ));
    // No --node-id (the pool's node is test-node, not this host's name).
    let (ok, out) = cli(
        &["volume", "delete", "vol-0123456789abcdef0123@elsewhere"],
        &d.pool,
    );
    assert!(!ok, "a volume of another node: {out}");
    assert!(out.contains("node \"elsewhere\""), "{out}");
    let (ok, out) = cli(&["volume", "delete", &id], &d.pool);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("deleted {id}")), "{out}");
    assert!(!record.exists() && !d.image_of(&id).exists());
    let (ok, out) = cli(&["volume", "delete", &id], &d.pool);
    assert!(!ok, "deleting it again must fail: {out}");
    assert!(out.contains("does not exist"), "{out}");
    // A new static volume belongs to the same node.
    let (ok, out) = cli(
        &["volume", "create", "--name", "static-2", "--size", "16Mi"],
        &d.pool,
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("@{NODE}")) && out.contains(&format!("values: [\"{NODE}\"]")),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 4: health sees a filesystem the kernel stopped writing.

/// The loop device under a staging mount, e.g. `loop3`.
fn device_name_at(path: &Path) -> String {
    let m = loopvol::fs::mount::mount_at(path)
        .unwrap()
        .expect("mounted");
    Path::new(&m.source)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_doctor_report_filesystems_forced_read_only_or_shut_down() {
    if !root_or_skip("fs_health") {
        return;
    }
    let d = Driver::start().await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    // errors=remount-ro, as production mounts often say (mke2fs defaults to continue).
    let mut cap = rw_mount("ext4");
    if let Some(volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.mount_flags = vec!["errors=remount-ro".into()];
    }
    let id = create(&mut c, create_req("errs", 16 * MIB, cap.clone()))
        .await
        .unwrap();
    let v = Staged {
        id,
        staging: d.path("plugins/errs/globalmount"),
        target: d.path("pods/errs/mount"),
    };
    n.node_stage_volume(stage_req(&v.id, &v.staging, cap.clone()))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&v.id, &v.staging, &v.target, cap))
        .await
        .unwrap();
    assert!(volume_health(&mut n, &v.id).await.is_empty());
    let (ok, out) = doctor(&d);
    assert!(out.contains("✔ staged filesystems: 1 mounted"), "{out}");
    let _ = ok;

    // ext4 records an error and stops writing: mountinfo says `rw,...,emergency_ro` on 6.x.
    let dev = device_name_at(&v.staging);
    let trigger = format!("/sys/fs/ext4/{dev}/trigger_fs_error");
    std::fs::write(&trigger, "loopvol test error").unwrap();
    assert!(
        std::fs::write(v.target.join("after"), b"x").is_err(),
        "still writable"
    );
    let h = volume_health(&mut n, &v.id).await;
    let r = reasons(&h);
    assert!(r.contains(&"FilesystemReadOnly"), "{h:?}");
    assert!(r.contains(&"FilesystemErrors"), "{h:?}");
    assert_single_spaced(&h);
    let h = controller_health(&mut c, &v.id).await;
    assert!(reasons(&h).contains(&"FilesystemReadOnly"), "{h:?}");
    let listed = c
        .controller_list_volume_health(ControllerListVolumeHealthRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.entries.iter().any(|e| e.volume_id == v.id),
        "{listed:?}"
    );
    let (ok, out) = doctor(&d);
    assert!(!ok, "{out}");
    assert!(out.contains("✘ staged filesystems"), "{out}");
    assert!(out.contains("FilesystemReadOnly"), "{out}");

    // A shut-down xfs shows nothing in mountinfo; its root answers stat with EIO.
    let x = create(&mut c, create_req("shut", 300 * MIB, rw_mount("xfs")))
        .await
        .unwrap();
    let xs = d.path("plugins/shut/globalmount");
    n.node_stage_volume(stage_req(&x, &xs, rw_mount("xfs")))
        .await
        .unwrap();
    let st = std::process::Command::new("xfs_io")
        .args(["-x", "-c", "shutdown"])
        .arg(&xs)
        .status()
        .unwrap();
    assert!(st.success());
    let h = volume_health(&mut n, &x).await;
    assert_eq!(reasons(&h), ["FilesystemShutdown"], "{h:?}");
    assert_eq!(h[0].status, VolumeHealthErrorType::Inaccessible as i32);
    assert_single_spaced(&h);

    n.node_unstage_volume(unstage_req(&x, &xs)).await.unwrap();
    delete(&mut c, &x).await;
    take_down(&mut c, &mut n, &v).await;
    d.assert_clean();
}

/// Issue 27 (12): with the pool full under a thin ext4 volume, a journal commit into the
/// journal's never-written blocks (mkfs leaves them unwritten) fails and jbd2 aborts the
/// journal. Until the next write meets it, mountinfo says `rw` and `errors_count` is 0, and
/// health said nothing; the journal superblock's errno says it, and the node and controller
/// health RPCs and doctor now report `FilesystemJournalAborted`.
#[tokio::test(flavor = "multi_thread")]
async fn health_reports_an_ext4_journal_the_kernel_aborted_before_ext4_noticed() {
    if !root_or_skip("journal_aborted") {
        return;
    }
    let d = Driver::start_on_small_fs(64 * MIB as u64, &[]).await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let v = staged(&d, &mut c, &mut n, "journal", 32 * MIB).await;
    assert!(volume_health(&mut n, &v.id).await.is_empty());
    let dev = device_name_at(&v.staging);
    // Fill the filesystem under the pool (not the volume).
    let filler = fill(d.pool.parent().unwrap());
    // Metadata changes and a sync, until a commit needs a journal block the image lacks.
    let mut aborted = false;
    for i in 0..200 {
        let dir = v.target.join(format!("d{i}"));
        if std::fs::create_dir(&dir).is_err() {
            break;
        }
        let f = std::fs::File::open(&v.target).unwrap();
        let _ = nix::unistd::syncfs(&f);
        if loopvol::fs::ext4_journal::aborted(Path::new(&format!("/dev/{dev}"))).is_some() {
            aborted = true;
            break;
        }
    }
    assert!(aborted, "the journal was never aborted");
    let m = loopvol::fs::mount::mount_at(&v.staging).unwrap().unwrap();
    let errors = std::fs::read_to_string(format!("/sys/fs/ext4/{dev}/errors_count")).unwrap();
    println!(
        "aborted journal: superblock options {:?}, errors_count {}",
        m.super_options,
        errors.trim()
    );
    let h = volume_health(&mut n, &v.id).await;
    let r = reasons(&h);
    assert!(r.contains(&"FilesystemJournalAborted"), "{h:?}");
    // The state of the report: nothing else in the kernel says it yet.
    if errors.trim() == "0" && !m.super_options.contains("emergency_ro") {
        assert!(
            r.iter()
                .all(|x| *x == "FilesystemJournalAborted" || *x == "PoolFull"),
            "{h:?}"
        );
    }
    let h = controller_health(&mut c, &v.id).await;
    assert!(reasons(&h).contains(&"FilesystemJournalAborted"), "{h:?}");
    let (ok, out) = doctor(&d);
    assert!(!ok, "{out}");
    assert!(out.contains("FilesystemJournalAborted"), "{out}");

    std::fs::remove_file(filler).unwrap();
    take_down(&mut c, &mut n, &v).await;
    d.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Finding 7: the smaller ones.

/// Fill the filesystem holding `dir` with `dir/filler` until it is full.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for size in [MIB as usize, 4096] {
        let block = vec![0x5a; size];
        while f.write_all(&block).and_then(|_| f.sync_data()).is_ok() {}
    }
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_pool_refuses_copies_before_freezing_and_doctor_says_full() {
    if !root_or_skip("full_pool_copies") {
        return;
    }
    let d = Driver::start_on_small_fs(160 * MIB as u64, &[]).await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let v = staged(&d, &mut c, &mut n, "full", 32 * MIB).await;
    std::fs::write(v.target.join("data"), pattern(4 * MIB as usize, 3)).unwrap();
    let filler = fill(d.pool.parent().unwrap());

    // Before: INTERNAL "freeze ...: Input/output error" (the volume could not flush).
    let e = c
        .create_snapshot(snapshot_req("full-snap", &v.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = create(&mut c, clone_req("full-clone", &v.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(markers(&d.pool).is_empty());
    assert!(
        !d.log().contains("filesystem frozen"),
        "froze although the copy could not fit"
    );
    let (ok, out) = doctor(&d);
    assert!(!ok, "{out}");
    assert!(!out.contains("refuses O_DIRECT"), "{out}");
    assert!(
        out.contains("✘ direct I/O (O_DIRECT): cannot be tested"),
        "{out}"
    );
    assert!(out.contains("✘ free space"), "{out}");

    // With room again, the snapshot works, and its image is as private as a volume's.
    std::fs::remove_file(&filler).unwrap();
    let snap = c
        .create_snapshot(snapshot_req("full-snap", &v.id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let hex = snap
        .snapshot_id
        .strip_prefix("snap-")
        .unwrap()
        .split_once('@')
        .unwrap()
        .0
        .to_string();
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(d.pool.join("snapshots").join(format!("{hex}.img"))),
        0o600
    );
    assert_eq!(mode(d.image_of(&v.id)), 0o600);
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();
    take_down(&mut c, &mut n, &v).await;
    d.assert_clean();
}

/// A read-only publish is never visible writable, even for an instant a kill could freeze:
/// the bind is made read-only (and nosuid, noexec... as asked) before it is attached.
#[tokio::test(flavor = "multi_thread")]
async fn publishes_carry_their_restrictions_from_the_start() {
    if !root_or_skip("restricted_publish") {
        return;
    }
    let d = Driver::start().await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let mut cap = rw_mount("ext4");
    if let Some(volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.mount_flags = vec!["nosuid".into(), "noexec".into(), "noatime".into()];
    }
    let id = create(&mut c, create_req("restricted", 16 * MIB, cap.clone()))
        .await
        .unwrap();
    let staging = d.path("plugins/restricted");
    let target = d.path("pods/restricted/mount");
    n.node_stage_volume(stage_req(&id, &staging, cap.clone()))
        .await
        .unwrap();
    let mut req = publish_req(&id, &staging, &target, cap);
    req.readonly = true;
    n.node_publish_volume(req.clone()).await.unwrap();
    let m = loopvol::fs::mount::mount_at(&target)
        .unwrap()
        .expect("published");
    for flag in ["ro", "nosuid", "noexec", "noatime"] {
        assert!(
            m.options.split(',').any(|o| o == flag),
            "{flag} missing: {m:?}"
        );
    }
    let e = std::fs::write(target.join("x"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    n.node_publish_volume(req).await.unwrap(); // idempotent
    n.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    delete(&mut c, &id).await;
    d.assert_clean();
}
