//! End-to-end tests of the Node service: real loop devices, real mkfs, real mounts. Every test
//! checks at the end that nothing of its own is left mounted or attached; the harness cleans up
//! even when an assertion fails.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::volume_capability::access_mode::Mode;
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
        let c = d.controller().await;
        let n = d.node().await;
        Ctx { d, c, n }
    }

    async fn create(&mut self, name: &str, bytes: i64, cap: VolumeCapability) -> String {
        self.c
            .create_volume(create_req(name, bytes, cap))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    }

    async fn stage(
        &mut self,
        id: &str,
        staging: &Path,
        cap: VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.n
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.n
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into(),
                target_path: target.to_string_lossy().into(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn unpublish(&mut self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.n
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.to_string_lossy().into(),
            })
            .await
            .map(|_| ())
    }

    async fn unstage(&mut self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.n
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into(),
            })
            .await
            .map(|_| ())
    }

    /// Stage + publish with one capability; returns (staging, target).
    async fn up(&mut self, id: &str, tag: &str, cap: VolumeCapability) -> (PathBuf, PathBuf) {
        let staging = self.d.path(&format!("staging-{tag}"));
        let target = self.d.path(&format!("pods/{tag}/mount"));
        self.stage(id, &staging, cap.clone()).await.unwrap();
        self.publish(id, &staging, &target, cap, false)
            .await
            .unwrap();
        (staging, target)
    }

    async fn down(&mut self, id: &str, staging: &Path, target: &Path) {
        self.unpublish(id, target).await.unwrap();
        assert!(!target.exists(), "unpublish removes the target");
        self.unstage(id, staging).await.unwrap();
    }

    fn loops_of(&self, id: &str) -> Vec<loopvol::datapath::Attachment> {
        loopvol::datapath::loop_device::loops_backed_by(&self.d.image_of(id))
    }
}

/// Online ext4 resizing needs CAP_SYS_RESOURCE (bit 24), which some sandboxes drop even for root.
fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn write_file(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

async fn lifecycle(fs: &str) {
    let mut t = Ctx::new().await;
    let cap = rw_mount(fs);
    let id = t.create(&format!("life-{fs}"), 64 * MIB, cap.clone()).await;
    let (staging, target) = t.up(&id, "a", cap.clone()).await;

    let loops = t.loops_of(&id);
    assert_eq!(loops.len(), 1, "exactly one loop device per image");
    assert!(
        loops[0].direct_io,
        "direct I/O is on for a pool on {fs}-capable storage"
    );
    let m = loopvol::fs::mount::mount_at(&staging)
        .unwrap()
        .expect("staging mounted");
    assert_eq!(m.fs_type, fs);
    assert_eq!(Path::new(&m.source), loops[0].device);

    let data = pattern(3 * MIB as usize + 17, 42);
    write_file(&target.join("data.bin"), &data);
    let sum = sha256_file(&target.join("data.bin"));
    t.down(&id, &staging, &target).await;
    assert!(
        t.loops_of(&id).is_empty(),
        "unstage detaches the loop device"
    );
    t.d.assert_clean();

    let (staging, target) = t.up(&id, "b", cap.clone()).await;
    assert_eq!(
        sha256_file(&target.join("data.bin")),
        sum,
        "data survives unstage/stage"
    );
    t.down(&id, &staging, &target).await;
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn full_lifecycle_ext4() {
    if root_or_skip("lifecycle_ext4") {
        lifecycle("ext4").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn full_lifecycle_xfs() {
    if root_or_skip("lifecycle_xfs") {
        lifecycle("xfs").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn full_lifecycle_btrfs() {
    if root_or_skip("lifecycle_btrfs") {
        lifecycle("btrfs").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_block_write_and_read_through_the_device_file() {
    if !root_or_skip("raw_block") {
        return;
    }
    let mut t = Ctx::new().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let id = t.create("block", 16 * MIB, cap.clone()).await;
    let (staging, target) = t.up(&id, "blk", cap.clone()).await;
    let pat = pattern(MIB as usize, 7);
    {
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        dev.seek(SeekFrom::Start(5 * MIB as u64)).unwrap();
        dev.write_all(&pat).unwrap();
        dev.sync_all().unwrap();
    }
    let stats =
        t.n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 16 * MIB);
    t.down(&id, &staging, &target).await;
    t.d.assert_clean();
    // The bytes reached the backing file at the right offset.
    let mut img = std::fs::File::open(t.d.image_of(&id)).unwrap();
    img.seek(SeekFrom::Start(5 * MIB as u64)).unwrap();
    let mut back = vec![0u8; pat.len()];
    img.read_exact(&mut back).unwrap();
    assert!(back == pat, "pattern read back from the image differs");

    // Read-only raw block needs a read-only stage, and then really refuses writes.
    let ro = block_cap(Mode::SingleNodeReaderOnly);
    let staging = t.d.path("staging-ro");
    let target = t.d.path("pods/ro/dev");
    t.stage(&id, &staging, ro.clone()).await.unwrap();
    t.publish(&id, &staging, &target, ro, true).await.unwrap();
    // Opening a read-only block device for writing may succeed; writing to it must not.
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .and_then(|mut f| f.write_all(&[0u8; 4096]).and_then(|_| f.sync_all()));
    let err = write.expect_err("a read-only raw block volume accepted a write");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
        ),
        "{err}"
    );
    let mut dev = std::fs::File::open(&target).unwrap();
    dev.seek(SeekFrom::Start(5 * MIB as u64)).unwrap();
    let mut back = vec![0u8; pat.len()];
    dev.read_exact(&mut back).unwrap();
    assert!(back == pat);
    drop(dev);
    t.down(&id, &staging, &target).await;
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_publish_refuses_writes_and_two_pods_share_a_volume() {
    if !root_or_skip("readonly_and_two_pods") {
        return;
    }
    let mut t = Ctx::new().await;
    let cap = rw_mount("ext4");
    let id = t.create("shared", 32 * MIB, cap.clone()).await;
    let (staging, pod1) = t.up(&id, "pod1", cap.clone()).await;
    let pod2 = t.d.path("pods/pod2/mount");
    let ro = t.d.path("pods/ro/mount");
    t.publish(&id, &staging, &pod2, cap.clone(), false)
        .await
        .unwrap();
    t.publish(&id, &staging, &ro, cap.clone(), true)
        .await
        .unwrap();
    // Publishing again is a no-op; the same target read-only instead is a conflict.
    t.publish(&id, &staging, &pod2, cap.clone(), false)
        .await
        .unwrap();
    let e = t
        .publish(&id, &staging, &pod2, cap.clone(), true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    write_file(&pod1.join("hello"), b"from pod1");
    assert_eq!(std::fs::read(pod2.join("hello")).unwrap(), b"from pod1");
    assert_eq!(std::fs::read(ro.join("hello")).unwrap(), b"from pod1");
    let err = std::fs::File::create(ro.join("nope")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    // Unstage while published is refused, names where, and changes nothing: the staging path
    // still holds the pods' filesystem.
    let e = t.unstage(&id, &staging).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("pod1"), "{}", e.message());
    assert!(pod1.join("hello").exists());
    assert_same_filesystem(&staging, &pod1);

    for p in [&pod2, &ro] {
        t.unpublish(&id, p).await.unwrap();
        // Idempotent.
        t.unpublish(&id, p).await.unwrap();
    }
    t.down(&id, &staging, &pod1).await;
    t.d.assert_clean();
}

/// `a` is a mount point, and a file written through `a` is read through `b`.
fn assert_same_filesystem(a: &Path, b: &Path) {
    let mounted = loopvol::fs::mount::mount_at(a).unwrap();
    assert!(mounted.is_some(), "{} is not mounted", a.display());
    let name = format!("probe-{}", std::process::id());
    write_file(&a.join(&name), b"same filesystem");
    assert_eq!(std::fs::read(b.join(&name)).unwrap(), b"same filesystem");
    std::fs::remove_file(a.join(&name)).unwrap();
}

/// A bind of the staging mount that loopvol did not make (an admin's, or another tool's) still
/// holds the filesystem: unstage refuses, naming it, and leaves the volume staged; once it is
/// gone, unstage detaches. The refusal comes from the kernel (the device stays claimed), not
/// from loopvol's records, so it holds for mounts loopvol never heard of.
#[tokio::test(flavor = "multi_thread")]
async fn unstage_refuses_while_a_mount_loopvol_did_not_make_holds_the_filesystem() {
    if !root_or_skip("unstage_refuses_foreign_bind") {
        return;
    }
    let mut t = Ctx::new().await;
    let cap = rw_mount("ext4");
    let id = t.create("foreign-bind", 32 * MIB, cap.clone()).await;
    let (staging, pod) = t.up(&id, "pod", cap.clone()).await;
    write_file(&pod.join("data"), b"kept");
    t.unpublish(&id, &pod).await.unwrap();
    let foreign = t.d.path("admin/bind");
    std::fs::create_dir_all(&foreign).unwrap();
    nix::mount::mount(
        Some(&staging),
        &foreign,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let e = t.unstage(&id, &staging).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("admin/bind"), "{}", e.message());
    assert_eq!(t.loops_of(&id).len(), 1, "still attached");
    assert_same_filesystem(&staging, &foreign);
    assert_eq!(std::fs::read(staging.join("data")).unwrap(), b"kept");
    // Still staged as far as loopvol is concerned: a publish works.
    t.publish(&id, &staging, &pod, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(std::fs::read(pod.join("data")).unwrap(), b"kept");
    t.unpublish(&id, &pod).await.unwrap();
    nix::mount::umount2(&foreign, nix::mount::MntFlags::empty()).unwrap();
    t.unstage(&id, &staging).await.unwrap();
    assert!(t.loops_of(&id).is_empty());
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn stage_and_publish_are_idempotent_and_detect_conflicts() {
    if !root_or_skip("idempotency") {
        return;
    }
    let mut t = Ctx::new().await;
    let cap = rw_mount("ext4");
    let id = t.create("idem", 32 * MIB, cap.clone()).await;
    let staging = t.d.path("staging");
    t.stage(&id, &staging, cap.clone()).await.unwrap();
    // Only this test's mounts: other tests mount and unmount in the same namespace meanwhile.
    let before = t.d.leftovers().0;
    t.stage(&id, &staging, cap.clone()).await.unwrap();
    assert_eq!(t.d.leftovers().0, before, "no second mount");
    assert_eq!(t.loops_of(&id).len(), 1, "no second loop device");
    let e = t
        .stage(&id, &staging, block_cap(Mode::SingleNodeWriter))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = t.stage(&id, &staging, rw_mount("xfs")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // Publishing with another access type than staged.
    let e = t
        .publish(
            &id,
            &staging,
            &t.d.path("pods/x/dev"),
            block_cap(Mode::SingleNodeWriter),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    t.unstage(&id, &staging).await.unwrap();
    t.unstage(&id, &staging).await.unwrap();
    // A volume that was never staged unstages fine too.
    let other = t.create("never-staged", 8 * MIB, cap.clone()).await;
    t.unstage(&other, &t.d.path("nowhere")).await.unwrap();
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn node_requests_are_validated() {
    if !root_or_skip("node_validation") {
        return;
    }
    let mut t = Ctx::new().await;
    let cap = rw_mount("ext4");
    let id = t.create("val", 16 * MIB, cap.clone()).await;
    let staging = t.d.path("staging");
    let target = t.d.path("target");
    let s = |p: &Path| p.to_string_lossy().into_owned();

    let e = t.stage("", &staging, cap.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = t.stage(&id, Path::new(""), cap.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = t
        .stage(&id, Path::new("relative/path"), cap.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = t
        .stage(&id, &t.d.path("a/../../etc"), cap.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e =
        t.n.node_stage_volume(NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: s(&staging),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "missing capability");
    let mut hostile = cap.clone();
    if let Some(volume_capability::AccessType::Mount(m)) = &mut hostile.access_type {
        m.mount_flags = vec!["bind".into()];
    }
    let e = t.stage(&id, &staging, hostile).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let unknown = format!("vol-0123456789abcdef0123@{NODE}");
    let e = t.stage(&unknown, &staging, cap.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = t
        .stage("vol-0123456789abcdef0123@other-node", &staging, cap.clone())
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "volumes of other nodes are not found here"
    );
    let e = t
        .publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "publish before stage");
    let e =
        t.n.node_publish_volume(NodePublishVolumeRequest {
            volume_id: id.clone(),
            target_path: s(&target),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "missing staging path");
    let e = t.unpublish(&unknown, &target).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = t.unstage(&unknown, &staging).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e =
        t.n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: s(&t.d.path("missing")),
            staging_target_path: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        !staging.exists() && !target.exists(),
        "refused requests created nothing"
    );

    let info =
        t.n.node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(info.node_id, NODE);
    assert!(info.max_volumes_per_node > 0);
    assert_eq!(
        info.accessible_topology
            .unwrap()
            .segments
            .get(loopvol::TOPOLOGY_KEY)
            .map(String::as_str),
        Some(NODE)
    );
    let caps =
        t.n.node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    use node_service_capability::rpc::Type as R;
    let have: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [R::StageUnstageVolume, R::GetVolumeStats, R::ExpandVolume] {
        assert!(have.contains(&(want as i32)), "{want:?}");
    }
    // CSI v1.13 values are opt-in: released clients (spec v1.12) cannot name them.
    for opt_in in [R::GetVolumeHealth, R::GetStorageHealth] {
        assert!(
            !have.contains(&(opt_in as i32)),
            "{opt_in:?} advertised by default"
        );
    }
    assert!(
        !have.contains(&(R::VolumeMountGroup as i32)),
        "fsGroup is left to the kubelet"
    );
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_agree_with_statvfs() {
    if !root_or_skip("stats") {
        return;
    }
    let mut t = Ctx::new().await;
    let cap = rw_mount("ext4");
    let id = t.create("stats", 64 * MIB, cap.clone()).await;
    let (staging, target) = t.up(&id, "s", cap).await;
    write_file(&target.join("f"), &pattern(4 * MIB as usize, 1));
    let usage =
        t.n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: staging.to_string_lossy().into(),
        })
        .await
        .unwrap()
        .into_inner()
        .usage;
    let st = nix::sys::statvfs::statvfs(&target).unwrap();
    let f = st.fragment_size() as i64;
    let bytes = usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .unwrap();
    let inodes = usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Inodes as i32)
        .unwrap();
    assert_eq!(bytes.total, st.blocks() as i64 * f);
    assert_eq!(bytes.available, st.blocks_available() as i64 * f);
    assert!(bytes.used >= 4 * MIB, "used {}", bytes.used);
    assert_eq!(inodes.total, st.files() as i64);
    assert!(inodes.used >= 1);
    t.down(&id, &staging, &target).await;
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn online_expansion_keeps_data_and_grows_the_filesystem() {
    if !root_or_skip("expansion") {
        return;
    }
    let mut t = Ctx::new().await;
    for fs in ["ext4", "xfs"] {
        let cap = rw_mount(fs);
        let start = if fs == "xfs" { 300 * MIB } else { 64 * MIB };
        let id = t.create(&format!("grow-{fs}"), start, cap.clone()).await;
        let (staging, target) = t.up(&id, fs, cap.clone()).await;
        write_file(&target.join("keep"), &pattern(MIB as usize, 9));
        let sum = sha256_file(&target.join("keep"));
        let before = nix::sys::statvfs::statvfs(&target).unwrap();
        let grown =
            t.c.controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: start * 2,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(grown.capacity_bytes, start * 2);
        assert!(grown.node_expansion_required);
        let n =
            t.n.node_expand_volume(NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.to_string_lossy().into(),
                staging_target_path: staging.to_string_lossy().into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: start * 2,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await;
        let (staging, target) = match n {
            Ok(n) => {
                assert_eq!(n.into_inner().capacity_bytes, start * 2);
                (staging, target)
            }
            Err(e) if fs == "ext4" && !has_cap_sys_resource() => {
                // Online ext4 growth needs CAP_SYS_RESOURCE, which this machine withholds from
                // root: the driver must say so, then grow it offline at the next stage.
                assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
                assert!(e.message().contains("CAP_SYS_RESOURCE"), "{}", e.message());
                t.down(&id, &staging, &target).await;
                t.up(&id, "ext4-again", cap.clone()).await
            }
            Err(e) => panic!("{fs}: NodeExpandVolume failed: {e}"),
        };
        let after = nix::sys::statvfs::statvfs(&target).unwrap();
        let size = |s: &nix::sys::statvfs::Statvfs| s.blocks() * s.fragment_size();
        assert!(
            size(&after) > size(&before) + (start as u64) / 2,
            "{fs}: df did not grow: {} -> {}",
            size(&before),
            size(&after)
        );
        assert_eq!(sha256_file(&target.join("keep")), sum);
        // Shrinking is refused.
        let e =
            t.c.controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: start,
                    limit_bytes: start,
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        t.down(&id, &staging, &target).await;
    }
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_and_simulated_reboot_keep_data() {
    if !root_or_skip("reboot") {
        return;
    }
    let mut t = Ctx::new().await;
    let cap = rw_mount("ext4");
    let id = t.create("reboot", 32 * MIB, cap.clone()).await;
    let (staging, target) = t.up(&id, "r", cap.clone()).await;
    write_file(&target.join("before"), &pattern(MIB as usize, 3));
    let sum = sha256_file(&target.join("before"));

    // Driver restart with the volume staged and published: it keeps serving it. The kill
    // also cut record writes short (their temp files, empty as a write killed right after
    // creating one leaves them): the restart removes those and keeps the records themselves.
    t.d.kill9();
    let node_dir = t.d.pool.join("node");
    let hex = hex_of(&id);
    let interrupted = [
        format!(".{hex}.json.tmp"),
        format!(".{hex}.targets.tmp"),
        format!(".{hex}.frozen.tmp"),
    ]
    .map(|n| node_dir.join(n));
    for f in &interrupted {
        std::fs::write(f, b"").unwrap();
    }
    t.d.spawn().await;
    for f in &interrupted {
        assert!(!f.exists(), "restart left {}", f.display());
    }
    assert!(
        node_dir.join(format!("{hex}.json")).exists(),
        "restart lost the staging record"
    );
    t.c = t.d.controller().await;
    t.n = t.d.node().await;
    t.stage(&id, &staging, cap.clone()).await.unwrap();
    assert_eq!(
        t.loops_of(&id).len(),
        1,
        "restarted driver found its loop device"
    );
    let stats =
        t.n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await;
    assert!(stats.is_ok(), "{stats:?}");

    // A node reboot: mounts gone and loop devices detached behind the driver's back.
    t.d.kill9();
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).unwrap();
    for l in t.loops_of(&id) {
        loopvol::datapath::loop_device::detach(&l.device).unwrap();
    }
    t.d.spawn().await;
    t.c = t.d.controller().await;
    t.n = t.d.node().await;
    let health =
        t.n.node_get_volume_health(NodeGetVolumeHealthRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume_health
        .unwrap();
    assert_eq!(
        health.health_statuses[0].reason, "LoopDeviceDetached",
        "{health:?}"
    );
    t.stage(&id, &staging, cap.clone()).await.unwrap();
    t.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(sha256_file(&target.join("before")), sum);
    let health =
        t.n.node_get_volume_health(NodeGetVolumeHealthRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume_health
        .unwrap();
    assert!(health.health_statuses.is_empty(), "{health:?}");
    t.down(&id, &staging, &target).await;
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_holding_another_filesystem_is_never_reformatted() {
    if !root_or_skip("no_reformat") {
        return;
    }
    let mut t = Ctx::new().await;
    let id = t.create("keepfs", 320 * MIB, rw_mount("ext4")).await;
    let (staging, target) = t.up(&id, "k", rw_mount("ext4")).await;
    write_file(&target.join("precious"), b"data");
    t.down(&id, &staging, &target).await;
    // Ask for xfs on a volume that holds ext4: refused, nothing attached, data intact.
    let e = t.stage(&id, &staging, rw_mount("xfs")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("ext4"), "{}", e.message());
    assert!(
        t.loops_of(&id).is_empty(),
        "failed stage released its loop device"
    );
    let (staging, target) = t.up(&id, "k2", rw_mount("ext4")).await;
    assert_eq!(std::fs::read(target.join("precious")).unwrap(), b"data");
    t.down(&id, &staging, &target).await;
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn static_volume_from_the_cli_stages_like_a_dynamic_one() {
    if !root_or_skip("static_pv") {
        return;
    }
    let mut t = Ctx::new().await;
    // The CLI refuses to touch a pool a running driver serves...
    let pool = t.d.pool.clone();
    let cli = |pool: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
            .args([
                "volume",
                "create",
                "--name",
                "static-1",
                "--size",
                "32Mi",
                "--node-id",
                NODE,
            ])
            .arg("--pool-dir")
            .arg(pool)
            .output()
            .unwrap()
    };
    let out = cli(&pool);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("running loopvol"));
    // ...so create it with the driver stopped, as an admin preparing a static PV would.
    t.d.stop();
    let out = cli(&pool);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = String::from_utf8(out.stdout).unwrap();
    let handle = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("volumeHandle: "))
        .expect("PV has a volumeHandle")
        .to_string();
    assert!(manifest.contains("kind: PersistentVolumeClaim"));
    assert!(manifest.contains("volumeName: static-1"));
    assert!(manifest.contains(loopvol::TOPOLOGY_KEY));
    t.d.spawn().await;
    t.c = t.d.controller().await;
    t.n = t.d.node().await;
    let (staging, target) = t.up(&handle, "st", rw_mount("ext4")).await;
    write_file(&target.join("x"), b"static");
    t.down(&handle, &staging, &target).await;
    t.d.assert_clean();
}
