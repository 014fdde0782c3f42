//! Restore and clone across nodes (issue 24): the router places the new volume where the
//! topology asks, and the target node pulls the data from the source's node over the pool
//! API's mTLS port, verified chunk by chunk and as a whole before the volume exists.

mod common;

use std::time::Duration;

use common::cluster::*;
use common::transfer::*;
use common::*;
use loopvol::csi::*;
use tonic::Code;

const ALL: &[&str] = &["n1", "n2", "n3"];
const WAIT: Duration = Duration::from_secs(120);

fn snapshot_image(cl: &Cluster, node: u8, snap_id: &str) -> std::path::PathBuf {
    let hex = provisioner::VolumeId::parse(provisioner::ids::Kind::Snapshot, snap_id)
        .unwrap()
        .hex;
    cl.pool(node).join("snapshots").join(format!("{hex}.img"))
}

/// `loopvol ARGS`'s standard output (it must succeed).
fn loopvol_out(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "loopvol {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn block_req(name: &str, bytes: i64) -> CreateVolumeRequest {
    create_req(
        name,
        bytes,
        block_cap(volume_capability::access_mode::Mode::SingleNodeWriter),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_and_clone_across_nodes_are_byte_identical_and_thin() {
    if !root_or_skip("transfer") {
        return;
    }
    // n1 serves /metrics, to count what it receives.
    let metrics = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let m = metrics.clone();
    let cl = Cluster::start_with(&|i| match i {
        1 => vec!["--metrics-address".into(), m.clone()],
        _ => Vec::new(),
    });
    let mut r = cl.router().await;

    // An ext4 volume on n3 with files in it, and a snapshot of it.
    let src = create_volume_id(
        &mut r,
        with_topology(
            create_req("src-ext4", 16 * MIB, rw_mount("ext4")),
            &["n3"],
            &["n3"],
        ),
    )
    .await;
    fill_ext4(&cl.image(3, &src), 7);
    let want = sha256_file(&cl.image(3, &src));
    let snap = create_snapshot_id(&mut r, &src, "snap-ext4").await;
    assert_eq!(sha256_file(&snapshot_image(&cl, 3, &snap)), want);

    // Restore as csi-provisioner asks without --strict-topology: preferred = [the scheduler's
    // node, …], requisite = every node (which contains n3, and still means n1).
    let restore = with_topology(
        from_snapshot(create_req("restore-n1", 16 * MIB, rw_mount("")), &snap),
        &["n1", "n2", "n3"],
        ALL,
    );
    let (v, _) = create_until_ready(&mut r, &restore, WAIT).await.unwrap();
    assert!(v.volume_id.ends_with("@n1"), "{}", v.volume_id);
    assert_eq!(
        sha256_file(&cl.image(1, &v.volume_id)),
        want,
        "restored bytes"
    );
    assert_eq!(
        v.volume_context.get("fsType").map(String::as_str),
        Some("ext4")
    );
    // A retry of the same name is the same volume (idempotent).
    let again = r.create_volume(restore.clone()).await.unwrap().into_inner();
    assert_eq!(again.volume.unwrap().volume_id, v.volume_id);

    // Clone of the volume with --strict-topology: requisite = preferred = [n2].
    let clone = with_topology(
        from_volume(create_req("clone-n2", 16 * MIB, rw_mount("")), &src),
        &["n2"],
        &["n2"],
    );
    let (c, _) = create_until_ready(&mut r, &clone, WAIT).await.unwrap();
    assert!(c.volume_id.ends_with("@n2"), "{}", c.volume_id);
    assert_eq!(
        sha256_file(&cl.image(2, &c.volume_id)),
        want,
        "cloned bytes"
    );
    // The temporary snapshot of the volume source is gone, and nothing is left anywhere.
    for n in 1..=3 {
        assert_no_leftovers(&cl.pool(n));
    }

    // Without topology the restore stays on the snapshot's node (no copy).
    let here = from_snapshot(create_req("restore-here", 16 * MIB, rw_mount("")), &snap);
    let (h, _) = create_until_ready(&mut r, &here, WAIT).await.unwrap();
    assert!(h.volume_id.ends_with("@n3"), "{}", h.volume_id);

    // Raw block: a 1 GiB thin volume with 64 MiB written sends about 64 MiB, stays thin.
    let blk = create_volume_id(
        &mut r,
        with_topology(block_req("src-block", 1024 * MIB), &["n3"], &["n3"]),
    )
    .await;
    let written = write_spread(&cl.image(3, &blk), 16, 4 << 20, 99);
    let want_blk = sha256_file(&cl.image(3, &blk));
    let clone_blk = with_topology(
        from_volume(block_req("clone-block", 1024 * MIB), &blk),
        &["n1"],
        ALL,
    );
    let before = metric(&metrics, "loopvol_transfer_bytes_total").unwrap();
    let (b, _) = create_until_ready(&mut r, &clone_blk, WAIT).await.unwrap();
    let counted = metric(&metrics, "loopvol_transfer_bytes_total").unwrap() - before;
    assert!(
        counted >= written as f64 && counted <= written as f64 * 1.1,
        "the metric counted {counted} bytes for {written} written"
    );
    assert_eq!(metric(&metrics, "loopvol_transfers_in_flight"), Some(0.0));
    assert!(b.volume_id.ends_with("@n1"), "{}", b.volume_id);
    let img = cl.image(1, &b.volume_id);
    assert_eq!(sha256_file(&img), want_blk, "block clone bytes");
    let sent = bytes_received_in_log(&cl.nodes[0].log, &b.volume_id).expect("a transfer log line");
    assert!(
        sent >= written && sent as f64 <= written as f64 * 1.1,
        "sent {sent} bytes for {written} written"
    );
    let alloc = allocated(&img);
    assert!(
        alloc <= written + (8 << 20),
        "thin target allocated {alloc}"
    );

    // Thick target: allocated in full on the target.
    let mut thick = with_topology(
        from_volume(block_req("clone-thick", 1024 * MIB), &blk),
        &["n2"],
        &["n2"],
    );
    thick.parameters.insert("allocation".into(), "thick".into());
    let (t, _) = create_until_ready(&mut r, &thick, WAIT).await.unwrap();
    let img = cl.image(2, &t.volume_id);
    assert_eq!(sha256_file(&img), want_blk, "thick clone bytes");
    assert!(
        allocated(&img) >= 1024 << 20,
        "thick target allocated {}",
        allocated(&img)
    );

    // The transfer service is on the pool API only, never on a CSI socket.
    let ch = tonic::transport::Endpoint::from_shared(format!("unix://{}", s(&cl.nodes[0].socket)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let read = loopvol::transfer_api::transfer_client::TransferClient::new(ch)
        .read(loopvol::transfer_api::ReadRequest {
            source_id: snap.clone(),
            transfer_id: "0123456789abcdef".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code_of(read), Code::Unimplemented);

    // Over the pool API a sink names the chunk digests it checks: XXH3-128 for this version, and
    // SHA-256 for a sink from before the field (which names none), so copies keep working
    // while a cluster's nodes are upgraded one by one. Each digest is checked here with the
    // digest crates directly, and the chunks are the snapshot image's bytes.
    let image = std::fs::read(snapshot_image(&cl, 3, &snap)).unwrap();
    for (asked, want_digest) in [(&[][..], "sha256"), (&["xxh128", "sha256"][..], "xxh128")] {
        let (h, chunks) = pool_api_read(&cl, 3, &snap, asked).await;
        assert_eq!(h.digest, want_digest, "asked for {asked:?}");
        assert!(!chunks.is_empty());
        for c in &chunks {
            let d: Vec<u8> = match want_digest {
                "sha256" => <sha2::Sha256 as sha2::Digest>::digest(&c.data).to_vec(),
                _ => xxhash_rust::xxh3::xxh3_128(&c.data).to_be_bytes().to_vec(),
            };
            assert_eq!(c.digest, d, "{want_digest} of the chunk at {}", c.offset);
            let at = c.offset as usize;
            assert_eq!(&image[at..at + c.data.len()], &c.data[..]);
        }
    }

    // A StorageClass cannot set the router's reserved parameter.
    let mut forged = create_req("forged", 16 * MIB, rw_mount(""));
    forged.parameters.insert(
        "loopvol.csi.dev/transfer-source".into(),
        "https://127.0.0.9:1".into(),
    );
    assert_eq!(
        code_of(r.create_volume(forged).await),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn long_copies_are_joined_cancelled_and_refused_cleanly() {
    if !root_or_skip("transfer") {
        return;
    }
    // 16 MiB/s: a copy of 128 MiB takes several CreateVolume calls. n2 is small, and the
    // copies it serves as a source are corrupted on the way (test-only knob).
    let cl = Cluster::start_with(&|i| {
        let mut a = vec!["--transfer-rate-limit".to_string(), "16Mi".to_string()];
        if i == 2 {
            a.extend(["--max-pool-bytes".into(), "300Mi".into()]);
            a.extend(["--test-corrupt-transfer-chunk".into(), "1".into()]);
        }
        a
    });
    let mut r = cl.router().await;
    let blk = create_volume_id(
        &mut r,
        with_topology(block_req("big", 1024 * MIB), &["n3"], &["n3"]),
    )
    .await;
    write_spread(&cl.image(3, &blk), 48, 4 << 20, 5);
    let want = sha256_file(&cl.image(3, &blk));
    let snap = create_snapshot_id(&mut r, &blk, "big-snap").await;

    // ABORTED with progress while it runs; the same name with another source is refused;
    // the retries end in the volume.
    let req = with_topology(
        from_volume(block_req("slow", 1024 * MIB), &blk),
        &["n1"],
        ALL,
    );
    let first = r.create_volume(req.clone()).await.unwrap_err();
    assert_eq!(first.code(), Code::Aborted, "{first:?}");
    assert!(
        first.message().starts_with("copying: "),
        "{}",
        first.message()
    );
    assert!(first.message().contains(" %, "), "{}", first.message());
    let other = with_topology(
        from_snapshot(block_req("slow", 1024 * MIB), &snap),
        &["n1"],
        ALL,
    );
    assert_eq!(code_of(r.create_volume(other).await), Code::AlreadyExists);
    // The operator sees it being filled.
    let pool1 = s(&cl.pool(1));
    let list = loopvol_out(&["volume", "list", "--pool-dir", &pool1]);
    assert!(list.contains("slow") && list.contains("filling "), "{list}");
    let status = loopvol_out(&["status", "--pool-dir", &pool1]);
    assert!(
        status.contains("FILLING VOLUME") && status.contains("filling "),
        "{status}"
    );
    let (v, aborted) = create_until_ready(&mut r, &req, WAIT).await.unwrap();
    assert!(!aborted.is_empty() || v.volume_id.ends_with("@n1"));
    assert_eq!(sha256_file(&cl.image(1, &v.volume_id)), want);
    assert_no_leftovers(&cl.pool(1));

    // DeleteVolume of a volume still being filled cancels the copy and leaves nothing.
    let victim = with_topology(
        from_snapshot(block_req("victim", 1024 * MIB), &snap),
        &["n1"],
        ALL,
    );
    let e = r.create_volume(victim.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    let id = volume_in_message(e.message()).expect("the message names the volume");
    r.delete_volume(DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_no_leftovers(&cl.pool(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !cl.image(1, &id).exists(),
        "a cancelled copy became a volume"
    );
    assert_no_leftovers(&cl.pool(1));

    // kill -9 of the target mid-copy: at its next start the copy resumes from scratch, and
    // the CO's retry gets the complete volume; nothing is left behind.
    let resumed = with_topology(
        from_snapshot(block_req("resumed", 1024 * MIB), &snap),
        &["n1"],
        ALL,
    );
    let e = r.create_volume(resumed.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    let mut cl = cl;
    cl.nodes[0].kill9();
    assert!(cl.pool(1).join("transfers").read_dir().unwrap().count() == 1);
    cl.nodes[0].spawn();
    let (v, _) = create_until_ready(&mut r, &resumed, WAIT).await.unwrap();
    assert_eq!(sha256_file(&cl.image(1, &v.volume_id)), want);
    assert_no_leftovers(&cl.pool(1));

    // kill -9 of the source mid-stream: the copy fails as UNAVAILABLE (never NOT_FOUND) and
    // keeps nothing; the source's temporary snapshot is gone after its restart, and the CO's
    // retry then completes the volume.
    let from_vol = with_topology(
        from_volume(block_req("src-killed", 1024 * MIB), &blk),
        &["n1"],
        ALL,
    );
    let e = r.create_volume(from_vol.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    cl.nodes[2].kill9();
    let mut codes = Vec::new();
    for _ in 0..100 {
        let c = code_of(r.create_volume(from_vol.clone()).await);
        codes.push(c);
        if c != Code::Aborted {
            break;
        }
    }
    assert_eq!(codes.last(), Some(&Code::Unavailable), "{codes:?}");
    assert_no_leftovers(&cl.pool(1));
    cl.nodes[2].spawn();
    assert_no_leftovers(&cl.pool(3));
    let (v, _) = create_until_ready(&mut r, &from_vol, WAIT).await.unwrap();
    assert_eq!(sha256_file(&cl.image(1, &v.volume_id)), want);
    assert_no_leftovers(&cl.pool(1));
    assert_no_leftovers(&cl.pool(3));

    // A target that cannot hold it: RESOURCE_EXHAUSTED before any byte moves.
    let big = with_topology(
        from_snapshot(block_req("too-big", 1024 * MIB), &snap),
        &["n2"],
        &["n2"],
    );
    assert_eq!(code_of(r.create_volume(big).await), Code::ResourceExhausted);
    assert_no_leftovers(&cl.pool(2));
    assert_eq!(
        std::fs::read_dir(cl.pool(2).join("volumes"))
            .unwrap()
            .count(),
        0
    );

    // A chunk corrupted on the way (n2 flips a byte as a source) never becomes a volume.
    let bad_src = create_volume_id(
        &mut r,
        with_topology(block_req("bad-src", 64 * MIB), &["n2"], &["n2"]),
    )
    .await;
    write_spread(&cl.image(2, &bad_src), 4, 4 << 20, 11);
    let bad = with_topology(
        from_volume(block_req("bad", 64 * MIB), &bad_src),
        &["n1"],
        ALL,
    );
    let mut refused = String::new();
    for _ in 0..50 {
        let e = r.create_volume(bad.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{e:?}");
        if e.message().contains("failed verification") {
            refused = e.message().to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(refused.contains("xxh128 digest"), "{refused}");
    assert_no_leftovers(&cl.pool(1));
    let vols: Vec<_> = std::fs::read_dir(cl.pool(1).join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(vols.len(), 6, "only the three finished copies: {vols:?}");

    // The source's node is down: UNAVAILABLE (the sidecar retries), never NOT_FOUND.
    cl.nodes[1].stop();
    let gone = with_topology(
        from_volume(block_req("gone", 64 * MIB), &bad_src),
        &["n1"],
        ALL,
    );
    assert_eq!(code_of(r.create_volume(gone).await), Code::Unavailable);
    assert_no_leftovers(&cl.pool(1));
}

/// A clone of a volume that is mounted on its node is copied from a frozen, consistent point
/// (the source's temporary snapshot is taken as CreateSnapshot takes one): the clone holds
/// every write that completed before the call, and its filesystem is clean.
#[tokio::test(flavor = "multi_thread")]
async fn a_mounted_source_is_cloned_across_nodes_from_a_frozen_point() {
    if !root_or_skip("transfer") {
        return;
    }
    let cl = Cluster::start();
    let mut r = cl.router().await;
    let src = create_volume_id(
        &mut r,
        with_topology(
            create_req("live", 64 * MIB, rw_mount("ext4")),
            &["n3"],
            &["n3"],
        ),
    )
    .await;
    let mut n3 = cl.node_client(3).await;
    let staging = cl.stage_dir(3).join("staging");
    let target = cl.stage_dir(3).join("pod");
    n3.node_stage_volume(stage_req(&src, &staging, rw_mount("ext4")))
        .await
        .unwrap();
    n3.node_publish_volume(publish_req(&src, &staging, &target, rw_mount("ext4")))
        .await
        .unwrap();
    let data = pattern(3 << 20, 42);
    {
        use std::io::Write;
        // Written and closed, not synced: the freeze must flush it into the copy.
        let mut f = std::fs::File::create(target.join("data")).unwrap();
        f.write_all(&data).unwrap();
    }
    let clone = with_topology(
        from_volume(create_req("live-clone", 64 * MIB, rw_mount("")), &src),
        &["n1"],
        ALL,
    );
    let (v, _) = create_until_ready(&mut r, &clone, WAIT).await.unwrap();
    assert!(v.volume_id.ends_with("@n1"), "{}", v.volume_id);
    let img = cl.image(1, &v.volume_id);
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "the clone is not clean: {fsck:?}");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /data"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.stdout == data,
        "the clone lacks the data written before the call"
    );
    let log = std::fs::read_to_string(&cl.nodes[2].log).unwrap();
    assert!(
        log.contains("filesystem frozen") && log.contains("filesystem thawed"),
        "the source was not frozen for its copy"
    );
    n3.node_unpublish_volume(unpublish_req(&src, &target))
        .await
        .unwrap();
    n3.node_unstage_volume(unstage_req(&src, &staging))
        .await
        .unwrap();
    assert_no_leftovers(&cl.pool(3));
}

/// xfs and btrfs restore and clone across nodes as ext4 does (the engine copies images, so
/// this checks that nothing in the path depends on the filesystem).
#[tokio::test(flavor = "multi_thread")]
async fn xfs_and_btrfs_restore_and_clone_across_nodes() {
    if !root_or_skip("transfer") {
        return;
    }
    let cl = Cluster::start();
    let mut r = cl.router().await;
    for (fs, size) in [("xfs", 320 * MIB), ("btrfs", 160 * MIB)] {
        let src = create_volume_id(
            &mut r,
            with_topology(
                create_req(&format!("src-{fs}"), size, rw_mount(fs)),
                &["n2"],
                &["n2"],
            ),
        )
        .await;
        make_fs(&cl.image(2, &src), fs, 21);
        let want = sha256_file(&cl.image(2, &src));
        let snap = create_snapshot_id(&mut r, &src, &format!("snap-{fs}")).await;
        let restore = with_topology(
            from_snapshot(
                create_req(&format!("restore-{fs}"), size, rw_mount("")),
                &snap,
            ),
            &["n1"],
            ALL,
        );
        let (v, _) = create_until_ready(&mut r, &restore, WAIT).await.unwrap();
        assert!(v.volume_id.ends_with("@n1"), "{}", v.volume_id);
        assert_eq!(v.volume_context.get("fsType").map(String::as_str), Some(fs));
        assert_eq!(
            sha256_file(&cl.image(1, &v.volume_id)),
            want,
            "{fs} restore"
        );
        let clone = with_topology(
            from_volume(create_req(&format!("clone-{fs}"), size, rw_mount(fs)), &src),
            &["n3"],
            &["n3"],
        );
        let (c, _) = create_until_ready(&mut r, &clone, WAIT).await.unwrap();
        assert!(c.volume_id.ends_with("@n3"), "{}", c.volume_id);
        assert_eq!(sha256_file(&cl.image(3, &c.volume_id)), want, "{fs} clone");
    }
    for n in 1..=3 {
        assert_no_leftovers(&cl.pool(n));
    }
}

/// Not a check, a measurement (run with `--ignored --nocapture`): a clone across nodes of a
/// volume with 1 GiB of data, without a rate cap, on this machine's loopback; the rate the
/// target's log line reports.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_cross_node_clone_of_1_gib() {
    if !root_or_skip("transfer") {
        return;
    }
    let cl = Cluster::start_with(&|_| vec!["--transfer-rate-limit".into(), "0".into()]);
    let mut r = cl.router().await;
    let src = create_volume_id(
        &mut r,
        with_topology(block_req("m-src", 2048 * MIB), &["n3"], &["n3"]),
    )
    .await;
    let written = write_spread(&cl.image(3, &src), 256, 4 << 20, 3);
    let req = with_topology(
        from_volume(block_req("m-dst", 2048 * MIB), &src),
        &["n1"],
        ALL,
    );
    let started = std::time::Instant::now();
    let (v, _) = create_until_ready(&mut r, &req, Duration::from_secs(600))
        .await
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(&cl.nodes[0].log).unwrap();
    let line = log
        .lines()
        .rfind(|l| l.contains("transfer finished") && l.contains(&v.volume_id))
        .unwrap();
    println!(
        "{written} bytes of data: {secs:.2} s end to end ({:.0} MiB/s); {line}",
        written as f64 / secs / (1 << 20) as f64
    );
}

/// An encrypted volume's snapshot restored on another node is still ciphertext under the
/// source's salt: the same Secret opens it there and another is refused (the transfer header
/// carries the salt into the new record).
#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_volume_restored_on_another_node_opens_with_its_secret_only() {
    if !root_or_skip("transfer") {
        return;
    }
    const KEY: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const OTHER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let secrets = |k: &str| std::collections::HashMap::from([("key".to_string(), k.to_string())]);
    let cl = Cluster::start();
    let mut r = cl.router().await;
    let mut req = with_topology(
        create_req("sealed", 64 * MIB, rw_mount("ext4")),
        &["n3"],
        &["n3"],
    );
    req.parameters.insert("encryption".into(), "fscrypt".into());
    let src = create_volume_id(&mut r, req).await;

    // Written on n3 through the pod's (encrypted) directory.
    let mut n3 = cl.node_client(3).await;
    let (staging3, pod3) = (cl.stage_dir(3).join("staging"), cl.stage_dir(3).join("pod"));
    let mut stage = stage_req(&src, &staging3, rw_mount("ext4"));
    stage.secrets = secrets(KEY);
    n3.node_stage_volume(stage).await.unwrap();
    n3.node_publish_volume(publish_req(&src, &staging3, &pod3, rw_mount("ext4")))
        .await
        .unwrap();
    let data = pattern(1 << 20, 9);
    std::fs::write(pod3.join("ledger-across-nodes"), &data).unwrap();
    n3.node_unpublish_volume(unpublish_req(&src, &pod3))
        .await
        .unwrap();
    n3.node_unstage_volume(unstage_req(&src, &staging3))
        .await
        .unwrap();
    let snap = create_snapshot_id(&mut r, &src, "sealed-snap").await;

    // Restored on n1 from a class that does not name encryption: it stays encrypted.
    let restore = with_topology(
        from_snapshot(create_req("sealed-on-n1", 64 * MIB, rw_mount("")), &snap),
        &["n1"],
        &["n1"],
    );
    let (v, _) = create_until_ready(&mut r, &restore, WAIT).await.unwrap();
    assert!(v.volume_id.ends_with("@n1"), "{}", v.volume_id);
    let list = loopvol_out(&["volume", "list", "--pool-dir", &s(&cl.pool(1))]);
    let line = list.lines().find(|l| l.contains("sealed-on-n1"));
    assert!(
        line.is_some_and(|l| l.contains("fscrypt")),
        "not recorded as encrypted: {list}"
    );

    let mut n1 = cl.node_client(1).await;
    let (staging1, pod1) = (cl.stage_dir(1).join("staging"), cl.stage_dir(1).join("pod"));
    let mut wrong = stage_req(&v.volume_id, &staging1, rw_mount("ext4"));
    wrong.secrets = secrets(OTHER);
    let e = n1.node_stage_volume(wrong).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let mut right = stage_req(&v.volume_id, &staging1, rw_mount("ext4"));
    right.secrets = secrets(KEY);
    n1.node_stage_volume(right).await.unwrap();
    n1.node_publish_volume(publish_req(
        &v.volume_id,
        &staging1,
        &pod1,
        rw_mount("ext4"),
    ))
    .await
    .unwrap();
    let read = std::fs::read(pod1.join("ledger-across-nodes"));
    n1.node_unpublish_volume(unpublish_req(&v.volume_id, &pod1))
        .await
        .unwrap();
    n1.node_unstage_volume(unstage_req(&v.volume_id, &staging1))
        .await
        .unwrap();
    assert!(read.unwrap() == data, "the restored file differs");
}
