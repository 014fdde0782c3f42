//! Restore and clone across nodes (issue 24) over a real network: node plugins each in a
//! network namespace and a container of their own, with their own pools, and a router in a
//! namespace of its own (tests/common/netcluster.rs). Every filesystem and raw block land
//! byte-identical on the node the topology names, only allocated bytes cross the wire (counted
//! by the kernel on the target's interface), kill -9 of any of the three processes mid-copy
//! keeps the invariants of issue 24 item 4, and the evacuation procedure of docs/kubernetes.md
//! runs as written.

mod common;

use std::time::{Duration, Instant};

use common::netcluster::{NetCluster, Options, Victim};
use common::transfer::*;
use common::*;
use loopvol::csi::*;
use rand::Rng;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(120);

/// The data of the fault rounds' source: 2 s of copy at their 16 MiB/s cap.
const DATA: u64 = 32 << 20;

fn block_req(name: &str, bytes: i64) -> CreateVolumeRequest {
    create_req(
        name,
        bytes,
        block_cap(volume_capability::access_mode::Mode::SingleNodeWriter),
    )
}

/// As csi-provisioner asks with WaitForFirstConsumer and --strict-topology: the one node.
fn on(req: CreateVolumeRequest, node: &str) -> CreateVolumeRequest {
    with_topology(req, &[node], &[node])
}

async fn snapshot(cl: &NetCluster, source: &str, name: &str) -> String {
    create_snapshot_id(&mut cl.router().await, source, name).await
}

async fn delete(cl: &NetCluster, id: &str) {
    cl.router()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Stage `id` on node `i` as kubelet does, write or check `data` in a file, unstage.
async fn through_stage(cl: &NetCluster, i: usize, id: &str, fs: &str, data: &[u8], write: bool) {
    let n = cl.node(i);
    let rel = format!("staging/{}", hex_of(id));
    let (staging, host) = n.kubelet_path(&rel);
    let mut node = n.node().await;
    node.node_stage_volume(stage_req(id, &staging, rw_mount(fs)))
        .await
        .unwrap_or_else(|e| panic!("stage {id} on n{i}: {e}"));
    let file = host.join("data");
    if write {
        std::fs::write(&file, data).unwrap();
        std::fs::File::open(&file).unwrap().sync_all().unwrap();
    } else {
        let got = std::fs::read(&file).unwrap_or_else(|e| panic!("read {id} on n{i}: {e}"));
        assert!(got == data, "{fs} volume {id} on n{i}: the file differs");
    }
    node.node_unstage_volume(unstage_req(id, &staging))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fs_and_block_restore_and_clone_across_namespaces_byte_identical_and_thin() {
    if !root_or_skip("transfer_netns") {
        return;
    }
    let cl = NetCluster::start_with(
        2,
        &Options {
            pool_bytes: Some(3 << 30),
            ..Default::default()
        },
    )
    .await;
    let mut r = cl.router().await;
    let (n1, n2) = (cl.node(1), cl.node(2));

    // A filesystem volume of each kind on n1, written through the node plugin's mount;
    // restored from its snapshot and cloned onto n2, where the file reads back.
    for (k, fs) in ["ext4", "xfs", "btrfs"].into_iter().enumerate() {
        let size = 320 * MIB; // mkfs.xfs wants at least 300 MB
        let src = create_volume_id(
            &mut r,
            on(create_req(&format!("src-{fs}"), size, rw_mount(fs)), "n1"),
        )
        .await;
        let data = pattern(3 << 20, k as u64);
        through_stage(&cl, 1, &src, fs, &data, true).await;
        let want = sha256_file(&n1.image(&src));
        let snap = snapshot(&cl, &src, &format!("snap-{fs}")).await;
        assert_eq!(
            sha256_file(&n1.snapshot_image(&snap)),
            want,
            "{fs} snapshot"
        );

        let restore = on(
            from_snapshot(
                create_req(&format!("restore-{fs}"), size, rw_mount(fs)),
                &snap,
            ),
            "n2",
        );
        let (v, _) = create_until_ready(&mut r, &restore, WAIT).await.unwrap();
        assert!(v.volume_id.ends_with("@n2"), "{}", v.volume_id);
        assert_eq!(sha256_file(&n2.image(&v.volume_id)), want, "{fs} restore");
        let clone = on(
            from_volume(create_req(&format!("clone-{fs}"), size, rw_mount(fs)), &src),
            "n2",
        );
        let (c, _) = create_until_ready(&mut r, &clone, WAIT).await.unwrap();
        assert!(c.volume_id.ends_with("@n2"), "{}", c.volume_id);
        assert_eq!(sha256_file(&n2.image(&c.volume_id)), want, "{fs} clone");
        for id in [&v.volume_id, &c.volume_id] {
            through_stage(&cl, 2, id, fs, &data, false).await;
            delete(&cl, id).await;
        }
    }

    // Raw block: a 1 GiB thin volume with 64 MiB written sends about 64 MiB — counted by the
    // target's own interface, every header of every layer included — and stays thin.
    let blk = create_volume_id(&mut r, on(block_req("src-block", 1024 * MIB), "n1")).await;
    write_spread(&n1.image(&blk), 16, 4 << 20, 9);
    let alloc = allocated(&n1.image(&blk));
    let want = sha256_file(&n1.image(&blk));
    let snap = snapshot(&cl, &blk, "snap-block").await;
    let rx = n2.member.rx_bytes();
    let (b, _) = create_until_ready(
        &mut r,
        &on(
            from_snapshot(block_req("restore-block", 1024 * MIB), &snap),
            "n2",
        ),
        WAIT,
    )
    .await
    .unwrap();
    let wire = n2.member.rx_bytes() - rx;
    assert!(b.volume_id.ends_with("@n2"), "{}", b.volume_id);
    assert_eq!(sha256_file(&n2.image(&b.volume_id)), want, "block restore");
    let sent = bytes_received_in_log(&n2.plugin.log, &b.volume_id).expect("a transfer log line");
    eprintln!("block: {alloc} bytes allocated, {sent} sent, {wire} on n2's wire");
    assert!(sent <= alloc * 11 / 10, "sent {sent} for {alloc} allocated");
    assert!(
        wire <= alloc * 11 / 10,
        "{wire} bytes on the wire for {alloc} allocated"
    );
    assert!(
        allocated(&n2.image(&b.volume_id)) <= alloc + (8 << 20),
        "the thin target allocated {}",
        allocated(&n2.image(&b.volume_id))
    );
    delete(&cl, &b.volume_id).await;

    // Thick source, thick target: allocated in full on n2, same bytes.
    let mut thick = on(block_req("src-thick", 128 * MIB), "n1");
    thick.parameters.insert("allocation".into(), "thick".into());
    let tk = create_volume_id(&mut r, thick).await;
    write_spread(&n1.image(&tk), 4, 1 << 20, 3);
    let want = sha256_file(&n1.image(&tk));
    let mut copy = on(from_volume(block_req("clone-thick", 128 * MIB), &tk), "n2");
    copy.parameters.insert("allocation".into(), "thick".into());
    let (t, _) = create_until_ready(&mut r, &copy, WAIT).await.unwrap();
    assert_eq!(sha256_file(&n2.image(&t.volume_id)), want, "thick clone");
    assert!(
        allocated(&n2.image(&t.volume_id)) >= 128 << 20,
        "the thick target allocated {}",
        allocated(&n2.image(&t.volume_id))
    );
    for i in [1, 2] {
        cl.assert_settled(i).await;
    }
}

/// The copies the fault rounds make: a snapshot or a volume of n1, onto n2.
fn round_req(round: usize, from_snap: bool, snap: &str, vol: &str) -> CreateVolumeRequest {
    let name = format!("copy-{round}");
    let req = block_req(&name, 256 * MIB);
    on(
        if from_snap {
            from_snapshot(req, snap)
        } else {
            from_volume(req, vol)
        },
        "n2",
    )
}

/// CreateVolume retried as csi-provisioner does (ABORTED, UNAVAILABLE, a broken connection)
/// until it succeeds; NOT_FOUND is never an answer while the source exists.
async fn retry_until_created(cl: &NetCluster, req: &CreateVolumeRequest) -> Volume {
    let until = Instant::now() + WAIT;
    loop {
        let mut r = cl.router().await;
        match r.create_volume(req.clone()).await {
            Ok(v) => return v.into_inner().volume.unwrap(),
            Err(e) => {
                assert_ne!(e.code(), Code::NotFound, "{}: {e:?}", req.name);
                assert!(
                    Instant::now() < until,
                    "{} never completed: {e:?}",
                    req.name
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Kills that must land while a copy is being filled, and the most rounds spent getting them.
const MID_STREAM_KILLS: usize = 21;
const MAX_ROUNDS: usize = 35;

/// kill -9 of the source node plugin, the target node plugin or the router at random points
/// of cross-node copies (rate-capped so they are hit mid-stream), then a restart and the CO's
/// retries of the same name: every copy completes byte-identical; while a process is down no
/// half-copied image is a volume and a gone source is UNAVAILABLE, never NOT_FOUND; once
/// settled, no temp file, no transfer record and no promised capacity outlive the round.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_rounds_during_cross_node_copies_keep_the_invariants() {
    if !root_or_skip("transfer_netns kill -9") {
        return;
    }
    let rate = |_: usize| vec!["--transfer-rate-limit".to_string(), "16Mi".to_string()];
    let mut cl = NetCluster::start_with(
        2,
        &Options {
            node_args: Some(&rate),
            ..Default::default()
        },
    )
    .await;
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut r = cl.router().await;
    let vol = create_volume_id(&mut r, on(block_req("src", 256 * MIB), "n1")).await;
    write_spread(&cl.node(1).image(&vol), DATA / (4 << 20), 4 << 20, 1);
    let want = sha256_file(&cl.node(1).image(&vol));
    let snap = snapshot(&cl, &vol, "src-snap").await;
    let victims = [Victim::Node(1), Victim::Node(2), Victim::Router];
    let (mut mid_stream, mut source_gone_codes) = (0, Vec::new());
    // Rounds go on until 21 kills have hit a copy mid-stream: on a loaded machine a kill can
    // land before a copy starts or after it ends, and such a round does not count.
    let mut round = 0usize;
    while mid_stream < MID_STREAM_KILLS && round < MAX_ROUNDS {
        let victim = victims[round % 3];
        let req = round_req(round, rng.random_bool(0.5), &snap, &vol);
        // The first call waits for the copy (up to 5 s) while the victim is killed under it.
        let (mut c, first_req) = (cl.router().await, req.clone());
        let first = tokio::spawn(async move { c.create_volume(first_req).await });
        // A random point of the copy: once the target's temp image holds that share of it.
        let point = (rng.random_range(0.0..0.9) * DATA as f64) as u64;
        let until = Instant::now() + Duration::from_secs(5);
        let hit = loop {
            let f = provisioner::pool::transfers::filling(&cl.node(2).pool);
            if f.iter().any(|f| f.allocated_bytes >= point) || Instant::now() > until {
                break !f.is_empty();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        mid_stream += hit as usize;
        cl.kill9(victim);
        // Whatever it answered (done, an error, a broken connection), the retries decide.
        let _ = first.await;
        for i in [1, 2] {
            let v = cl.in_flight_violations(i).await;
            assert!(v.is_empty(), "round {round}, {victim:?} down, n{i}: {v:?}");
        }
        if victim == Victim::Node(1) {
            // The source is gone: the copy cannot finish, and the answer says so retryably.
            for _ in 0..3 {
                match cl.router().await.create_volume(req.clone()).await {
                    Ok(_) => break, // it had finished before the kill
                    Err(e) => {
                        assert!(
                            matches!(e.code(), Code::Unavailable | Code::Aborted),
                            "round {round}: source gone answers {e:?}"
                        );
                        source_gone_codes.push(e.code());
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        cl.restart(victim).await;
        let v = retry_until_created(&cl, &req).await;
        assert!(v.volume_id.ends_with("@n2"), "{}", v.volume_id);
        assert_eq!(
            sha256_file(&cl.node(2).image(&v.volume_id)),
            want,
            "round {round} ({victim:?}): the copy's bytes"
        );
        for i in [1, 2] {
            cl.assert_settled(i).await;
        }
        delete(&cl, &v.volume_id).await;
        round += 1;
    }
    eprintln!(
        "{mid_stream} of {round} kills hit a copy mid-stream; source-gone answers: {source_gone_codes:?}"
    );
    assert!(
        mid_stream >= MID_STREAM_KILLS,
        "only {mid_stream} of {round} kills hit a copy mid-stream"
    );
    assert!(
        source_gone_codes.contains(&Code::Unavailable),
        "a killed source was never reported UNAVAILABLE: {source_gone_codes:?}"
    );
}

/// docs/kubernetes.md, "Evacuate a node": the CSI calls its StatefulSet procedure makes, in
/// its order — the old claim is deleted before the new one is restored, so the snapshot must
/// outlive its source — and the data reads back on the new node.
#[tokio::test(flavor = "multi_thread")]
async fn evacuating_a_node_moves_the_data_to_another_node() {
    if !root_or_skip("transfer_netns evacuation") {
        return;
    }
    let cl = NetCluster::start(2).await;
    let mut r = cl.router().await;
    // The workload's volume (claim data-web-0) on n1, the node to be drained.
    let old = create_volume_id(
        &mut r,
        on(
            create_req("pvc-data-web-0", 128 * MIB, rw_mount("ext4")),
            "n1",
        ),
    )
    .await;
    let data = pattern(5 << 20, 42);
    through_stage(&cl, 1, &old, "ext4", &data, true).await;
    // 2. VolumeSnapshot of data-web-0.
    let snap = snapshot(&cl, &old, "snapshot-data-web-0").await;
    // 4. The pod and the old claim are deleted: kubelet unstages (done above), the PV's
    //    reclaim policy deletes the volume. The snapshot stays, in n1's pool.
    delete(&cl, &old).await;
    assert!(!cl.node(1).image(&old).exists());
    assert!(cl.node(1).snapshot_image(&snap).exists());
    // 5. A claim of the same name from the snapshot, annotated with the new node: csi-provisioner
    //    asks for n2 only, and n2 pulls the data from n1's pool.
    let new_req = on(
        from_snapshot(
            create_req("pvc-data-web-0-again", 128 * MIB, rw_mount("ext4")),
            &snap,
        ),
        "n2",
    );
    let (new, _) = create_until_ready(&mut r, &new_req, WAIT).await.unwrap();
    assert!(new.volume_id.ends_with("@n2"), "{}", new.volume_id);
    // 6. The StatefulSet recreates web-0 on n2: kubelet stages the new volume, the data is in it.
    through_stage(&cl, 2, &new.volume_id, "ext4", &data, false).await;
    // 7. The snapshot is deleted: nothing of the workload stays on n1.
    r.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!cl.node(1).snapshot_image(&snap).exists());
    let left: Vec<_> = std::fs::read_dir(cl.node(1).pool.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "n1 still holds {left:?}");
    for i in [1, 2] {
        cl.assert_settled(i).await;
    }
}
