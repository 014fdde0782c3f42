//! Encryption at rest (issue 26): `encryption: fscrypt` volumes keep file contents and names
//! out of the backing image, open only with the node-stage Secret they were made with (a
//! clone or restore too), leave no key in the kernel after unstage, refuse bad Secrets with
//! nothing mounted, and never put the key in the driver's log. Real loop devices, mkfs and
//! fscrypt ioctls, as root.

mod common;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::volume_capability::access_mode::Mode;
use loopvol::csi::*;
use loopvol::fs::fscrypt::{self, KeyStatus};
use tonic::transport::Channel;
use tonic::Code;

const KEY: &str = "5f3c8a1be2d94c07a6b1f0e3d2c4b5a69788a9bacbdcedfe0f1e2d3c4b5a6978";
const OTHER_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn secrets(key: &str) -> HashMap<String, String> {
    HashMap::from([("key".to_string(), key.to_string())])
}

fn encrypted(name: &str, bytes: i64) -> CreateVolumeRequest {
    let mut r = create_req(name, bytes, rw_mount("ext4"));
    r.parameters = HashMap::from([("encryption".to_string(), "fscrypt".to_string())]);
    r
}

struct T {
    d: Driver,
    c: ControllerClient<Channel>,
    n: NodeClient<Channel>,
}

impl T {
    async fn start() -> T {
        let d = Driver::start().await;
        let c = d.controller().await;
        let n = d.node().await;
        T { d, c, n }
    }

    fn staging(&self, tag: &str) -> PathBuf {
        self.d.path(&format!("staging-{tag}"))
    }

    fn target(&self, tag: &str) -> PathBuf {
        self.d.path(&format!("target-{tag}"))
    }

    async fn stage(
        &mut self,
        id: &str,
        tag: &str,
        secrets: HashMap<String, String>,
    ) -> Result<(), tonic::Status> {
        let mut r = stage_req(id, &self.staging(tag), rw_mount("ext4"));
        r.secrets = secrets;
        self.n.node_stage_volume(r).await.map(drop)
    }

    /// Stage with `key` and publish; the pod's directory.
    async fn up(&mut self, id: &str, tag: &str, key: &str) -> PathBuf {
        self.stage(id, tag, secrets(key)).await.expect("stage");
        let (staging, target) = (self.staging(tag), self.target(tag));
        self.n
            .node_publish_volume(publish_req(id, &staging, &target, rw_mount("ext4")))
            .await
            .expect("publish");
        target
    }

    async fn down(&mut self, id: &str, tag: &str) {
        let (staging, target) = (self.staging(tag), self.target(tag));
        self.n
            .node_unpublish_volume(unpublish_req(id, &target))
            .await
            .expect("unpublish");
        self.n
            .node_unstage_volume(unstage_req(id, &staging))
            .await
            .expect("unstage");
    }

    /// Nothing of this test mounted, no device over the pool.
    fn nothing_staged(&self, why: &str) {
        let (mounts, loops) = self.d.leftovers();
        assert!(mounts.is_empty(), "{why}: mounts left: {mounts:?}");
        assert!(loops.is_empty(), "{why}: loop devices left: {loops:?}");
    }
}

/// stdout of an admin command on the test's pool.
fn loopvol_out(d: &Driver, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(args)
        .arg("--pool-dir")
        .arg(&d.pool)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Does the file hold `needle`? `grep -a -F`, as someone reading a stolen disk would.
fn image_contains(image: &Path, needle: &str) -> bool {
    let st = Command::new("grep")
        .args(["-q", "-a", "-F", "--", needle])
        .arg(image)
        .status()
        .expect("run grep");
    st.success()
}

fn write_marked(dir: &Path, name: &str, content: &str) {
    let body = content.repeat(64);
    std::fs::write(dir.join(name), &body).unwrap();
    std::fs::create_dir(dir.join(format!("{name}-dir"))).unwrap();
    std::fs::File::open(dir.join(name))
        .unwrap()
        .sync_all()
        .unwrap();
}

fn open_dir(p: &Path) -> std::fs::File {
    std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// The key status of the policy on `<mount>/data`, asked of the filesystem mounted at `mount`.
fn key_status_at(mount: &Path) -> KeyStatus {
    let data = open_dir(&mount.join("data"));
    let id = fscrypt::policy_identifier(data.as_fd())
        .unwrap()
        .expect("data/ has a policy");
    fscrypt::key_status(open_dir(mount).as_fd(), &id).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn contents_and_names_never_reach_the_image_and_the_key_leaves_with_unstage() {
    if !root_or_skip("encryption at rest") {
        return;
    }
    let mut t = T::start().await;
    let enc = create_volume_id(&mut t.c, encrypted("enc", 64 * MIB)).await;
    let plain = create_volume_id(&mut t.c, create_req("plain", 64 * MIB, rw_mount("ext4"))).await;
    let (name, content) = ("LoopvolSecretFileName7f3a", "LoopvolSecretContent9b2e");
    for (id, tag) in [(&enc, "enc"), (&plain, "plain")] {
        let pod = t.up(id, tag, KEY).await;
        write_marked(&pod, name, content);
        assert_eq!(
            std::fs::read_to_string(pod.join(name)).unwrap(),
            content.repeat(64),
            "{tag}: the pod reads what it wrote"
        );
    }
    // The operator's view says which volumes are encrypted.
    let table = loopvol_out(&t.d, &["volume", "list"]);
    let col = table
        .lines()
        .next()
        .unwrap()
        .find("ENCRYPTION")
        .expect(&table);
    let row = |n: &str| table.lines().find(|l| l.contains(n)).unwrap()[col..].to_string();
    assert!(row(&enc).starts_with("fscrypt "), "{table}");
    assert!(row(&plain).starts_with("- "), "{table}");
    let status = loopvol_out(&t.d, &["status"]);
    assert!(status.contains("1 encrypted"), "{status}");
    let inspect = loopvol_out(&t.d, &["volume", "inspect", &enc]);
    assert!(inspect.contains("encryption   fscrypt"), "{inspect}");
    // The pod sees the encrypted directory, never the filesystem root (no lost+found).
    let seen: Vec<_> = std::fs::read_dir(t.target("enc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !seen.iter().any(|n| n == "lost+found" || n == "data"),
        "{seen:?}"
    );
    assert_eq!(key_status_at(&t.staging("enc")), KeyStatus::Present);
    let key_hex_of_policy = {
        let data = open_dir(&t.staging("enc").join("data"));
        fscrypt::policy_identifier(data.as_fd()).unwrap().unwrap()
    };
    t.down(&enc, "enc").await;
    t.down(&plain, "plain").await;
    t.nothing_staged("after unstage");

    // The plaintext volume gives both away (so this search can fail); the encrypted one neither.
    assert!(
        image_contains(&t.d.image_of(&plain), content),
        "plain content found"
    );
    assert!(
        image_contains(&t.d.image_of(&plain), name),
        "plain name found"
    );
    assert!(
        !image_contains(&t.d.image_of(&enc), content),
        "encrypted content leaked"
    );
    assert!(
        !image_contains(&t.d.image_of(&enc), name),
        "encrypted file name leaked"
    );

    // The unstage logged the key's removal, and the filesystem, mounted again by hand, has no
    // key: its names read as ciphertext.
    let log = t.d.log();
    assert!(
        log.contains("encryption key removed from the filesystem"),
        "{log}"
    );
    let dev = loopvol::datapath::loop_device::attach(&t.d.image_of(&enc), true, false)
        .unwrap()
        .device;
    let mnt = t.d.path("by-hand");
    std::fs::create_dir(&mnt).unwrap();
    loopvol::fs::mount::mount_fs(&dev, &mnt, "ext4", nix::mount::MsFlags::MS_RDONLY, "").unwrap();
    let status = fscrypt::key_status(open_dir(&mnt).as_fd(), &key_hex_of_policy).unwrap();
    let names: Vec<_> = std::fs::read_dir(mnt.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    nix::mount::umount2(&mnt, nix::mount::MntFlags::empty()).unwrap();
    loopvol::datapath::loop_device::detach(&dev).unwrap();
    assert_eq!(status, KeyStatus::Absent);
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!names.iter().any(|n| n.contains(name)), "{names:?}");
    assert_no_key_in(&log);
    t.d.assert_clean();
}

/// The Secret's key in hex (either case) and base64, and the Secret's raw bytes in base64, in
/// the driver's log: none of them.
fn assert_no_key_in(log: &str) {
    let b64 = base64::engine::general_purpose::STANDARD;
    for k in [KEY, OTHER_KEY] {
        let raw: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&k[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        for needle in [
            k.to_string(),
            k.to_uppercase(),
            b64.encode(k),
            b64.encode(&raw),
            k[..16].to_string(),
        ] {
            assert!(
                !log.contains(&needle),
                "the driver's log holds key material {needle}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restores_and_clones_open_with_the_same_secret_only() {
    if !root_or_skip("encrypted restore") {
        return;
    }
    let mut t = T::start().await;
    let src = create_volume_id(&mut t.c, encrypted("src", 64 * MIB)).await;
    let pod = t.up(&src, "src", KEY).await;
    let data = pattern(3 * MIB as usize, 41);
    std::fs::write(pod.join("payload"), &data).unwrap();
    std::fs::File::open(pod.join("payload"))
        .unwrap()
        .sync_all()
        .unwrap();
    // Snapshotted while staged and published (frozen as any mounted volume is).
    let snap = create_snapshot_id(&mut t.c, &src, "snap").await;
    t.down(&src, "src").await;

    // Restored into a StorageClass that does not ask for encryption: the data is ciphertext,
    // so the volume is encrypted all the same, under the source's key.
    let mut restore = create_req("restored", 64 * MIB, rw_mount("ext4"));
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource { snapshot_id: snap },
        )),
    });
    let restored = create_volume_id(&mut t.c, restore).await;
    let mut clone = encrypted("clone", 64 * MIB);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: src.clone(),
            },
        )),
    });
    let cloned = create_volume_id(&mut t.c, clone).await;

    for (id, tag) in [(&restored, "restored"), (&cloned, "cloned")] {
        // Another Secret: refused, and nothing is left mounted or attached.
        let e = t.stage(id, tag, secrets(OTHER_KEY)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{tag}: {}", e.message());
        assert!(
            e.message().contains("not this volume's key"),
            "{}",
            e.message()
        );
        t.nothing_staged(&format!("{tag} refused"));
        // The right one: the data as written.
        let pod = t.up(id, tag, KEY).await;
        assert!(
            std::fs::read(pod.join("payload")).unwrap() == data,
            "{tag}: data differs"
        );
        // A second stage with the wrong Secret while staged: refused, the pod unaffected.
        let e = t.stage(id, tag, secrets(OTHER_KEY)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{tag}: {}", e.message());
        assert_eq!(key_status_at(&t.staging(tag)), KeyStatus::Present);
        std::fs::write(pod.join("more"), b"still writable").unwrap();
        assert!(std::fs::read(pod.join("payload")).unwrap() == data);
        t.down(id, tag).await;
    }
    assert_no_key_in(&t.d.log());
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_secrets_and_impossible_requests_are_refused_with_nothing_mounted() {
    if !root_or_skip("encryption refusals") {
        return;
    }
    let mut t = T::start().await;
    // At create: encryption with xfs, with raw block, or an unknown method.
    let mut xfs = encrypted("xfs", 300 * MIB);
    xfs.volume_capabilities = vec![rw_mount("xfs")];
    let mut block = encrypted("block", 64 * MIB);
    block.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    let mut luks = encrypted("luks", 64 * MIB);
    luks.parameters.insert("encryption".into(), "luks".into());
    for (what, req) in [("xfs", xfs), ("block", block), ("luks", luks)] {
        let e = t.c.create_volume(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {}", e.message());
    }
    assert!(std::fs::read_dir(t.d.pool.join("volumes"))
        .unwrap()
        .next()
        .is_none());

    let id = create_volume_id(&mut t.c, encrypted("enc", 64 * MIB)).await;
    let huge = "a".repeat(1 << 20);
    let hostile: Vec<(&str, HashMap<String, String>)> = vec![
        ("no Secret", HashMap::new()),
        (
            "no key entry",
            HashMap::from([("password".into(), KEY.into())]),
        ),
        ("63 characters", secrets(&KEY[..63])),
        ("65 characters", secrets(&format!("{KEY}0"))),
        ("not hex", secrets(&format!("{}xz", &OTHER_KEY[..62]))),
        ("huge", secrets(&huge)),
        ("empty", secrets("")),
    ];
    for (what, s) in hostile {
        let e = t.stage(&id, "enc", s).await.unwrap_err();
        assert_eq!(
            e.code(),
            Code::FailedPrecondition,
            "{what}: {}",
            e.message()
        );
        assert!(e.message().contains("Secret"), "{what}: {}", e.message());
        assert!(
            e.message().len() < 500,
            "{what}: the error echoes the input"
        );
        t.nothing_staged(what);
    }
    // ValidateVolumeCapabilities does not confirm raw block, nor an unencrypted class.
    for (what, cap, params) in [
        ("block", block_cap(Mode::SingleNodeWriter), HashMap::new()),
        (
            "no encryption",
            rw_mount("ext4"),
            HashMap::from([("allocation".to_string(), "thin".to_string())]),
        ),
    ] {
        let v =
            t.c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![cap],
                parameters: params,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(v.confirmed.is_none(), "{what}: {v:?}");
        assert!(v.message.contains("encrypt"), "{what}: {}", v.message);
    }
    // Raw block access to an encrypted volume at stage.
    let mut r = stage_req(&id, &t.staging("blk"), block_cap(Mode::SingleNodeWriter));
    r.secrets = secrets(KEY);
    let e = t.n.node_stage_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    t.nothing_staged("block stage");
    // The good key works, and nothing of any key is in the log.
    t.up(&id, "enc", KEY).await;
    t.down(&id, "enc").await;
    let log = t.d.log();
    assert_no_key_in(&log);
    assert!(
        !log.contains(&KEY[..62]),
        "the 63/65-character keys' text is in the log"
    );
    assert!(
        !log.contains(&huge[..64]),
        "the huge Secret's text is in the log"
    );
    assert!(
        !log.contains(&OTHER_KEY[..62]),
        "the non-hex Secret's text is in the log"
    );
    t.d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_volume_expands_and_keeps_its_data() {
    if !root_or_skip("encrypted expansion") {
        return;
    }
    let mut t = T::start().await;
    let id = create_volume_id(&mut t.c, encrypted("grow", 64 * MIB)).await;
    let pod = t.up(&id, "grow", KEY).await;
    let data = pattern(2 * MIB as usize, 5);
    std::fs::write(pod.join("keep"), &data).unwrap();
    let before = nix::sys::statvfs::statvfs(&pod).unwrap();
    t.down(&id, "grow").await;
    let grown =
        t.c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 160 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(rw_mount("ext4")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 160 * MIB);
    // Grown offline at the next stage (resize2fs), then unlocked as before.
    let pod = t.up(&id, "grow", KEY).await;
    let after = nix::sys::statvfs::statvfs(&pod).unwrap();
    assert!(
        after.blocks() * after.fragment_size() > 2 * before.blocks() * before.fragment_size(),
        "the filesystem did not grow: {} -> {} blocks",
        before.blocks(),
        after.blocks()
    );
    assert!(std::fs::read(pod.join("keep")).unwrap() == data);
    std::fs::write(pod.join("after-growth"), pattern(MIB as usize, 6)).unwrap();
    t.down(&id, "grow").await;
    assert!(!image_contains(&t.d.image_of(&id), "after-growth"));
    t.d.assert_clean();
}

async fn raw_channel(d: &Driver) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("unix://{}", d.socket.display()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Ranges a SnapshotMetadata stream lists (allocated, or changed between two snapshots).
async fn ranges<S>(
    mut s: tonic::Streaming<S>,
    of: impl Fn(&S) -> Vec<(i64, i64)>,
) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    while let Some(msg) = s.message().await.unwrap() {
        out.extend(of(&msg));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn group_snapshots_and_changed_blocks_work_on_encrypted_volumes() {
    use loopvol::csi::group_controller_client::GroupControllerClient;
    use loopvol::csi::snapshot_metadata_client::SnapshotMetadataClient;
    if !root_or_skip("encrypted group snapshots") {
        return;
    }
    let mut t = T::start().await;
    let mut g = GroupControllerClient::new(raw_channel(&t.d).await);
    let mut m = SnapshotMetadataClient::new(raw_channel(&t.d).await);
    let a = create_volume_id(&mut t.c, encrypted("a", 64 * MIB)).await;
    let b = create_volume_id(&mut t.c, encrypted("b", 64 * MIB)).await;
    let data = pattern(2 * MIB as usize, 77);
    for (id, tag) in [(&a, "a"), (&b, "b")] {
        let pod = t.up(id, tag, KEY).await;
        std::fs::write(pod.join("payload"), &data).unwrap();
        std::fs::File::open(pod.join("payload"))
            .unwrap()
            .sync_all()
            .unwrap();
    }
    // A group snapshot of two staged, published, encrypted volumes (frozen together).
    let group = g
        .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
            name: "grp".into(),
            source_volume_ids: vec![a.clone(), b.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    let member = |src: &str| {
        group
            .snapshots
            .iter()
            .find(|s| s.source_volume_id == src)
            .unwrap()
            .snapshot_id
            .clone()
    };
    // Changed-block tracking: the member's allocated ranges, then what a later write changed.
    let allocated = m
        .get_metadata_allocated(GetMetadataAllocatedRequest {
            snapshot_id: member(&a),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let allocated = ranges(allocated, |msg| {
        msg.block_metadata
            .iter()
            .map(|b| (b.byte_offset, b.size_bytes))
            .collect()
    })
    .await;
    assert!(
        allocated.iter().map(|r| r.1).sum::<i64>() >= 2 * MIB,
        "the payload's ciphertext is allocated: {allocated:?}"
    );
    std::fs::write(t.target("a").join("later"), pattern(MIB as usize, 78)).unwrap();
    std::fs::File::open(t.target("a").join("later"))
        .unwrap()
        .sync_all()
        .unwrap();
    let after = create_snapshot_id(&mut t.c, &a, "after").await;
    let delta = m
        .get_metadata_delta(GetMetadataDeltaRequest {
            base_snapshot_id: member(&a),
            target_snapshot_id: after,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let delta = ranges(delta, |msg| {
        msg.block_metadata
            .iter()
            .map(|b| (b.byte_offset, b.size_bytes))
            .collect()
    })
    .await;
    assert!(
        delta.iter().map(|r| r.1).sum::<i64>() >= MIB,
        "the later write shows as changed ranges: {delta:?}"
    );
    for (id, tag) in [(&a, "a"), (&b, "b")] {
        t.down(id, tag).await;
    }
    // A member restores, under the same Secret, into a class without encryption.
    let mut restore = create_req("from-group", 64 * MIB, rw_mount("ext4"));
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: member(&b),
            },
        )),
    });
    let restored = create_volume_id(&mut t.c, restore).await;
    let e = t
        .stage(&restored, "r", secrets(OTHER_KEY))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let pod = t.up(&restored, "r", KEY).await;
    assert!(std::fs::read(pod.join("payload")).unwrap() == data);
    t.down(&restored, "r").await;
    assert!(!image_contains(&t.d.image_of(&restored), "payload"));
    t.d.assert_clean();
}

/// An unstage refused because the volume is still published changes nothing: the key stays,
/// and the pod keeps reading and writing.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_unstage_leaves_the_key_and_the_pod_alone() {
    if !root_or_skip("encrypted refused unstage") {
        return;
    }
    let mut t = T::start().await;
    let id = create_volume_id(&mut t.c, encrypted("busy", 64 * MIB)).await;
    let pod = t.up(&id, "busy", KEY).await;
    std::fs::write(pod.join("before"), b"written before").unwrap();
    let e =
        t.n.node_unstage_volume(unstage_req(&id, &t.staging("busy")))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("still mounted"), "{}", e.message());
    assert_eq!(key_status_at(&t.staging("busy")), KeyStatus::Present);
    assert_eq!(
        std::fs::read(pod.join("before")).unwrap(),
        b"written before"
    );
    std::fs::write(pod.join("after"), b"written after").unwrap();
    assert_eq!(std::fs::read(pod.join("after")).unwrap(), b"written after");
    t.down(&id, "busy").await;
    t.d.assert_clean();
}

/// A read-only stage of an encrypted volume (SINGLE_NODE_READER_ONLY) adds the key and reads
/// the data; a read-only stage of one never staged (no data/ yet) is refused with nothing left.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_stage_opens_an_encrypted_volume() {
    if !root_or_skip("encrypted read-only stage") {
        return;
    }
    let mut t = T::start().await;
    let ro = mount_cap("ext4", Mode::SingleNodeReaderOnly);
    let blank = create_volume_id(&mut t.c, encrypted("blank", 64 * MIB)).await;
    let mut r = stage_req(&blank, &t.staging("blank"), ro.clone());
    r.secrets = secrets(KEY);
    let e = t.n.node_stage_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    t.nothing_staged("read-only stage of a blank volume");

    let id = create_volume_id(&mut t.c, encrypted("ro", 64 * MIB)).await;
    let pod = t.up(&id, "rw", KEY).await;
    std::fs::write(pod.join("kept"), b"kept in ciphertext").unwrap();
    t.down(&id, "rw").await;
    let mut r = stage_req(&id, &t.staging("ro"), ro.clone());
    r.secrets = secrets(KEY);
    t.n.node_stage_volume(r).await.unwrap();
    let mut p = publish_req(&id, &t.staging("ro"), &t.target("ro"), ro);
    p.readonly = true;
    t.n.node_publish_volume(p).await.unwrap();
    assert_eq!(
        std::fs::read(t.target("ro").join("kept")).unwrap(),
        b"kept in ciphertext"
    );
    assert!(std::fs::write(t.target("ro").join("new"), b"x").is_err());
    t.down(&id, "ro").await;
    t.d.assert_clean();
}
