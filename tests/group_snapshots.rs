//! Volume group snapshots (CSI GroupController) against the real binary, as root, on real loop
//! devices and mounts:
//! - consistency: two published volumes with a writer mirroring a counter into both (A, fsync,
//!   then B, fsync); each of 50 group snapshots, restored and staged, shows counters at most the
//!   one in-flight step apart, and the volumes stay writable after every round;
//! - an injected failure of the second member's copy thaws both filesystems and leaves no
//!   member, record, journal, temp file or freeze marker behind;
//! - kill -9 during a create: after the restart the group is whole or absent, nothing orphaned;
//! - idempotency and every error code the spec names, members in ListSnapshots, stand-alone
//!   DeleteSnapshot of a member refused as the spec says, restore of each member;
//! - on an xfs pool the members are reflinks that cost next to no space.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::group_controller_client::GroupControllerClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::volume_content_source::{SnapshotSource, Type as SourceType};
use loopvol::csi::*;
use tonic::transport::Channel;
use tonic::Code;

type Group = GroupControllerClient<Channel>;

struct Ctx {
    d: Driver,
    c: ControllerClient<Channel>,
    n: NodeClient<Channel>,
    g: Group,
}

impl Ctx {
    async fn connect(d: Driver) -> Ctx {
        let g = group_client(&d).await;
        Ctx {
            c: d.controller().await,
            n: d.node().await,
            g,
            d,
        }
    }

    async fn reconnect(&mut self) {
        self.c = self.d.controller().await;
        self.n = self.d.node().await;
        self.g = group_client(&self.d).await;
    }

    async fn volume(&mut self, name: &str, bytes: i64) -> String {
        create_volume_id(&mut self.c, create_req(name, bytes, rw_mount("ext4"))).await
    }

    /// Stage and publish `id` under the test dir; returns (staging, target).
    async fn up(&mut self, id: &str, tag: &str) -> (PathBuf, PathBuf) {
        let staging = self.d.path(&format!("{tag}-staging"));
        let target = self.d.path(&format!("{tag}-target"));
        std::fs::create_dir_all(&staging).unwrap();
        self.n
            .node_stage_volume(stage_req(id, &staging, rw_mount("ext4")))
            .await
            .expect("NodeStageVolume");
        self.n
            .node_publish_volume(publish_req(id, &staging, &target, rw_mount("ext4")))
            .await
            .expect("NodePublishVolume");
        (staging, target)
    }

    async fn down(&mut self, id: &str, staging: &Path, target: &Path) {
        self.n
            .node_unpublish_volume(unpublish_req(id, target))
            .await
            .expect("NodeUnpublishVolume");
        self.n
            .node_unstage_volume(unstage_req(id, staging))
            .await
            .expect("NodeUnstageVolume");
    }

    async fn group(
        &mut self,
        name: &str,
        sources: &[&str],
    ) -> Result<VolumeGroupSnapshot, tonic::Status> {
        self.g
            .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
                name: name.into(),
                source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().group_snapshot.expect("group_snapshot"))
    }

    async fn delete_group(&mut self, g: &VolumeGroupSnapshot) {
        self.g
            .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: g.group_snapshot_id.clone(),
                snapshot_ids: snapshot_ids(g),
                ..Default::default()
            })
            .await
            .expect("DeleteVolumeGroupSnapshot");
    }

    async fn restore(&mut self, name: &str, snapshot_id: &str) -> String {
        let mut req = create_req(name, 0, rw_mount("ext4"));
        req.capacity_range = None;
        req.volume_content_source = Some(VolumeContentSource {
            r#type: Some(SourceType::Snapshot(SnapshotSource {
                snapshot_id: snapshot_id.into(),
            })),
        });
        create_volume_id(&mut self.c, req).await
    }

    async fn delete_volume(&mut self, id: &str) {
        self.c
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .expect("DeleteVolume");
    }

    async fn snapshots(&mut self) -> Vec<Snapshot> {
        self.c
            .list_snapshots(ListSnapshotsRequest::default())
            .await
            .expect("ListSnapshots")
            .into_inner()
            .entries
            .into_iter()
            .filter_map(|e| e.snapshot)
            .collect()
    }
}

async fn group_client(d: &Driver) -> Group {
    let ch = tonic::transport::Endpoint::from_shared(format!("unix://{}", d.socket.display()))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    GroupControllerClient::new(ch)
}

fn snapshot_ids(g: &VolumeGroupSnapshot) -> Vec<String> {
    g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect()
}

/// Names of the files in `dir` (empty when it does not exist).
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Nothing of any group is left in the pool: no member files, no group records or journals,
/// no temp images, no freeze markers.
fn assert_no_group_leftovers(pool: &Path, when: &str) {
    assert!(
        names_in(&pool.join("snapshots")).is_empty(),
        "{when}: {:?}",
        names_in(&pool.join("snapshots"))
    );
    assert!(
        names_in(&pool.join("groups")).is_empty(),
        "{when}: {:?}",
        names_in(&pool.join("groups"))
    );
    assert!(
        names_in(&pool.join("tmp")).is_empty(),
        "{when}: {:?}",
        names_in(&pool.join("tmp"))
    );
    let markers: Vec<String> = names_in(&pool.join("node"))
        .into_iter()
        .filter(|n| n.contains("frozen"))
        .collect();
    assert!(
        markers.is_empty(),
        "{when}: freeze markers left: {markers:?}"
    );
}

/// The counter file's value (fixed width, so every write replaces it whole).
const COUNTER: &str = "counter";
const WIDTH: usize = 20;

fn write_counter(f: &std::fs::File, n: u64) -> std::io::Result<()> {
    f.write_all_at(format!("{n:0WIDTH$}").as_bytes(), 0)?;
    f.sync_all()
}

fn read_counter(dir: &Path) -> u64 {
    let mut s = String::new();
    std::fs::File::open(dir.join(COUNTER))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    s.trim()
        .parse()
        .unwrap_or_else(|e| panic!("counter {s:?}: {e}"))
}

/// A write with fsync that must finish within a few seconds: a filesystem left frozen blocks
/// it forever, so it runs on its own thread and the wait is bounded.
fn assert_writable(target: &Path, when: &str) {
    let path = target.join("probe");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::fs::File::create(&path).and_then(|mut f| {
            f.write_all(b"still writable")?;
            f.sync_all()
        });
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{when}: write failed: {e}"),
        Err(_) => panic!("{when}: a write did not finish in 10 s: the filesystem stayed frozen"),
    }
}

/// The mirrored writer: n into A, fsync, then n into B, fsync, n = 1, 2, 3, ...
fn start_writer(
    a: PathBuf,
    b: PathBuf,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let open = |d: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(d.join(COUNTER))
                .unwrap()
        };
        let (fa, fb) = (open(&a), open(&b));
        let mut n = 0u64;
        while !stop.load(SeqCst) {
            n += 1;
            write_counter(&fa, n).expect("write A");
            write_counter(&fb, n).expect("write B");
            last.store(n, SeqCst);
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn group_snapshots_of_a_mirrored_writer_are_consistent_for_50_rounds() {
    if !root_or_skip("group_consistency") {
        return;
    }
    let mut t = Ctx::connect(Driver::start().await).await;
    let a = t.volume("wal", 16 * MIB).await;
    let b = t.volume("data", 16 * MIB).await;
    let (sa, ta) = t.up(&a, "a").await;
    let (sb, tb) = t.up(&b, "b").await;
    for dir in [&ta, &tb] {
        write_counter(&std::fs::File::create(dir.join(COUNTER)).unwrap(), 0).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let writer = start_writer(ta.clone(), tb.clone(), stop.clone(), last.clone());
    let mut seen_progress = 0;
    let mut prev = 0;
    for round in 0..50 {
        let g = t
            .group(&format!("round-{round}"), &[&a, &b])
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", t.d.log()));
        assert!(g.ready_to_use && g.creation_time.is_some());
        assert_eq!(g.snapshots.len(), 2);
        let by_source = |src: &str| {
            g.snapshots
                .iter()
                .find(|s| s.source_volume_id == src)
                .expect("a member per source")
                .snapshot_id
                .clone()
        };
        for s in &g.snapshots {
            assert_eq!(s.group_snapshot_id, g.group_snapshot_id);
            assert!(s.ready_to_use && s.creation_time.is_some());
        }
        let ra = t.restore(&format!("ra-{round}"), &by_source(&a)).await;
        let rb = t.restore(&format!("rb-{round}"), &by_source(&b)).await;
        let (rsa, rta) = t.up(&ra, "ra").await;
        let (rsb, rtb) = t.up(&rb, "rb").await;
        let (ca, cb) = (read_counter(&rta), read_counter(&rtb));
        // A is written first: B is A, or one step behind (the write in flight when A froze).
        assert!(
            ca == cb || ca == cb + 1,
            "round {round}: restored counters A={ca} B={cb} differ by more than one step"
        );
        assert!(
            ca >= prev,
            "round {round}: counter went back from {prev} to {ca}"
        );
        if ca > prev {
            seen_progress += 1;
        }
        prev = ca;
        t.down(&ra, &rsa, &rta).await;
        t.down(&rb, &rsb, &rtb).await;
        t.delete_volume(&ra).await;
        t.delete_volume(&rb).await;
        t.delete_group(&g).await;
        // Thawed: the live volumes take a write (and the writer goes on).
        assert_writable(&ta, &format!("round {round}, volume A"));
        assert_writable(&tb, &format!("round {round}, volume B"));
    }
    stop.store(true, SeqCst);
    writer.join().unwrap();
    assert!(
        seen_progress >= 10,
        "the writer hardly progressed between snapshots ({seen_progress} of 50 rounds): the test proved little"
    );
    assert!(last.load(SeqCst) > 50);
    t.down(&a, &sa, &ta).await;
    t.down(&b, &sb, &tb).await;
    assert_no_group_leftovers(&t.d.pool, "after 50 rounds");
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_member_copy_thaws_every_member_and_leaves_nothing() {
    if !root_or_skip("group_injected_failure") {
        return;
    }
    let d = Driver::start_with_env(&[], &[("LOOPVOL_TEST_FAIL_GROUP_COPY", "2")]).await;
    let mut t = Ctx::connect(d).await;
    let a = t.volume("fa", 16 * MIB).await;
    let b = t.volume("fb", 16 * MIB).await;
    let (sa, ta) = t.up(&a, "a").await;
    let (sb, tb) = t.up(&b, "b").await;
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    for dir in [&ta, &tb] {
        write_counter(&std::fs::File::create(dir.join(COUNTER)).unwrap(), 0).unwrap();
    }
    let writer = start_writer(ta.clone(), tb.clone(), stop.clone(), last.clone());
    for round in 0..5 {
        let e = t
            .group(&format!("fail-{round}"), &[&a, &b])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e}");
        assert!(e.message().contains("injected"), "{e}");
        assert_writable(&ta, &format!("round {round}, volume A"));
        assert_writable(&tb, &format!("round {round}, volume B"));
        assert!(
            t.snapshots().await.is_empty(),
            "round {round}: a member survived"
        );
        assert_no_group_leftovers(&t.d.pool, &format!("after failed round {round}"));
    }
    let before = last.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(last.load(SeqCst) > before, "the writer is stuck");
    stop.store(true, SeqCst);
    writer.join().unwrap();
    t.down(&a, &sa, &ta).await;
    t.down(&b, &sb, &tb).await;
    let log = t.d.log();
    assert!(log.contains("filesystem thawed"), "{log}");
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_group_create_leaves_it_whole_or_absent() {
    if !root_or_skip("group_kill9") {
        return;
    }
    // Each member pauses 150 ms once durable, so kills land before, between and after them.
    let d = Driver::start_with_env(&[], &[("LOOPVOL_TEST_GROUP_STEP_MS", "150")]).await;
    let mut t = Ctx::connect(d).await;
    let mut vols = Vec::new();
    for i in 0..3 {
        let v = t.volume(&format!("k{i}"), 16 * MIB).await;
        // Data in each, so a member is more than an empty file.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(t.d.image_of(&v))
            .unwrap();
        f.seek(SeekFrom::Start(MIB as u64)).unwrap();
        f.write_all(&pattern(MIB as usize, i)).unwrap();
        vols.push(v);
    }
    let sources: Vec<&str> = vols.iter().map(String::as_str).collect();
    let (mut whole, mut absent) = (0, 0);
    for (round, delay_ms) in [5u64, 40, 120, 200, 280, 360, 450, 600, 1000, 2000]
        .into_iter()
        .enumerate()
    {
        let name = format!("kill-{round}");
        let mut g = t.g.clone();
        let req = CreateVolumeGroupSnapshotRequest {
            name: name.clone(),
            source_volume_ids: vols.clone(),
            ..Default::default()
        };
        let call = tokio::spawn(async move { g.create_volume_group_snapshot(req).await });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        t.d.kill9();
        let _ = call.await;
        t.d.spawn().await;
        t.reconnect().await;
        // Whole or absent: the group's name resolves to a group with every member listed, or
        // to nothing, and then no member of it exists anywhere.
        let gid = format!("group-{}@{NODE}", &hex_of_name(&name));
        let listed = t.snapshots().await;
        let got =
            t.g.get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
                group_snapshot_id: gid.clone(),
                ..Default::default()
            })
            .await;
        match got {
            Ok(r) => {
                let g = r.into_inner().group_snapshot.unwrap();
                assert_eq!(g.snapshots.len(), 3, "round {round}");
                let members: BTreeSet<String> = snapshot_ids(&g).into_iter().collect();
                let in_list: BTreeSet<String> = listed
                    .iter()
                    .filter(|s| s.group_snapshot_id == gid)
                    .map(|s| s.snapshot_id.clone())
                    .collect();
                assert_eq!(members, in_list, "round {round}");
                whole += 1;
                t.delete_group(&g).await;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::NotFound, "round {round}: {e}");
                absent += 1;
            }
        }
        assert!(
            t.snapshots().await.is_empty(),
            "round {round}: members outlived their group: {listed:?}"
        );
        assert_no_group_leftovers(
            &t.d.pool,
            &format!("round {round} (killed after {delay_ms} ms)"),
        );
        // The create is retried as the snapshotter would, and then succeeds whole.
        let g = t.group(&name, &sources).await.expect("retry after restart");
        assert_eq!(g.snapshots.len(), 3);
        t.delete_group(&g).await;
        assert_no_group_leftovers(&t.d.pool, &format!("round {round}, after the retry"));
    }
    eprintln!("kill -9 rounds: {whole} whole, {absent} absent");
    assert!(
        absent > 0,
        "no kill landed before the commit: the test proved little"
    );
    assert!(
        whole > 0,
        "no kill landed after the commit: the test proved little"
    );
    assert!(
        t.d.log().contains("interrupted before it was committed"),
        "no restart found a partly made group to roll back"
    );
}

/// The 20-hex part of an ID derived from `name` (ids.rs: sha256 of the name).
fn hex_of_name(name: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(name.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..20]
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn group_snapshot_idempotency_error_codes_members_and_restore() {
    if !root_or_skip("group_errors") {
        return;
    }
    let mut t = Ctx::connect(Driver::start().await).await;
    let a = t.volume("ea", 16 * MIB).await;
    let b = t.volume("eb", 16 * MIB).await;
    let c = t.volume("ec", 16 * MIB).await;
    // Distinct data in each source (never staged, so the raw images are the volumes).
    for (i, v) in [&a, &b].iter().enumerate() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(t.d.image_of(v))
            .unwrap();
        f.write_all_at(&pattern(MIB as usize, 10 + i as u64), 2 * MIB as u64)
            .unwrap();
    }
    let g = t.group("g1", &[&a, &b]).await.expect("create");
    assert!(g.group_snapshot_id.starts_with("group-"));
    assert_eq!(g.snapshots.len(), 2);
    // Idempotent: same name, same set (in any order) → the same group.
    let again = t.group("g1", &[&b, &a]).await.expect("idempotent create");
    assert_eq!(again, g);
    // Same name, another set → ALREADY_EXISTS.
    assert_eq!(code_of(t.group("g1", &[&a, &c]).await), Code::AlreadyExists);
    assert_eq!(code_of(t.group("g1", &[&a]).await), Code::AlreadyExists);
    // Malformed requests → INVALID_ARGUMENT; unknown volumes → NOT_FOUND.
    assert_eq!(code_of(t.group("", &[&a]).await), Code::InvalidArgument);
    assert_eq!(code_of(t.group("g2", &[]).await), Code::InvalidArgument);
    assert_eq!(
        code_of(t.group("g2", &[&a, &a]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(t.group("g2", &[&a, "../x"]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(
            t.group("g2", &[&a, "vol-0123456789abcdef0123@test-node"])
                .await
        ),
        Code::NotFound
    );
    let with_param =
        t.g.create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
            name: "g2".into(),
            source_volume_ids: vec![a.clone()],
            parameters: [("bogus".to_string(), "1".to_string())].into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code_of(with_param), Code::InvalidArgument);
    // Nothing of the refused requests exists.
    assert_eq!(t.snapshots().await.len(), 2);

    // Members are ordinary snapshots in ListSnapshots, carrying the group's ID.
    let listed = t.snapshots().await;
    for s in &listed {
        assert_eq!(s.group_snapshot_id, g.group_snapshot_id);
    }
    // Get: by ID; a matching list is fine, a mismatching one INVALID_ARGUMENT.
    let get = |ids: Vec<String>| GetVolumeGroupSnapshotRequest {
        group_snapshot_id: g.group_snapshot_id.clone(),
        snapshot_ids: ids,
        ..Default::default()
    };
    let got =
        t.g.get_volume_group_snapshot(get(vec![]))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(got.group_snapshot.as_ref(), Some(&g));
    let mut rev = snapshot_ids(&g);
    rev.reverse();
    t.g.get_volume_group_snapshot(get(rev))
        .await
        .expect("same members, other order");
    assert_eq!(
        code_of(
            t.g.get_volume_group_snapshot(get(vec![snapshot_ids(&g)[0].clone()]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(
            t.g.get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
                group_snapshot_id: "group-0123456789abcdef0123@test-node".into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    // CSI v1.11+: a member cannot be deleted stand alone → INVALID_ARGUMENT, and it stays.
    let member = snapshot_ids(&g)[0].clone();
    let e =
        t.c.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: member.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("DeleteVolumeGroupSnapshot"), "{e}");
    assert_eq!(t.snapshots().await.len(), 2);

    // Each member restores like any snapshot, with its source's data.
    for (i, s) in g.snapshots.iter().enumerate() {
        let r = t.restore(&format!("restored-{i}"), &s.snapshot_id).await;
        let data = std::fs::read(t.d.image_of(&r)).unwrap();
        let which = if s.source_volume_id == a { 10 } else { 11 };
        assert_eq!(
            &data[2 * MIB as usize..3 * MIB as usize],
            &pattern(MIB as usize, which)[..],
            "member {i} restored other data"
        );
        t.delete_volume(&r).await;
    }

    // Delete: a list given must match (a partial or foreign list is INVALID_ARGUMENT and
    // deletes nothing), then OK, and OK again.
    let del = |ids: Vec<String>| DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: g.group_snapshot_id.clone(),
        snapshot_ids: ids,
        ..Default::default()
    };
    for bad in [
        vec![member.clone()],
        vec![member.clone(), member.clone()],
        vec![member.clone(), "snap-0123456789abcdef0123@test-node".into()],
    ] {
        assert_eq!(
            code_of(t.g.delete_volume_group_snapshot(del(bad)).await),
            Code::InvalidArgument
        );
    }
    assert_eq!(t.snapshots().await.len(), 2);
    t.g.delete_volume_group_snapshot(del(snapshot_ids(&g)))
        .await
        .expect("delete");
    t.g.delete_volume_group_snapshot(del(snapshot_ids(&g)))
        .await
        .expect("delete again");
    assert_eq!(
        code_of(t.g.get_volume_group_snapshot(get(vec![])).await),
        Code::NotFound
    );
    assert!(t.snapshots().await.is_empty());
    // The name is free again, and a group may be made of one volume. An empty list deletes
    // by ID alone (what csi-snapshotter sends when the content's status was never written).
    let solo = t.group("g1", &[&c]).await.expect("one-volume group");
    t.g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: solo.group_snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .expect("delete by ID alone");
    assert!(t.snapshots().await.is_empty());

    // Two groups over the same volumes at once: both finish (locks are taken in one order).
    let (mut g1, mut g2) = (t.g.clone(), t.g.clone());
    let mk = |name: &str, v: Vec<String>| CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: v,
        ..Default::default()
    };
    let (r1, r2) = tokio::join!(
        g1.create_volume_group_snapshot(mk("p1", vec![a.clone(), b.clone(), c.clone()])),
        g2.create_volume_group_snapshot(mk("p2", vec![c.clone(), b.clone(), a.clone()])),
    );
    for r in [r1, r2] {
        let g = r
            .expect("concurrent group")
            .into_inner()
            .group_snapshot
            .unwrap();
        t.delete_group(&g).await;
    }
    assert_no_group_leftovers(&t.d.pool, "at the end");
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn group_members_on_an_xfs_pool_are_reflinks_and_cost_next_to_nothing() {
    if !root_or_skip("group_reflink") {
        return;
    }
    let (d, xfs) = driver_on_xfs_pool().await;
    let mut t = Ctx::connect(d).await;
    let a = t.volume("xa", 128 * MIB).await;
    let b = t.volume("xb", 128 * MIB).await;
    let (sa, ta) = t.up(&a, "a").await;
    let (sb, tb) = t.up(&b, "b").await;
    for (i, dir) in [&ta, &tb].iter().enumerate() {
        let mut f = std::fs::File::create(dir.join("data")).unwrap();
        f.write_all(&pattern(48 * MIB as usize, i as u64)).unwrap();
        f.sync_all().unwrap();
    }
    let free_before = nix::sys::statvfs::statvfs(&t.d.pool)
        .unwrap()
        .blocks_available();
    let g = t.group("xg", &[&a, &b]).await.expect("group on xfs");
    let st = nix::sys::statvfs::statvfs(&t.d.pool).unwrap();
    let used = free_before.saturating_sub(st.blocks_available()) * st.fragment_size();
    for s in &g.snapshots {
        let hex = s
            .snapshot_id
            .strip_prefix("snap-")
            .unwrap()
            .split('@')
            .next()
            .unwrap();
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(t.d.pool.join("snapshots").join(format!("{hex}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(rec["method"], "reflink", "{rec}");
        assert_eq!(rec["group_snapshot_id"], g.group_snapshot_id.as_str());
    }
    assert!(
        used < 8 * MIB as u64,
        "a reflink group snapshot of 2 × 48 MiB of data used {used} bytes"
    );
    assert_writable(&ta, "xfs A");
    assert_writable(&tb, "xfs B");
    t.down(&a, &sa, &ta).await;
    t.down(&b, &sb, &tb).await;
    t.delete_group(&g).await;
    let (mounts, loops) = t.d.leftovers();
    assert_eq!(mounts, vec![std::fs::canonicalize(&t.d.pool).unwrap()]);
    assert!(loops.is_empty(), "{loops:?}");
    drop(t);
    drop(xfs);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_staged_member_that_cannot_be_frozen_fails_the_group_and_changes_nothing() {
    if !root_or_skip("group_unfreezable") {
        return;
    }
    let mut t = Ctx::connect(Driver::start().await).await;
    let a = t.volume("ua", 16 * MIB).await;
    let (sa, ta) = t.up(&a, "a").await;
    // A raw block volume, staged: a writer could change it between two members' copies, and
    // there is no filesystem to freeze.
    let blk = block_cap(loopvol::csi::volume_capability::access_mode::Mode::SingleNodeWriter);
    let b = create_volume_id(&mut t.c, create_req("ub", 16 * MIB, blk.clone())).await;
    let sb = t.d.path("b-staging");
    std::fs::create_dir_all(&sb).unwrap();
    t.n.node_stage_volume(stage_req(&b, &sb, blk.clone()))
        .await
        .expect("stage the block volume");
    let e = t.group("mixed", &[&a, &b]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("cannot be frozen"), "{e}");
    assert!(t.snapshots().await.is_empty());
    assert_no_group_leftovers(&t.d.pool, "after the refusal");
    assert_writable(&ta, "the mounted member, after the refusal");
    // On its own, the block volume is a group of one (like a single snapshot).
    let solo = t
        .group("solo", &[&b])
        .await
        .expect("a group of one block volume");
    t.delete_group(&solo).await;
    // Unstaged, it has no writer, and the group is taken.
    t.n.node_unstage_volume(unstage_req(&b, &sb))
        .await
        .expect("unstage");
    let g = t
        .group("mixed", &[&a, &b])
        .await
        .expect("group once unstaged");
    assert_eq!(g.snapshots.len(), 2);
    t.delete_group(&g).await;
    t.down(&a, &sa, &ta).await;
    assert_no_group_leftovers(&t.d.pool, "at the end");
    t.d.assert_clean();
}
