//! Changed-block tracking end to end (CSI SnapshotMetadata): a backup client rebuilds each new
//! snapshot from a copy of the previous one plus only the ranges GetMetadataDelta names, on an
//! ext4 pool (chunk digests) and on an xfs reflink pool (extent maps), through real loop
//! devices; allocated ranges, resumed streams and every error code.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::snapshot_metadata_client::SnapshotMetadataClient;
use loopvol::csi::volume_capability::access_mode::Mode;
use loopvol::csi::*;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic::Code;

const VOL: u64 = 64 << 20;
const BLOCK: u64 = 4096;
const CHUNK: u64 = 1 << 20;

struct Ctx {
    d: Driver,
    c: ControllerClient<Channel>,
    n: NodeClient<Channel>,
    m: SnapshotMetadataClient<Channel>,
}

impl Ctx {
    async fn connect(d: Driver) -> Ctx {
        let c = d.controller().await;
        let n = d.node().await;
        let m = SnapshotMetadataClient::new(
            tonic::transport::Endpoint::from_shared(format!("unix://{}", d.socket.display()))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        Ctx { d, c, n, m }
    }

    async fn volume(&mut self, name: &str, cap: VolumeCapability) -> String {
        self.c
            .create_volume(create_req(name, VOL as i64, cap))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    }

    async fn snapshot(&mut self, name: &str, source: &str) -> String {
        self.c
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
            .snapshot_id
    }

    async fn delete_snapshot(&mut self, id: &str) {
        self.c
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Stage with block access and publish onto a file; returns (staging, device file).
    async fn up_block(&mut self, id: &str) -> (PathBuf, PathBuf) {
        let staging = self.d.path("staging");
        let target = self.d.path("pods/dev");
        let cap = block_cap(Mode::SingleNodeWriter);
        self.n
            .node_stage_volume(stage_req(id, &staging, cap.clone()))
            .await
            .unwrap();
        self.n
            .node_publish_volume(publish_req(id, &staging, &target, cap))
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

    fn snapshot_file(&self, id: &str, ext: &str) -> PathBuf {
        let hex = id
            .strip_prefix("snap-")
            .and_then(|s| s.split_once('@'))
            .unwrap()
            .0;
        self.d.pool.join("snapshots").join(format!("{hex}.{ext}"))
    }

    async fn allocated(
        &mut self,
        id: &str,
        start: i64,
        max: i32,
    ) -> Result<(i64, Vec<(u64, u64)>), tonic::Status> {
        let mut s = self
            .m
            .get_metadata_allocated(GetMetadataAllocatedRequest {
                snapshot_id: id.into(),
                starting_offset: start,
                max_results: max,
                ..Default::default()
            })
            .await?
            .into_inner();
        let (mut cap, mut out) = (0, Vec::new());
        while let Some(msg) = s.message().await? {
            assert_eq!(
                msg.block_metadata_type,
                BlockMetadataType::VariableLength as i32
            );
            assert!(max == 0 || msg.block_metadata.len() <= max as usize);
            cap = msg.volume_capacity_bytes;
            out.extend(
                msg.block_metadata
                    .iter()
                    .map(|b| (b.byte_offset as u64, b.size_bytes as u64)),
            );
        }
        Ok((cap, out))
    }

    async fn delta(
        &mut self,
        base: &str,
        target: &str,
        start: i64,
        max: i32,
    ) -> Result<(i64, Vec<(u64, u64)>), tonic::Status> {
        let mut s = self
            .m
            .get_metadata_delta(GetMetadataDeltaRequest {
                base_snapshot_id: base.into(),
                target_snapshot_id: target.into(),
                starting_offset: start,
                max_results: max,
                ..Default::default()
            })
            .await?
            .into_inner();
        let (mut cap, mut out) = (0, Vec::new());
        while let Some(msg) = s.message().await? {
            assert!(max == 0 || msg.block_metadata.len() <= max as usize);
            cap = msg.volume_capacity_bytes;
            out.extend(
                msg.block_metadata
                    .iter()
                    .map(|b| (b.byte_offset as u64, b.size_bytes as u64)),
            );
        }
        Ok((cap, out))
    }
}

/// Ascending, non-overlapping, non-empty ranges inside `cap`.
fn assert_well_formed(ranges: &[(u64, u64)], cap: u64) {
    let mut end = 0;
    for &(off, len) in ranges {
        assert!(len > 0, "empty range in {ranges:?}");
        assert!(off >= end, "ranges overlap or go backwards: {ranges:?}");
        end = off + len;
    }
    assert!(end <= cap, "range past the end ({end} > {cap})");
}

nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);

/// One round of changes on the device: new bytes at random offsets (always the first and last
/// block, and a write across a chunk boundary), identical bytes over some blocks, discards.
fn mutate(dev: &File, rng: &mut rand::rngs::StdRng, round: u64) {
    let mut writes: Vec<(u64, u64)> = vec![
        (0, BLOCK),
        (VOL - BLOCK, BLOCK),
        // Across a 1 MiB chunk boundary.
        (
            rng.random_range(1..VOL / CHUNK) * CHUNK - 3 * BLOCK,
            6 * BLOCK,
        ),
    ];
    for _ in 0..rng.random_range(2..6) {
        let len = rng.random_range(1..64) * BLOCK;
        let off = rng.random_range(0..(VOL - len) / BLOCK) * BLOCK;
        writes.push((off, len));
    }
    for (i, (off, len)) in writes.into_iter().enumerate() {
        dev.write_all_at(&pattern(len as usize, round * 1000 + i as u64), off)
            .unwrap();
    }
    for _ in 0..3 {
        let off = rng.random_range(0..VOL / BLOCK - 16) * BLOCK;
        let mut same = vec![0u8; 16 * BLOCK as usize];
        dev.read_exact_at(&mut same, off).unwrap();
        dev.write_all_at(&same, off).unwrap();
    }
    dev.sync_all().unwrap();
    for _ in 0..2 {
        let len = rng.random_range(1..256) * BLOCK;
        let off = rng.random_range(0..(VOL - len) / BLOCK) * BLOCK;
        unsafe { blkdiscard(dev.as_raw_fd(), &[off, len]) }.expect("BLKDISCARD");
    }
    dev.sync_all().unwrap();
}

/// The backup test: 20 rounds of snapshot, change, snapshot, rebuild from the delta.
async fn backup_rounds(t: &mut Ctx, pool_kind: &str) {
    let vol = t.volume("backup", block_cap(Mode::SingleNodeWriter)).await;
    let (staging, target) = t.up_block(&vol).await;
    let dev = File::options()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    // Pattern A: a few MiB spread over the volume.
    for i in 0..8u64 {
        dev.write_all_at(
            &pattern(512 << 10, 7 + i),
            i * 7 * CHUNK + 12345 * BLOCK % CHUNK,
        )
        .unwrap();
    }
    dev.sync_all().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x15);
    let mut base = t.snapshot("round-0", &vol).await;
    let mut delta_bytes = 0u64;
    for round in 1..=20u64 {
        mutate(&dev, &mut rng, round);
        let next = t.snapshot(&format!("round-{round}"), &vol).await;
        if round == 10 && pool_kind == "ext4" {
            // Snapshots without digests (taken before digests existed): a direct comparison.
            std::fs::remove_file(t.snapshot_file(&next, "chunks")).unwrap();
        }
        let (cap, ranges) = t.delta(&base, &next, 0, 3).await.unwrap();
        assert_eq!(cap as u64, VOL);
        assert_well_formed(&ranges, VOL);
        // Rebuild: a copy of the base, plus only the delta's ranges read from the target.
        let mut rebuilt = std::fs::read(t.snapshot_file(&base, "img")).unwrap();
        let target_img = File::open(t.snapshot_file(&next, "img")).unwrap();
        rebuilt.resize(cap as usize, 0);
        for &(off, len) in &ranges {
            target_img
                .read_exact_at(&mut rebuilt[off as usize..(off + len) as usize], off)
                .unwrap();
            delta_bytes += len;
        }
        let want = std::fs::read(t.snapshot_file(&next, "img")).unwrap();
        assert!(
            rebuilt == want,
            "{pool_kind} round {round}: rebuilt snapshot differs from the target"
        );
        t.delete_snapshot(&base).await;
        base = next;
    }
    // Incremental: far less than 20 full copies.
    assert!(
        delta_bytes < 20 * VOL / 3,
        "{pool_kind}: the deltas named {delta_bytes} bytes over 20 rounds"
    );
    eprintln!(
        "{pool_kind}: deltas named {delta_bytes} bytes over 20 rounds of a {VOL}-byte volume"
    );
    // Each pool used the method meant for it (and ext4 the fallback where digests were gone).
    let log = t.d.log();
    let used =
        |m: &str| log.contains(&format!("method=\"{m}\"")) || log.contains(&format!("method={m} "));
    match pool_kind {
        "ext4" => assert!(
            used("digests") && used("compare") && !used("extents"),
            "{log}"
        ),
        _ => assert!(used("extents") && !used("digests"), "{log}"),
    }
    drop(dev);
    t.delete_snapshot(&base).await;
    t.down(&vol, &staging, &target).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_rebuilt_from_deltas_is_identical_on_an_ext4_pool() {
    if !root_or_skip("snapshot_metadata ext4") {
        return;
    }
    let d = Driver::start_on_small_fs(1 << 30, &[]).await;
    let mut t = Ctx::connect(d).await;
    backup_rounds(&mut t, "ext4").await;
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_rebuilt_from_deltas_is_identical_on_an_xfs_reflink_pool() {
    if !root_or_skip("snapshot_metadata xfs") {
        return;
    }
    // Drop order: `t` (driver, its mounts including the pool's, loops under it) before `xfs`.
    let (d, xfs) = driver_on_xfs_pool().await;
    let mut t = Ctx::connect(d).await;
    backup_rounds(&mut t, "xfs").await;
    drop(t);
    drop(xfs);
}

#[tokio::test(flavor = "multi_thread")]
async fn allocated_ranges_cover_the_written_data_and_streams_resume_exactly() {
    if !root_or_skip("snapshot_metadata allocated") {
        return;
    }
    let d = Driver::start().await;
    let mut t = Ctx::connect(d).await;
    let vol = t.volume("thin", block_cap(Mode::SingleNodeWriter)).await;
    let (staging, target) = t.up_block(&vol).await;
    let dev = File::options()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    // 10 MiB in 20 pieces of 512 KiB, 3 MiB apart (so the ranges stay separate).
    let written: Vec<(u64, u64)> = (0..20u64)
        .map(|i| (i * 3 * CHUNK + BLOCK, 512 << 10))
        .collect();
    for (i, &(off, len)) in written.iter().enumerate() {
        dev.write_all_at(&pattern(len as usize, i as u64), off)
            .unwrap();
    }
    dev.sync_all().unwrap();
    drop(dev);
    let s1 = t.snapshot("alloc-1", &vol).await;

    let (cap, all) = t.allocated(&s1, 0, 0).await.unwrap();
    assert_eq!(cap as u64, VOL);
    assert_well_formed(&all, VOL);
    let total: u64 = all.iter().map(|r| r.1).sum();
    assert!(
        (10 << 20..=20 << 20).contains(&total),
        "allocated {total} bytes for 10 MiB written: {all:?}"
    );
    for &(off, len) in &written {
        assert!(
            all.iter().any(|&(o, l)| o <= off && off + len <= o + l),
            "written range {off}+{len} not covered by {all:?}"
        );
    }
    // max_results = 1: one range per message, same ranges.
    assert_eq!(t.allocated(&s1, 0, 1).await.unwrap().1, all);

    // Resume at every boundary (and inside every range): exactly the rest of the union.
    let mut starts: Vec<u64> = all
        .iter()
        .flat_map(|&(o, l)| [o, o + l / 2, o + l])
        .collect();
    starts.extend([1, VOL - 1, VOL]);
    let rest = |ranges: &[(u64, u64)], from: u64| -> Vec<(u64, u64)> {
        ranges
            .iter()
            .filter(|&&(o, l)| o + l > from)
            .map(|&(o, l)| (o.max(from), o + l - o.max(from)))
            .collect()
    };
    for &s in &starts {
        let (_, got) = t.allocated(&s1, s as i64, 2).await.unwrap();
        assert_eq!(got, rest(&all, s), "allocated resumed at {s}");
    }

    // The same for a delta: overwrite 3 of the pieces, then resume the delta everywhere.
    let dev = File::options()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    for &i in &[0usize, 7, 19] {
        let (off, len) = written[i];
        dev.write_all_at(&pattern(len as usize, 100 + i as u64), off)
            .unwrap();
    }
    dev.sync_all().unwrap();
    drop(dev);
    let s2 = t.snapshot("alloc-2", &vol).await;
    let (_, delta) = t.delta(&s1, &s2, 0, 0).await.unwrap();
    assert_well_formed(&delta, VOL);
    let changed: u64 = delta.iter().map(|r| r.1).sum();
    assert!(
        (3 * (512 << 10)..=3 * 2 * CHUNK).contains(&changed),
        "{delta:?}"
    );
    let mut starts: Vec<u64> = delta
        .iter()
        .flat_map(|&(o, l)| [o, o + l / 2, o + l])
        .collect();
    starts.extend([0, VOL]);
    for &s in &starts {
        let (_, got) = t.delta(&s1, &s2, s as i64, 1).await.unwrap();
        assert_eq!(got, rest(&delta, s), "delta resumed at {s}");
    }
    // A snapshot compared with itself: nothing changed.
    assert!(t.delta(&s2, &s2, 0, 0).await.unwrap().1.is_empty());

    t.delete_snapshot(&s1).await;
    t.delete_snapshot(&s2).await;
    assert!(
        !t.snapshot_file(&s1, "chunks").exists(),
        "digests outlived their snapshot"
    );
    t.down(&vol, &staging, &target).await;
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_code() {
    let d = Driver::start().await;
    let mut t = Ctx::connect(d).await;
    // Both services are advertised.
    let caps =
        t.d.identity()
            .await
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(plugin_capability::Type::Service(s))
            if s.r#type == plugin_capability::service::Type::SnapshotMetadataService as i32)));

    // Controller-only work: no staging, so no root needed.
    let a = t.volume("a", rw_mount("ext4")).await;
    let b = t.volume("b", rw_mount("ext4")).await;
    let a1 = t.snapshot("a1", &a).await;
    let a2 = t.snapshot("a2", &a).await;
    let b1 = t.snapshot("b1", &b).await;
    let unknown = "snap-0123456789abcdef0123@test-node";
    let elsewhere = "snap-0123456789abcdef0123@other-node";

    assert_eq!(code_of(t.allocated("", 0, 0).await), Code::InvalidArgument);
    assert_eq!(
        code_of(t.allocated("bad/../id", 0, 0).await),
        Code::InvalidArgument
    );
    assert_eq!(code_of(t.allocated(unknown, 0, 0).await), Code::NotFound);
    assert_eq!(code_of(t.allocated(elsewhere, 0, 0).await), Code::NotFound);
    assert_eq!(
        code_of(t.allocated(&a1, 0, -1).await),
        Code::InvalidArgument
    );
    assert_eq!(code_of(t.allocated(&a1, -1, 0).await), Code::OutOfRange);
    assert_eq!(
        code_of(t.allocated(&a1, VOL as i64 + 1, 0).await),
        Code::OutOfRange
    );
    // Right at the end: an empty stream that still gives the capacity.
    assert_eq!(
        t.allocated(&a1, VOL as i64, 0).await.unwrap(),
        (VOL as i64, vec![])
    );

    assert_eq!(code_of(t.delta("", &a2, 0, 0).await), Code::InvalidArgument);
    assert_eq!(code_of(t.delta(&a1, "", 0, 0).await), Code::InvalidArgument);
    assert_eq!(code_of(t.delta(unknown, &a2, 0, 0).await), Code::NotFound);
    assert_eq!(code_of(t.delta(&a1, unknown, 0, 0).await), Code::NotFound);
    assert_eq!(
        code_of(t.delta(&a1, &a2, 0, -5).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(t.delta(&a1, &a2, VOL as i64 + 1, 0).await),
        Code::OutOfRange
    );
    // Not comparable: another volume's snapshot, base newer than target, another node.
    assert_eq!(
        code_of(t.delta(&a1, &b1, 0, 0).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code_of(t.delta(&a2, &a1, 0, 0).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code_of(t.delta(elsewhere, &a2, 0, 0).await),
        Code::FailedPrecondition
    );
    // Comparable, and unchanged: two snapshots of an untouched volume.
    let (cap, none) = t.delta(&a1, &a2, 0, 0).await.unwrap();
    assert_eq!(cap as u64, VOL);
    assert!(none.is_empty(), "{none:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_prints_what_a_backup_would_read() {
    let d = Driver::start().await;
    let mut t = Ctx::connect(d).await;
    let vol = t.volume("cli", rw_mount("ext4")).await;
    let image = t.d.image_of(&vol);
    let write = |off: u64, seed: u64| {
        let f = File::options().write(true).open(&image).unwrap();
        f.write_all_at(&pattern(CHUNK as usize, seed), off).unwrap();
        f.sync_all().unwrap();
    };
    write(4 * CHUNK, 1);
    let s1 = t.snapshot("cli-1", &vol).await;
    write(20 * CHUNK, 2);
    let s2 = t.snapshot("cli-2", &vol).await;
    let endpoint = format!("unix://{}", t.d.socket.display());
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
            .args(["snapshot", "--endpoint", &endpoint])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--output", "json", "allocated", &s2]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["volume_capacity_bytes"], VOL);
    assert_eq!(doc["total_bytes"], 2 * CHUNK);
    let out = run(&["--output", "json", "diff", &s1, &s2]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc["ranges"],
        serde_json::json!([{"byte_offset": 20 * CHUNK, "size_bytes": CHUNK}])
    );
    let out = run(&["diff", &s1, &s2]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 ranges, 1.0 MiB of 64.0 MiB"), "{text}");
    let out = run(&["diff", &s2, &s1]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("FAILED_PRECONDITION: "));
}
