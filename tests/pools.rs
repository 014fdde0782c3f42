//! Several pools on one node (issue 25): `serve --pool NAME=DIR`, chosen by the StorageClass
//! parameter `pool`. Two named pools on filesystems of their own (an ext4 and an xfs, each a
//! sparse image on a loop device mounted in its own temp dir) next to the default pool.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::*;
use tonic::transport::Channel;
use tonic::Code;

/// Field order is drop order: the driver (its mounts and loop devices) goes before the
/// filesystems its pools live on.
struct Node {
    d: Driver,
    /// Where `/metrics` is served.
    metrics_port: u16,
    c: ControllerClient<Channel>,
    n: NodeClient<Channel>,
    ext: SmallFs,
    xfs: SmallFs,
}

impl Node {
    /// Pool `ext` on a 160 MiB ext4, pool `xfs` on a 512 MiB xfs capped at 400 MiB of
    /// volumes, and the default pool.
    async fn start() -> Node {
        let ext = SmallFs::new(160 << 20);
        let xfs = SmallFs::xfs(512 << 20);
        let ext_arg = format!("ext={}", ext.mount_point.join("pool").display());
        let xfs_arg = format!(
            "xfs={},max-bytes=400Mi",
            xfs.mount_point.join("pool").display()
        );
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = format!("127.0.0.1:{metrics_port}");
        let d = Driver::start_with(&[
            "--pool",
            &ext_arg,
            "--pool",
            &xfs_arg,
            "--metrics-address",
            &metrics,
        ])
        .await;
        let c = d.controller().await;
        let n = d.node().await;
        Node {
            d,
            metrics_port,
            c,
            n,
            ext,
            xfs,
        }
    }

    /// The value of one series of `/metrics`.
    fn metric(&self, series: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    fn dir(&self, pool: &str) -> PathBuf {
        match pool {
            "ext" => self.ext.mount_point.join("pool"),
            "xfs" => self.xfs.mount_point.join("pool"),
            _ => self.d.pool.clone(),
        }
    }

    fn image(&self, pool: &str, id: &str) -> PathBuf {
        self.dir(pool)
            .join("volumes")
            .join(format!("{}.img", hex_of(id)))
    }

    async fn create(&mut self, req: CreateVolumeRequest) -> Result<Volume, tonic::Status> {
        self.c
            .create_volume(req)
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    async fn capacity(&mut self, params: &[(&str, &str)]) -> Result<i64, tonic::Status> {
        self.c
            .get_capacity(GetCapacityRequest {
                parameters: map(params),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().available_capacity)
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
}

fn map(params: &[(&str, &str)]) -> HashMap<String, String> {
    params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A block volume request with StorageClass parameters.
fn req(name: &str, bytes: i64, params: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        parameters: map(params),
        ..create_req(
            name,
            bytes,
            block_cap(volume_capability::access_mode::Mode::SingleNodeWriter),
        )
    }
}

fn from(mut r: CreateVolumeRequest, source: volume_content_source::Type) -> CreateVolumeRequest {
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(source),
    });
    r
}

fn snapshot_source(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

fn volume_source(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Volume(volume_content_source::VolumeSource {
        volume_id: id.into(),
    })
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

const DATA: [(u64, usize, u64); 2] = [(0, 1 << 20, 1), (40 << 20, 2 << 20, 2)];

/// Write the test's data (3 MiB in two runs, the rest holes) into an image.
fn write_data(image: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    for (off, len, seed) in DATA {
        f.write_all_at(&pattern(len, seed), off).unwrap();
    }
    f.sync_all().unwrap();
}

#[tokio::test]
async fn volumes_land_in_the_pool_their_class_names_and_capacity_is_per_pool() {
    if !root_or_skip("volumes_land_in_the_pool_their_class_names") {
        return;
    }
    let mut t = Node::start().await;
    let ext0 = t.capacity(&[("pool", "ext")]).await.unwrap();
    let xfs0 = t.capacity(&[("pool", "xfs")]).await.unwrap();
    assert!(ext0 > 100 << 20 && ext0 <= 160 << 20, "ext {ext0}");
    // The xfs pool's own cap (`max-bytes=400Mi`), not its filesystem's 490 MiB free.
    assert_eq!(xfs0, 400 * MIB);

    let a = t
        .create(req("a", 32 * MIB, &[("pool", "ext")]))
        .await
        .unwrap();
    assert_eq!(
        a.volume_id,
        format!("vol-{}~ext@{NODE}", hex_of(&a.volume_id))
    );
    assert!(t.image("ext", &a.volume_id).exists());
    assert!(!t.image("xfs", &a.volume_id).exists());
    assert!(!t.image("default", &a.volume_id).exists());
    let ext1 = t.capacity(&[("pool", "ext")]).await.unwrap();
    // A thin volume reserves its size in its own pool (plus at most a few metadata blocks).
    let taken = ext0 - ext1;
    assert!(
        (32 * MIB..32 * MIB + (64 << 10)).contains(&taken),
        "ext lost {taken}"
    );
    assert_eq!(t.capacity(&[("pool", "xfs")]).await.unwrap(), xfs0);

    let b = t
        .create(req(
            "b",
            64 * MIB,
            &[("pool", "xfs"), ("allocation", "thick")],
        ))
        .await
        .unwrap();
    assert!(
        b.volume_id.ends_with(&format!("~xfs@{NODE}")),
        "{}",
        b.volume_id
    );
    assert!(t.image("xfs", &b.volume_id).exists());
    assert!(allocated(&t.image("xfs", &b.volume_id)) >= 64 << 20);
    let xfs1 = t.capacity(&[("pool", "xfs")]).await.unwrap();
    assert_eq!(xfs1, 336 * MIB);
    assert_eq!(t.capacity(&[("pool", "ext")]).await.unwrap(), ext1);

    // No parameter: the default pool, with the IDs it always had.
    let c = t.create(req("c", 16 * MIB, &[])).await.unwrap();
    assert_eq!(c.volume_id, format!("vol-{}@{NODE}", hex_of(&c.volume_id)));
    assert!(t.image("default", &c.volume_id).exists());

    // `loopvol status` with the node's pools: one report each, never summed.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(["status", "-o", "json", "--pool-dir"])
        .arg(&t.d.pool)
        .arg("--pool")
        .arg(format!("ext={}", t.dir("ext").display()))
        .arg("--pool")
        .arg(format!("xfs={}", t.dir("xfs").display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reports = reports.as_array().expect("one report per pool");
    let names: Vec<_> = reports
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "ext", "xfs"]);
    for r in reports {
        assert_eq!(r["volumes"], 1, "{r}");
    }
    assert_eq!(reports[1]["filesystem"], "ext4");
    assert_eq!(reports[2]["filesystem"], "xfs");

    // Metrics: one series per pool, logical (provisioned) and physical (allocated) apart.
    let m = |s: &str| t.metric(s).unwrap_or_else(|| panic!("no series {s}"));
    for pool in ["default", "ext", "xfs"] {
        assert_eq!(
            m(&format!("loopvol_pool_volumes{{pool=\"{pool}\"}}")),
            1.0,
            "{pool}"
        );
    }
    assert_eq!(
        m(r#"loopvol_pool_provisioned_bytes{pool="ext"}"#),
        (32 * MIB) as f64
    );
    assert!(m(r#"loopvol_pool_allocated_bytes{pool="ext"}"#) < (1 << 20) as f64);
    assert_eq!(
        m(r#"loopvol_pool_provisioned_bytes{pool="xfs"}"#),
        (64 * MIB) as f64
    );
    assert!(m(r#"loopvol_pool_allocated_bytes{pool="xfs"}"#) >= (64 * MIB) as f64);
    assert_eq!(m(r#"loopvol_pool_reserved_bytes{pool="xfs"}"#), 0.0);
    assert_eq!(
        m(r#"loopvol_pool_reserved_bytes{pool="ext"}"#),
        (32 * MIB) as f64
    );

    // A pool this node lacks has no capacity here; a malformed name is the caller's error.
    assert_eq!(t.capacity(&[("pool", "nvme")]).await.unwrap(), 0);
    assert_eq!(
        code_of(t.capacity(&[("pool", "Bad_Name")]).await),
        Code::InvalidArgument
    );

    // Node operations find the pool from the ID: its staging record is in that pool's node/.
    let staging = t.d.path("staging-b");
    let cap = block_cap(volume_capability::access_mode::Mode::SingleNodeWriter);
    t.n.node_stage_volume(stage_req(&b.volume_id, &staging, cap))
        .await
        .unwrap();
    let record = |pool: &str| {
        t.dir(pool)
            .join("node")
            .join(format!("{}.json", hex_of(&b.volume_id)))
    };
    assert!(record("xfs").exists(), "staging record in the xfs pool");
    assert!(!record("default").exists());
    t.n.node_unstage_volume(unstage_req(&b.volume_id, &staging))
        .await
        .unwrap();
    for id in [&a.volume_id, &b.volume_id, &c.volume_id] {
        t.c.delete_volume(DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(!t.image("xfs", &b.volume_id).exists());
    // xfs frees a deleted file's blocks in the background (inode inactivation): wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.capacity(&[("pool", "xfs")]).await.unwrap() != 400 * MIB {
        assert!(
            Instant::now() < deadline,
            "the xfs pool did not get its space back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = t.capacity(&[("pool", "ext")]).await.unwrap();
    assert!(ext0 - back < 64 << 10, "ext has {back} of {ext0} back");
    t.d.assert_clean();
}

#[tokio::test]
async fn pool_names_are_checked_and_a_name_lives_in_one_pool() {
    if !root_or_skip("pool_names_are_checked_and_a_name_lives_in_one_pool") {
        return;
    }
    let mut t = Node::start().await;
    let r = t.create(req("x", 16 * MIB, &[("pool", "nvme")])).await;
    assert_eq!(code_of(r), Code::ResourceExhausted);
    let r = t.create(req("x", 16 * MIB, &[("pool", "Bad_Name")])).await;
    assert_eq!(code_of(r), Code::InvalidArgument);
    let r = t
        .create(req("x", 16 * MIB, &[("pool", "a-very-long-pool-name")]))
        .await;
    assert_eq!(code_of(r), Code::InvalidArgument);

    let dup = t
        .create(req("dup", 16 * MIB, &[("pool", "ext")]))
        .await
        .unwrap();
    for other in [&[("pool", "xfs")][..], &[]] {
        let r = t.create(req("dup", 16 * MIB, other)).await;
        assert_eq!(code_of(r), Code::AlreadyExists, "{other:?}");
    }
    // The same request again is the same volume (idempotent), in its pool only.
    let again = t
        .create(req("dup", 16 * MIB, &[("pool", "ext")]))
        .await
        .unwrap();
    assert_eq!(again.volume_id, dup.volume_id);
    assert!(!t.image("xfs", &dup.volume_id).exists());
    assert!(!t.image("default", &dup.volume_id).exists());

    // A snapshot name lives in one pool too.
    let other = t
        .create(req("other", 16 * MIB, &[("pool", "xfs")]))
        .await
        .unwrap();
    let s = t.snapshot("s", &dup.volume_id).await.unwrap();
    assert!(s.snapshot_id.contains("~ext@"), "{}", s.snapshot_id);
    assert_eq!(
        code_of(t.snapshot("s", &other.volume_id).await),
        Code::AlreadyExists
    );

    // A group snapshot lives in the pool of its volumes: one pool, one group.
    let ch = tonic::transport::Endpoint::from_shared(format!("unix://{}", t.d.socket.display()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut g = loopvol::csi::group_controller_client::GroupControllerClient::new(ch);
    let group = |name: &str, ids: &[&str]| CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: ids.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let across = g
        .create_volume_group_snapshot(group("g1", &[&dup.volume_id, &other.volume_id]))
        .await;
    assert_eq!(code_of(across), Code::NotFound);
    let one = g
        .create_volume_group_snapshot(group("g2", &[&dup.volume_id]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(
        one.group_snapshot_id.contains("~ext@"),
        "{}",
        one.group_snapshot_id
    );
    assert!(one
        .snapshots
        .iter()
        .all(|s| s.snapshot_id.contains("~ext@")));
    g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: one.group_snapshot_id.clone(),
        snapshot_ids: one
            .snapshots
            .iter()
            .map(|s| s.snapshot_id.clone())
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap();

    // ValidateVolumeCapabilities: a class naming another pool does not fit the volume.
    let validate = |pool: &str| ValidateVolumeCapabilitiesRequest {
        volume_id: dup.volume_id.clone(),
        volume_capabilities: vec![block_cap(
            volume_capability::access_mode::Mode::SingleNodeWriter,
        )],
        parameters: map(&[("pool", pool)]),
        ..Default::default()
    };
    let ok =
        t.c.validate_volume_capabilities(validate("ext"))
            .await
            .unwrap();
    assert!(ok.into_inner().confirmed.is_some());
    let no =
        t.c.validate_volume_capabilities(validate("xfs"))
            .await
            .unwrap();
    let no = no.into_inner();
    assert!(
        no.confirmed.is_none() && no.message.contains("pool"),
        "{}",
        no.message
    );
}

#[tokio::test]
async fn a_full_pool_refuses_while_the_other_accepts() {
    if !root_or_skip("a_full_pool_refuses_while_the_other_accepts") {
        return;
    }
    let mut t = Node::start().await;
    let thick = |pool| [("pool", pool), ("allocation", "thick")];
    let r = t.create(req("big", 200 * MIB, &thick("ext"))).await;
    assert_eq!(code_of(r), Code::ResourceExhausted);
    assert!(!t.image("ext", &id_in("big", "ext")).exists());
    let big = t
        .create(req("big", 200 * MIB, &thick("xfs")))
        .await
        .unwrap();
    assert!(allocated(&t.image("xfs", &big.volume_id)) >= 200 << 20);
    // The ext pool still takes what fits.
    t.create(req("small", 32 * MIB, &thick("ext")))
        .await
        .unwrap();
}

/// The ID pool `pool` gives `name`, to look for files a refused create must not leave.
fn id_in(name: &str, pool: &str) -> String {
    provisioner::VolumeId::from_name_in(provisioner::ids::Kind::Volume, name, pool, NODE)
        .to_string()
}

// Multi-threaded: the dropped clients' connections close while this thread waits for the
// driver to exit.
#[tokio::test(flavor = "multi_thread")]
async fn restores_and_clones_cross_pools_sparse_and_survive_a_restart() {
    if !root_or_skip("restores_and_clones_cross_pools_sparse_and_survive_a_restart") {
        return;
    }
    let mut t = Node::start().await;
    let src = t
        .create(req("src", 64 * MIB, &[("pool", "ext")]))
        .await
        .unwrap();
    let src_image = t.image("ext", &src.volume_id);
    write_data(&src_image);
    let want = sha256_file(&src_image);
    let data: u64 = DATA.iter().map(|(_, len, _)| *len as u64).sum();

    let snap = t.snapshot("snap", &src.volume_id).await.unwrap();
    assert_eq!(
        snap.snapshot_id,
        format!("snap-{}~ext@{NODE}", hex_of_snapshot(&snap.snapshot_id))
    );
    let snap_image = t
        .dir("ext")
        .join("snapshots")
        .join(format!("{}.img", hex_of_snapshot(&snap.snapshot_id)));
    assert!(snap_image.exists(), "snapshots live in their source's pool");

    let mut made = vec![(src.volume_id.clone(), "ext")];
    for (name, pool, source) in [
        ("restored-xfs", "xfs", snapshot_source(&snap.snapshot_id)),
        (
            "restored-default",
            "default",
            snapshot_source(&snap.snapshot_id),
        ),
        ("clone-xfs", "xfs", volume_source(&src.volume_id)),
        ("clone-default", "default", volume_source(&src.volume_id)),
    ] {
        let v = t
            .create(from(req(name, 0, &[("pool", pool)]), source))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.capacity_bytes, 64 * MIB, "{name}");
        let image = t.image(pool, &v.volume_id);
        assert_eq!(sha256_file(&image), want, "{name}: data differs");
        let used = allocated(&image);
        // Sparse: the data and a little filesystem slack, not the 64 MiB of the image.
        assert!(
            used >= data && used <= data + (1 << 20),
            "{name}: {used} bytes allocated"
        );
        made.push((v.volume_id, pool));
    }

    // Close this test's connections first: a SIGTERM'd driver lets open connections finish.
    let idle = || tonic::transport::Endpoint::from_static("http://[::1]:1").connect_lazy();
    (t.c, t.n) = (ControllerClient::new(idle()), NodeClient::new(idle()));
    let status = t.d.stop();
    assert!(status.success(), "SIGTERM exit: {status}");
    t.d.spawn().await;
    t.c = t.d.controller().await;
    // Every volume is still there, in its pool, listed once across pools page by page.
    let mut listed = BTreeSet::new();
    let mut token = String::new();
    loop {
        let page =
            t.c.list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        for e in page.entries {
            assert!(listed.insert(e.volume.unwrap().volume_id), "listed twice");
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let expected: BTreeSet<String> = made.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(listed, expected);
    for (id, pool) in &made {
        assert_eq!(sha256_file(&t.image(pool, id)), want, "{id} after restart");
        t.c.controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap();
    }
    let snaps =
        t.c.list_snapshots(ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner();
    let ids: Vec<_> = snaps
        .entries
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect();
    assert_eq!(ids, vec![snap.snapshot_id.clone()]);
    let bad =
        t.c.list_volumes(ListVolumesRequest {
            max_entries: 1,
            starting_token: "nvme_:0123".into(),
        })
        .await;
    assert_eq!(code_of(bad), Code::Aborted);
}

fn hex_of_snapshot(id: &str) -> String {
    provisioner::VolumeId::parse(provisioner::ids::Kind::Snapshot, id)
        .expect("a loopvol snapshot id")
        .hex
}

/// A node ID too long for a named pool's IDs is refused at start, with the arithmetic.
#[test]
fn a_named_pool_needs_room_for_its_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .arg("serve")
        .args(["--node-id", &"n".repeat(100)])
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.path().join("csi.sock").display()))
        .arg("--pool-dir")
        .arg(dir.path().join("default"))
        .arg("--pool")
        .arg(format!("fast={}", dir.path().join("fast").display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loopvol served a named pool on a 100-byte node ID");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // 6 ("group-") + 20 + 5 ("~fast") + 1 + 100 = 132.
    assert!(
        err.contains("= 132 bytes, over the CSI limit of 128"),
        "{err}"
    );
    assert!(err.contains("at most 96 bytes"), "{err}");
}

/// `loopvol volume create --pool-name` makes a static volume whose ID names its pool, so the
/// driver serving that directory as `--pool fast=DIR` finds it; `volume delete` takes the pool
/// from the ID.
#[tokio::test(flavor = "multi_thread")]
async fn a_static_volume_of_a_named_pool_is_served_by_that_pool() {
    if !root_or_skip("a_static_volume_of_a_named_pool_is_served_by_that_pool") {
        return;
    }
    let fast = tempfile::tempdir().unwrap();
    let dir = fast.path().join("fast");
    let dir_arg = dir.to_string_lossy().into_owned();
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
            .args(args)
            .args(["--pool-dir", &dir_arg, "--node-id", NODE])
            .output()
            .unwrap()
    };
    let out = cli(&[
        "volume",
        "create",
        "--pool-name",
        "fast",
        "--name",
        "data-1",
        "--size",
        "16Mi",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = id_in("data-1", "fast");
    let manifest = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        manifest.contains(&format!("volumeHandle: {id}")),
        "{manifest}"
    );

    let mut d = Driver::start_with(&["--pool", &format!("fast={dir_arg}")]).await;
    {
        let mut c = d.controller().await;
        let v = c
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.volume.unwrap().capacity_bytes, 16 * MIB);
    }
    assert!(d.stop().success());
    let out = cli(&["volume", "delete", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir
        .join("volumes")
        .join(format!("{}.img", hex_of(&id)))
        .exists());
}

/// A pool whose `--pool` flag is dropped at a restart is not served, but its volumes are not
/// "gone": RPCs naming them are refused with FAILED_PRECONDITION (never NOT_FOUND, never a
/// delete that answers OK and deletes nothing), and once the flag is back they work again.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_dropped_from_the_flags_is_refused_not_forgotten() {
    if !root_or_skip("a_pool_dropped_from_the_flags_is_refused") {
        return;
    }
    let mut t = Node::start().await;
    let v = t
        .create(req("kept", 32 * MIB, &[("pool", "ext")]))
        .await
        .unwrap();
    let staging = t.d.path("staging-kept");
    let cap = block_cap(volume_capability::access_mode::Mode::SingleNodeWriter);
    t.n.node_stage_volume(stage_req(&v.volume_id, &staging, cap))
        .await
        .unwrap();
    let image = t.image("ext", &v.volume_id);
    let flags = |with_ext: bool| {
        let mut f = vec![format!(
            "xfs={},max-bytes=400Mi",
            t.xfs.mount_point.join("pool").display()
        )];
        if with_ext {
            f.push(format!("ext={}", t.ext.mount_point.join("pool").display()));
        }
        f.into_iter()
            .flat_map(|p| ["--pool".to_string(), p])
            .collect::<Vec<_>>()
    };
    let (without, with) = (flags(false), flags(true));
    let restart = |t: &mut Node, args: &[String]| {
        let idle = || tonic::transport::Endpoint::from_static("http://[::1]:1").connect_lazy();
        (t.c, t.n) = (ControllerClient::new(idle()), NodeClient::new(idle()));
        assert!(t.d.stop().success());
        t.d.set_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    restart(&mut t, &without);
    t.d.spawn().await;
    (t.c, t.n) = (t.d.controller().await, t.d.node().await);
    let deleted =
        t.c.delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await;
    let err = deleted.expect_err("a delete in an unserved pool must not answer OK");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("--pool ext=DIR"), "{err:?}");
    let unstaged =
        t.n.node_unstage_volume(unstage_req(&v.volume_id, &staging))
            .await;
    assert_eq!(code_of(unstaged), Code::FailedPrecondition);
    assert!(image.exists(), "the volume's image must survive");
    assert!(
        std::fs::read_to_string(
            t.ext
                .mount_point
                .join("pool/node")
                .join(format!("{}.json", hex_of(&v.volume_id)))
        )
        .is_ok(),
        "the staging record must survive"
    );

    // The flag back: the same calls succeed.
    restart(&mut t, &with);
    t.d.spawn().await;
    (t.c, t.n) = (t.d.controller().await, t.d.node().await);
    t.n.node_unstage_volume(unstage_req(&v.volume_id, &staging))
        .await
        .unwrap();
    t.c.delete_volume(DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!image.exists());
}

/// `loopvol doctor --pool NAME=DIR` checks every pool the node serves, each check naming its
/// pool: the ext4 pool (and the default one on the same ext4) warns that its snapshots and
/// clones are copies that freeze their source, the xfs reflink pool does not; the node's own
/// checks run once.
#[test]
fn doctor_checks_each_pool_and_names_it() {
    if !root_or_skip("doctor_checks_each_pool_and_names_it") {
        return;
    }
    let ext = SmallFs::new(64 << 20);
    let xfs = SmallFs::xfs(300 << 20);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .arg("doctor")
        .arg("--pool-dir")
        .arg(ext.mount_point.join("default"))
        .arg("--kubelet-dir")
        .arg(ext.mount_point.join("no-kubelet-here"))
        .arg("--pool")
        .arg(format!("ext={}", ext.mount_point.join("pool").display()))
        .arg("--pool")
        .arg(format!(
            "xfs={},overcommit-ratio=2",
            xfs.mount_point.join("pool").display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "a warning is not a failure:\n{text}");
    assert!(!text.contains('✘'), "{text}");
    for pool in ["default", "ext"] {
        assert!(
            text.contains(&format!(
                "⚠ reflink (FICLONE) in pool {pool}: not supported by ext4: snapshots and \
                 clones in pool {pool} are sparse copies"
            )),
            "{text}"
        );
    }
    assert!(
        text.contains("✔ reflink (FICLONE) in pool xfs: xfs shares extents"),
        "{text}"
    );
    assert!(!text.contains("⚠ reflink (FICLONE) in pool xfs"), "{text}");
    // Every pool check of every pool, named; none without a pool.
    let pool_checks = [
        "pool directory",
        "node ID",
        "direct I/O (O_DIRECT)",
        "reflink (FICLONE)",
        "free space",
        "orphaned loop devices",
        "orphaned records",
        "frozen filesystems",
        "staged filesystems",
    ];
    for check in pool_checks {
        for pool in ["default", "ext", "xfs"] {
            let line = format!("{check} in pool {pool}: ");
            assert_eq!(text.matches(&line).count(), 1, "{line}\n{text}");
        }
        assert!(!text.contains(&format!("{check}: ")), "{check}\n{text}");
    }
    assert_eq!(text.matches("kernel loop support").count(), 1, "{text}");
}
