//! Snapshots, restores and clones end to end: real filesystems, frozen while copied, restored
//! into new volumes that are staged and checked byte for byte.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::*;
use tonic::transport::Channel;
use tonic::Code;

struct Ctx {
    d: Driver,
    c: ControllerClient<Channel>,
    n: NodeClient<Channel>,
}

impl Ctx {
    async fn new() -> Ctx {
        let d = Driver::start().await;
        Self::connect(d).await
    }

    async fn connect(d: Driver) -> Ctx {
        let c = d.controller().await;
        let n = d.node().await;
        Ctx { d, c, n }
    }

    async fn create(&mut self, req: CreateVolumeRequest) -> Result<Volume, tonic::Status> {
        self.c
            .create_volume(req)
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    async fn snapshot(&mut self, name: &str, source: &str) -> Result<Snapshot, tonic::Status> {
        self.c
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().snapshot.unwrap())
    }

    /// Stage and publish with mount access; returns (staging, target).
    async fn up(&mut self, id: &str, tag: &str, fs: &str) -> (PathBuf, PathBuf) {
        let staging = self.d.path(&format!("staging-{tag}"));
        let target = self.d.path(&format!("pods/{tag}"));
        self.n
            .node_stage_volume(stage_req(id, &staging, rw_mount(fs)))
            .await
            .unwrap();
        self.n
            .node_publish_volume(publish_req(id, &staging, &target, rw_mount(fs)))
            .await
            .unwrap();
        (staging, target)
    }

    async fn down(&mut self, id: &str, staging: &Path, target: &Path) {
        self.n
            .node_unpublish_volume(unpublish_req(id, target))
            .await
            .unwrap();
        self.n
            .node_unstage_volume(unstage_req(id, staging))
            .await
            .unwrap();
    }

    /// The pool's record of a snapshot, as JSON (to see which copy path was used).
    fn snapshot_record(&self, id: &str) -> serde_json::Value {
        let hex = id
            .strip_prefix("snap-")
            .and_then(|s| s.split_once('@'))
            .unwrap()
            .0;
        let path = self.d.pool.join("snapshots").join(format!("{hex}.json"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn snapshot_image(&self, id: &str) -> PathBuf {
        let hex = id
            .strip_prefix("snap-")
            .and_then(|s| s.split_once('@'))
            .unwrap()
            .0;
        self.d.pool.join("snapshots").join(format!("{hex}.img"))
    }
}

fn from_snapshot(name: &str, bytes: i64, fs: &str, snapshot_id: &str) -> CreateVolumeRequest {
    let mut r = create_req(name, bytes, rw_mount(fs));
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.into(),
            },
        )),
    });
    r
}

fn from_volume(name: &str, bytes: i64, fs: &str, volume_id: &str) -> CreateVolumeRequest {
    let mut r = create_req(name, bytes, rw_mount(fs));
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: volume_id.into(),
            },
        )),
    });
    r
}

fn write_synced(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_of_a_mounted_volume_restores_with_its_data() {
    if !root_or_skip("snapshot_restore") {
        return;
    }
    let mut t = Ctx::new().await;
    let src = t
        .create(create_req("src", 64 * MIB, rw_mount("ext4")))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = t.up(&src, "src", "ext4").await;
    write_synced(&target.join("before"), &pattern(2 * MIB as usize, 11));
    let sum = sha256_file(&target.join("before"));

    let snap = t.snapshot("snap-1", &src).await.unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 64 * MIB);
    assert_eq!(snap.source_volume_id, src);
    assert!(snap.creation_time.unwrap().seconds > 0);
    let log = t.d.log();
    assert!(
        log.contains("filesystem frozen") && log.contains("filesystem thawed"),
        "the mounted source is frozen during the copy"
    );
    // The volume stays writable after the snapshot (thawed).
    write_synced(&target.join("after"), b"later");

    // Idempotent by name; the same name for another source is a conflict.
    assert_eq!(
        t.snapshot("snap-1", &src).await.unwrap().snapshot_id,
        snap.snapshot_id
    );
    let other = t
        .create(create_req("other", 8 * MIB, rw_mount("ext4")))
        .await
        .unwrap()
        .volume_id;
    assert_eq!(
        code_of(t.snapshot("snap-1", &other).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code_of(
            t.snapshot("x", &format!("vol-0123456789abcdef0123@{NODE}"))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(code_of(t.snapshot("", &src).await), Code::InvalidArgument);
    assert_eq!(code_of(t.snapshot("x", "").await), Code::InvalidArgument);

    // Restore into a bigger volume: data as at snapshot time, filesystem grown to the volume.
    let restored = t
        .create(from_snapshot(
            "restored",
            128 * MIB,
            "ext4",
            &snap.snapshot_id,
        ))
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, 128 * MIB);
    assert!(restored.content_source.is_some());
    let (rs, rt) = t.up(&restored.volume_id, "restored", "ext4").await;
    assert_eq!(sha256_file(&rt.join("before")), sum);
    assert!(
        !rt.join("after").exists(),
        "the snapshot predates this file"
    );
    let st = nix::sys::statvfs::statvfs(&rt).unwrap();
    assert!(
        st.blocks() * st.fragment_size() > 100 * MIB as u64,
        "restored filesystem grown to the volume"
    );
    t.down(&restored.volume_id, &rs, &rt).await;

    // Too small, unknown snapshot, and a different filesystem are refused.
    assert_eq!(
        code_of(
            t.create(from_snapshot("small", 16 * MIB, "ext4", &snap.snapshot_id))
                .await
        ),
        Code::OutOfRange
    );
    let unknown = format!("snap-0123456789abcdef0123@{NODE}");
    assert_eq!(
        code_of(
            t.create(from_snapshot("nosnap", 64 * MIB, "ext4", &unknown))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            t.create(from_snapshot("xfs", 512 * MIB, "xfs", &snap.snapshot_id))
                .await
        ),
        Code::InvalidArgument
    );

    // Deleting the source volume leaves the snapshot usable.
    t.down(&src, &staging, &target).await;
    t.c.delete_volume(DeleteVolumeRequest {
        volume_id: src.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let again = t
        .create(from_snapshot("again", 0, "", &snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(
        again.capacity_bytes,
        64 * MIB,
        "no size named: the snapshot's size"
    );
    let (gs, gt) = t.up(&again.volume_id, "again", "ext4").await;
    assert_eq!(sha256_file(&gt.join("before")), sum);
    t.down(&again.volume_id, &gs, &gt).await;

    // Listing: by id, by source, paginated; unknown filters give empty lists.
    let s2 = t.snapshot("snap-2", &again.volume_id).await.unwrap();
    let list = |snapshot_id: &str, source: &str, max: i32, token: &str| ListSnapshotsRequest {
        max_entries: max,
        starting_token: token.into(),
        source_volume_id: source.into(),
        snapshot_id: snapshot_id.into(),
        ..Default::default()
    };
    let by_id =
        t.c.list_snapshots(list(&s2.snapshot_id, "", 0, ""))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    let by_src =
        t.c.list_snapshots(list("", &again.volume_id, 0, ""))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        by_src.entries[0].snapshot.as_ref().unwrap().snapshot_id,
        s2.snapshot_id
    );
    let page1 =
        t.c.list_snapshots(list("", "", 1, ""))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(page1.entries.len(), 1);
    let page2 =
        t.c.list_snapshots(list("", "", 1, &page1.next_token))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(page2.entries.len(), 1);
    assert!(page2.next_token.is_empty());
    assert_ne!(
        page1.entries[0].snapshot.as_ref().unwrap().snapshot_id,
        page2.entries[0].snapshot.as_ref().unwrap().snapshot_id
    );
    assert!(t
        .c
        .list_snapshots(list(&unknown, "", 0, ""))
        .await
        .unwrap()
        .into_inner()
        .entries
        .is_empty());
    assert_eq!(
        code_of(t.c.list_snapshots(list("", "", 0, "nonsense")).await),
        Code::Aborted
    );
    let got =
        t.c.get_snapshot(GetSnapshotRequest {
            snapshot_id: s2.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        got.into_inner().snapshot.unwrap().source_volume_id,
        again.volume_id
    );

    for s in [
        &snap.snapshot_id,
        &s2.snapshot_id,
        &snap.snapshot_id,
        &unknown,
    ] {
        t.c.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(std::fs::read_dir(t.d.pool.join("snapshots"))
        .unwrap()
        .next()
        .is_none());
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn clone_of_a_staged_xfs_volume() {
    if !root_or_skip("clone") {
        return;
    }
    let mut t = Ctx::new().await;
    let src = t
        .create(create_req("clone-src", 300 * MIB, rw_mount("xfs")))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = t.up(&src, "src", "xfs").await;
    write_synced(&target.join("data"), &pattern(3 * MIB as usize, 5));
    let sum = sha256_file(&target.join("data"));
    let clone = t
        .create(from_volume("clone", 0, "xfs", &src))
        .await
        .unwrap();
    assert_eq!(clone.capacity_bytes, 300 * MIB);
    let unknown = format!("vol-0123456789abcdef0123@{NODE}");
    assert_eq!(
        code_of(t.create(from_volume("c2", 0, "xfs", &unknown)).await),
        Code::NotFound
    );
    // Staging the clone while the source is staged works: xfs clones keep the source's UUID,
    // so this also proves the second mount is accepted.
    let (cs, ct) = t.up(&clone.volume_id, "clone", "xfs").await;
    assert_eq!(sha256_file(&ct.join("data")), sum);
    t.down(&clone.volume_id, &cs, &ct).await;
    t.down(&src, &staging, &target).await;
    t.d.assert_clean();
}

/// btrfs reports an anonymous device (0:N) as st_dev rather than its loop device, so the
/// freeze's "is this the volume's own filesystem?" check must look at the mount: a snapshot of
/// a staged btrfs volume is frozen and restores with its data.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_of_a_staged_btrfs_volume_is_frozen_and_restores() {
    if !root_or_skip("btrfs snapshot") {
        return;
    }
    let mut t = Ctx::new().await;
    let src = t
        .create(create_req("btrfs-src", 256 * MIB, rw_mount("btrfs")))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = t.up(&src, "src", "btrfs").await;
    write_synced(&target.join("data"), &pattern(2 * MIB as usize, 9));
    let sum = sha256_file(&target.join("data"));
    let snap = t.snapshot("btrfs-snap", &src).await.unwrap();
    assert!(
        t.d.log().contains("filesystem frozen"),
        "the staged btrfs source must be frozen for its snapshot:\n{}",
        t.d.log()
    );
    // Thawed again: the source takes writes.
    write_synced(&target.join("after"), b"still writable");
    let restored = t
        .create(from_snapshot(
            "btrfs-restored",
            0,
            "btrfs",
            &snap.snapshot_id,
        ))
        .await
        .unwrap();
    t.down(&src, &staging, &target).await;
    let (rs, rt) = t.up(&restored.volume_id, "restored", "btrfs").await;
    assert_eq!(sha256_file(&rt.join("data")), sum);
    assert!(!rt.join("after").exists());
    t.down(&restored.volume_id, &rs, &rt).await;
    t.d.assert_clean();
}

/// A snapshot of a mostly empty 10 GiB thin volume costs what its data costs.
#[tokio::test(flavor = "multi_thread")]
async fn sparse_snapshot_of_a_big_thin_volume_costs_its_data() {
    if !root_or_skip("sparse_snapshot") {
        return;
    }
    let mut t = Ctx::new().await;
    let src = t
        .create(create_req("big", 10 << 30, rw_mount("ext4")))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = t.up(&src, "big", "ext4").await;
    write_synced(&target.join("ten"), &pattern(10 * MIB as usize, 3));
    t.down(&src, &staging, &target).await;
    let source_bytes = std::fs::metadata(t.d.image_of(&src)).unwrap().blocks() * 512;
    let started = std::time::Instant::now();
    let snap = t.snapshot("big-snap", &src).await.unwrap();
    let took = started.elapsed();
    let record = t.snapshot_record(&snap.snapshot_id);
    let snap_bytes = std::fs::metadata(t.snapshot_image(&snap.snapshot_id))
        .unwrap()
        .blocks()
        * 512;
    eprintln!(
        "10 GiB thin volume with 10 MiB of data: source allocates {} MiB, snapshot {} MiB via {}, in {:?}",
        source_bytes >> 20,
        snap_bytes >> 20,
        record["method"],
        took
    );
    assert_eq!(
        std::fs::metadata(t.snapshot_image(&snap.snapshot_id))
            .unwrap()
            .len(),
        10 << 30
    );
    assert!(
        snap_bytes <= source_bytes + MIB as u64,
        "snapshot {snap_bytes} > source {source_bytes}"
    );
    assert!(
        snap_bytes < 200 * MIB as u64,
        "holes were copied: {snap_bytes} bytes"
    );
    if record["method"] == "sparse-copy" {
        assert!(
            snap_bytes >= 10 * MIB as u64,
            "the data itself must be copied"
        );
    }
    let restored = t
        .create(from_snapshot("big-restored", 0, "ext4", &snap.snapshot_id))
        .await
        .unwrap();
    let (rs, rt) = t.up(&restored.volume_id, "big-restored", "ext4").await;
    assert_eq!(
        sha256_file(&rt.join("ten")),
        sha256_file_from_pattern(10 * MIB as usize, 3)
    );
    t.down(&restored.volume_id, &rs, &rt).await;
    t.d.assert_clean();
}

fn sha256_file_from_pattern(len: usize, seed: u64) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(pattern(len, seed))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn reflink_snapshots_on_an_xfs_pool_share_extents() {
    if !root_or_skip("reflink") {
        return;
    }
    // Drop order: `t` (driver, its mounts, loops under its pool) goes before `xfs`.
    let (d, xfs) = driver_on_xfs_pool().await;
    let mut t = Ctx::connect(d).await;

    let src = t
        .create(create_req("rsrc", 256 * MIB, rw_mount("ext4")))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = t.up(&src, "rsrc", "ext4").await;
    write_synced(&target.join("data"), &pattern(64 * MIB as usize, 8));
    let sum = sha256_file(&target.join("data"));
    let free_before = nix::sys::statvfs::statvfs(&t.d.pool)
        .unwrap()
        .blocks_available();
    let snap = t.snapshot("rsnap", &src).await.unwrap();
    let st = nix::sys::statvfs::statvfs(&t.d.pool).unwrap();
    let used = (free_before.saturating_sub(st.blocks_available())) * st.fragment_size();
    assert_eq!(t.snapshot_record(&snap.snapshot_id)["method"], "reflink");
    assert!(
        used < 8 * MIB as u64,
        "a reflink snapshot of 64 MiB of data used {used} bytes"
    );
    t.down(&src, &staging, &target).await;
    let restored = t
        .create(from_snapshot("rrestored", 0, "ext4", &snap.snapshot_id))
        .await
        .unwrap();
    let (rs, rt) = t.up(&restored.volume_id, "rrestored", "ext4").await;
    assert_eq!(sha256_file(&rt.join("data")), sum);
    t.down(&restored.volume_id, &rs, &rt).await;
    let (mounts, loops) = t.d.leftovers();
    assert_eq!(
        mounts,
        vec![std::fs::canonicalize(&t.d.pool).unwrap()],
        "only the pool's own mount remains"
    );
    assert!(loops.is_empty(), "{loops:?}");
    drop(t);
    drop(xfs);
}
