//! A node plugin restart the way a DaemonSet rolling update does it. The driver runs in a mount
//! namespace of its own (its container), with the pool and a kubelet-like directory
//! bind-mounted at other paths than on the host, the kubelet directory shared both ways
//! (`mountPropagation: Bidirectional`). `kill -9` takes the namespace with it; a new driver in
//! a fresh namespace, with fresh bind paths, must find every device and mount again while a
//! writer on the host keeps going.
//!
//! The host side of each test lives in one temp dir, bind-mounted onto itself and made private
//! so that nothing a test mounts there can propagate anywhere else; its kubelet directory is a
//! shared mount inside that fence. Everything is unmounted and detached on drop.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::*;
use loopvol::datapath::loop_device;
use nix::mount::{umount2, MntFlags};
use tonic::transport::Channel;

/// One node: the host's pool and kubelet directories, and the driver "container" running now.
struct Node {
    dir: tempfile::TempDir,
    /// The canonical temp dir: every mount of the test is under it.
    root: PathBuf,
    host_pool: PathBuf,
    host_kubelet: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    /// The bind paths of the running (or last) container.
    ns: Option<Container>,
}

#[derive(Clone)]
struct Container {
    name: String,
    pool: PathBuf,
    kubelet: PathBuf,
    log: PathBuf,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::Builder::new()
            .prefix("loopvol-restart-")
            .tempdir()
            .unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let host_pool = root.join("host/pool");
        let host_kubelet = root.join("host/kubelet");
        std::fs::create_dir_all(&host_pool).unwrap();
        std::fs::create_dir_all(&host_kubelet).unwrap();
        let node = Node {
            socket: root.join("csi.sock"),
            dir,
            root,
            host_pool,
            host_kubelet,
            child: None,
            ns: None,
        };
        // The fence: nothing below propagates out of the test; the host's kubelet directory
        // is a shared mount, as Bidirectional propagation needs.
        container::fence(&node.root, &[&node.host_kubelet]);
        node
    }

    /// Start a driver in a fresh mount namespace whose pool and kubelet directory are bound at
    /// `<root>/<name>/{pool,kubelet}`.
    async fn start(&mut self, name: &str) {
        assert!(self.child.is_none(), "a driver is running");
        let base = self.root.join(name);
        let ns = Container {
            name: name.to_string(),
            pool: base.join("pool"),
            kubelet: base.join("kubelet"),
            log: self.root.join(format!("driver-{name}.log")),
        };
        std::fs::create_dir_all(&ns.pool).unwrap();
        std::fs::create_dir_all(&ns.kubelet).unwrap();
        let log = File::create(&ns.log).unwrap();
        let unshare = container::unshare_args();
        let child = Command::new(&unshare[0])
            .args(&unshare[1..])
            .arg(&self.host_pool)
            .arg(&self.host_kubelet)
            .arg(&ns.pool)
            .arg(&ns.kubelet)
            .arg(env!("CARGO_BIN_EXE_loopvol"))
            .args([
                "serve",
                "--mode",
                "all",
                "--node-id",
                NODE,
                "--log-level",
                "info",
            ])
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--pool-dir")
            .arg(&ns.pool)
            // This container's kubelet directory, as the DaemonSet names /var/lib/kubelet.
            .arg("--kubelet-dir")
            .arg(&ns.kubelet)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run unshare");
        self.child = Some(child);
        self.ns = Some(ns);
        // The socket of a killed predecessor stays behind; wait for one that answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                let mut id = self.identity().await;
                if id.probe(ProbeRequest {}).await.is_ok() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "driver {name} exited early ({status}); log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "driver {name} did not come up; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9 the driver: its mount namespace dies with it, the mounts it made propagated to
    /// the host stay, and so do its loop devices.
    fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        let _ = c.kill();
        let _ = c.wait();
    }

    fn ns(&self) -> &Container {
        self.ns.as_ref().expect("a container was started")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.ns().log).unwrap_or_default()
    }

    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("unix://{}", self.socket.display()))
            .unwrap()
            .connect()
            .await
            .expect("connect to loopvol")
    }

    async fn identity(&self) -> loopvol::csi::identity_client::IdentityClient<Channel> {
        loopvol::csi::identity_client::IdentityClient::new(self.channel().await)
    }

    async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    fn image(&self, id: &str) -> PathBuf {
        let hex = id
            .strip_prefix("vol-")
            .and_then(|s| s.split_once('@'))
            .unwrap()
            .0;
        self.host_pool.join("volumes").join(format!("{hex}.img"))
    }

    /// Mounts under the test's kubelet directory as the host sees them (the directory's own
    /// bind mount excluded), and loop devices over the pool.
    fn leftovers(&self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let mounts = loopvol::fs::mount::mounts()
            .unwrap()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&self.host_kubelet) && *p != self.host_kubelet)
            .collect();
        let loops = loop_device::loops_under(&self.host_pool)
            .into_iter()
            .map(|l| l.device)
            .collect();
        (mounts, loops)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deepest first: volume mounts, then the kubelet directory, then the fence itself.
        let mut mounts: Vec<PathBuf> = loopvol::fs::mount::mounts()
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&self.root))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            let _ = umount2(&m, MntFlags::MNT_DETACH);
        }
        for l in loop_device::loops_under(&self.host_pool) {
            let _ = loopvol::datapath::loop_device::detach(&l.device);
        }
        let _ = &self.dir;
    }
}

/// Appends 4 KiB blocks to a file on a volume and fsyncs each, from the host, until stopped;
/// the first error ends it.
struct Writer {
    stop: Arc<AtomicBool>,
    blocks: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

const BLOCK: usize = 4096;

fn block(i: u64) -> Vec<u8> {
    pattern(BLOCK, i)
}

impl Writer {
    fn start(path: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let blocks = Arc::new(AtomicU64::new(0));
        let (s, b) = (stop.clone(), blocks.clone());
        let thread = std::thread::spawn(move || -> Result<(), String> {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            while !s.load(Ordering::SeqCst) {
                let i = b.load(Ordering::SeqCst);
                f.write_all(&block(i))
                    .and_then(|_| f.sync_data())
                    .map_err(|e| format!("block {i}: {e}"))?;
                b.store(i + 1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        });
        Writer {
            stop,
            blocks,
            thread: Some(thread),
        }
    }

    fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::SeqCst)
    }

    /// Wait until at least `n` more blocks were written (the writer is really going).
    fn wait_for(&self, n: u64) {
        let start = self.blocks();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.blocks() < start + n {
            assert!(
                Instant::now() < deadline,
                "the writer stalled at block {}",
                self.blocks()
            );
            assert!(
                !self.thread.as_ref().unwrap().is_finished(),
                "the writer stopped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(mut self) -> (u64, Result<(), String>) {
        self.stop.store(true, Ordering::SeqCst);
        let r = self.thread.take().unwrap().join().expect("writer thread");
        (self.blocks(), r)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One test volume and where the kubelet put it.
struct Vol {
    tag: &'static str,
    id: String,
    cap: VolumeCapability,
    block: bool,
}

impl Vol {
    fn staging(&self, kubelet: &Path) -> PathBuf {
        kubelet.join(format!(
            "plugins/kubernetes.io/csi/loopvol.csi.dev/{}/globalmount",
            self.tag
        ))
    }

    fn target(&self, kubelet: &Path) -> PathBuf {
        if self.block {
            kubelet.join(format!("pods/pod-{}/volumeDevices/dev", self.tag))
        } else {
            kubelet.join(format!(
                "pods/pod-{}/volumes/kubernetes.io~csi/{}/mount",
                self.tag, self.tag
            ))
        }
    }
}

async fn stage(n: &mut NodeClient<Channel>, v: &Vol, kubelet: &Path) -> Result<(), tonic::Status> {
    n.node_stage_volume(NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging(kubelet).to_string_lossy().into(),
        volume_capability: Some(v.cap.clone()),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn publish(
    n: &mut NodeClient<Channel>,
    v: &Vol,
    kubelet: &Path,
) -> Result<(), tonic::Status> {
    n.node_publish_volume(NodePublishVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging(kubelet).to_string_lossy().into(),
        target_path: v.target(kubelet).to_string_lossy().into(),
        volume_capability: Some(v.cap.clone()),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn stats(
    n: &mut NodeClient<Channel>,
    v: &Vol,
    kubelet: &Path,
) -> Result<Vec<VolumeUsage>, tonic::Status> {
    n.node_get_volume_stats(NodeGetVolumeStatsRequest {
        volume_id: v.id.clone(),
        volume_path: v.target(kubelet).to_string_lossy().into(),
        staging_target_path: v.staging(kubelet).to_string_lossy().into(),
    })
    .await
    .map(|r| r.into_inner().usage)
}

async fn health(n: &mut NodeClient<Channel>, v: &Vol) -> Vec<volume_health::VolumeHealthEntry> {
    n.node_get_volume_health(NodeGetVolumeHealthRequest {
        volume_id: v.id.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .volume_health
    .unwrap()
    .health_statuses
}

/// Exactly one loop device backs the volume's image; which one.
fn the_device(node: &Node, v: &Vol) -> loopvol::datapath::Attachment {
    let loops = loop_device::loops_backed_by(&node.image(&v.id));
    assert_eq!(loops.len(), 1, "{}: {loops:?}", v.tag);
    loops.into_iter().next().unwrap()
}

/// What a restarted driver must have logged: every volume re-adopted, none given up as
/// detached.
fn assert_recovered(node: &Node, vols: &[Vol]) {
    let log = node.log();
    for v in vols {
        assert!(
            log.contains(&format!("re-adopted {}", v.id)),
            "{} ({}) not re-adopted by {}; log:\n{log}",
            v.tag,
            v.id,
            node.ns().name
        );
    }
    assert!(
        !log.contains("no longer attached"),
        "attached volumes reported as detached; log:\n{log}"
    );
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_plugin_container_restart_leaves_running_volumes_alone() {
    if !root_or_skip("container restart") {
        return;
    }
    let mut node = Node::new();
    node.start("container-a").await;
    let mut c = node.controller().await;
    let mut n = node.node().await;
    let kubelet_a = node.ns().kubelet.clone();

    let specs: [(&str, VolumeCapability, i64, bool); 4] = [
        ("ext4", rw_mount("ext4"), 64 * MIB, false),
        ("xfs", rw_mount("xfs"), 300 * MIB, false),
        ("btrfs", rw_mount("btrfs"), 256 * MIB, false),
        (
            "block",
            block_cap(loopvol::csi::volume_capability::access_mode::Mode::SingleNodeWriter),
            32 * MIB,
            true,
        ),
    ];
    let mut vols = Vec::new();
    for (tag, cap, bytes, block) in specs {
        let id = c
            .create_volume(create_req(tag, bytes, cap.clone()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let v = Vol {
            tag,
            id,
            cap,
            block,
        };
        stage(&mut n, &v, &kubelet_a).await.unwrap();
        publish(&mut n, &v, &kubelet_a).await.unwrap();
        vols.push(v);
    }
    let [ext4, xfs, btrfs, blockv] = &vols[..] else {
        unreachable!()
    };
    let host = node.host_kubelet.clone();
    // What the pods see, from the host: the mounts propagated out of the container.
    let data = pattern(MIB as usize, 19);
    for v in [xfs, btrfs] {
        std::fs::write(v.target(&host).join("data"), &data).unwrap();
        File::open(v.target(&host).join("data"))
            .unwrap()
            .sync_all()
            .unwrap();
    }
    write_at(&blockv.target(&host), MIB as u64, &data);
    let devices: Vec<PathBuf> = vols.iter().map(|v| the_device(&node, v).device).collect();
    let writer = Writer::start(ext4.target(&host).join("log"));
    writer.wait_for(20);

    // A rolling update deletes the pod: the container and its mount namespace are gone.
    node.kill9();
    for v in &vols {
        let l = the_device(&node, v);
        assert!(
            !l.backing_file.starts_with(&node.root),
            "sysfs should print {}'s backing file relative to the vanished bind mount, \
             as it does after a real container restart: {}",
            v.tag,
            l.backing_file.display()
        );
    }
    writer.wait_for(20);
    // The admin tools, run on the host meanwhile, still tie each device to its volume.
    let loopvol = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_loopvol"))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let pool = node.host_pool.to_string_lossy().into_owned();
    let status: serde_json::Value = serde_json::from_str(&loopvol(&[
        "status",
        "--pool-dir",
        &pool,
        "--output",
        "json",
    ]))
    .unwrap();
    for v in &vols {
        let dev = status["loop_devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["volume_id"] == v.id.as_str())
            .unwrap_or_else(|| panic!("status lost {}'s device: {status}", v.tag));
        assert_eq!(dev["device"], the_device(&node, v).device.to_str().unwrap());
        let staged = status["staged"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["volume_id"] == v.id.as_str())
            .unwrap();
        assert_eq!(staged["state"], "staged", "{}: {staged}", v.tag);
    }
    let kubelet = node.host_kubelet.to_string_lossy().into_owned();
    let doctor = loopvol(&["doctor", "--pool-dir", &pool, "--kubelet-dir", &kubelet]);
    assert!(
        doctor.contains("✔ orphaned loop devices"),
        "doctor calls the volumes' devices orphans:\n{doctor}"
    );

    // The new pod: a fresh namespace, the pool and kubelet directory bound elsewhere.
    node.start("container-b").await;
    let mut c = node.controller().await;
    let mut n = node.node().await;
    let kubelet_b = node.ns().kubelet.clone();
    assert_recovered(&node, &vols);
    assert_eq!(
        std::fs::read_dir(node.host_pool.join("node"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .count(),
        vols.len(),
        "every staging record is kept"
    );
    for v in &vols {
        let usage = stats(&mut n, v, &kubelet_b).await.unwrap();
        assert!(usage[0].total > 0, "{}: {usage:?}", v.tag);
        assert!(health(&mut n, v).await.is_empty(), "{}", v.tag);
        // The kubelet stages and publishes again after a plugin restart: the device is
        // reused, never a second one attached.
        stage(&mut n, v, &kubelet_b).await.unwrap();
        publish(&mut n, v, &kubelet_b).await.unwrap();
    }
    for (v, dev) in vols.iter().zip(&devices) {
        assert_eq!(the_device(&node, v).device, *dev, "{}", v.tag);
    }
    assert_eq!(
        stats(&mut n, blockv, &kubelet_b).await.unwrap()[0].total,
        32 * MIB
    );

    // Online expansion through the new namespace's paths: xfs grows mounted, block refreshes.
    for (v, bytes) in [(xfs, 400 * MIB), (blockv, 48 * MIB)] {
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: v.id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capability: Some(v.cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
        let grown = n
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: v.id.clone(),
                volume_path: v.target(&kubelet_b).to_string_lossy().into(),
                staging_target_path: v.staging(&kubelet_b).to_string_lossy().into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capability: Some(v.cap.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(grown.capacity_bytes >= bytes, "{}: {grown:?}", v.tag);
    }
    let st = nix::sys::statvfs::statvfs(&xfs.target(&host)).unwrap();
    assert!(
        st.blocks() * st.fragment_size() > 300 * MIB as u64,
        "xfs grew online"
    );
    writer.wait_for(20);

    // Again, with the bind paths different once more.
    node.kill9();
    writer.wait_for(20);
    node.start("container-c").await;
    let mut c = node.controller().await;
    let mut n = node.node().await;
    let kubelet_c = node.ns().kubelet.clone();
    assert_recovered(&node, &vols);
    for v in &vols {
        assert!(
            stats(&mut n, v, &kubelet_c).await.unwrap()[0].total > 0,
            "{}",
            v.tag
        );
    }
    // Expansion before anything was staged again through this container (btrfs grows
    // through whichever of its mounts this container can see).
    c.controller_expand_volume(ControllerExpandVolumeRequest {
        volume_id: btrfs.id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 320 * MIB,
            limit_bytes: 0,
        }),
        volume_capability: Some(btrfs.cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_expand_volume(NodeExpandVolumeRequest {
        volume_id: btrfs.id.clone(),
        volume_path: btrfs.target(&kubelet_c).to_string_lossy().into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 320 * MIB,
            limit_bytes: 0,
        }),
        volume_capability: Some(btrfs.cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let st = nix::sys::statvfs::statvfs(&btrfs.target(&host)).unwrap();
    assert!(
        st.blocks() * st.fragment_size() > 256 * MIB as u64,
        "btrfs grew online"
    );
    stage(&mut n, ext4, &kubelet_c).await.unwrap();
    assert_eq!(the_device(&node, ext4).device, devices[0]);

    // The pods go away: everything is torn down through the third container.
    let (blocks, result) = writer.finish();
    assert_eq!(result, Ok(()), "the writer saw an error");
    let log = ext4.target(&host).join("log");
    assert_eq!(
        std::fs::metadata(&log).unwrap().len(),
        blocks * BLOCK as u64
    );
    for i in [0, blocks / 2, blocks - 1] {
        assert_eq!(
            read_at(&log, i * BLOCK as u64, BLOCK),
            block(i),
            "block {i}"
        );
    }
    for v in [xfs, btrfs] {
        assert_eq!(
            std::fs::read(v.target(&host).join("data")).unwrap(),
            data,
            "{}",
            v.tag
        );
    }
    assert_eq!(read_at(&blockv.target(&host), MIB as u64, data.len()), data);
    for v in &vols {
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: v.id.clone(),
            target_path: v.target(&kubelet_c).to_string_lossy().into(),
        })
        .await
        .unwrap_or_else(|e| panic!("unpublish {}: {e}", v.tag));
        n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: v.staging(&kubelet_c).to_string_lossy().into(),
        })
        .await
        .unwrap_or_else(|e| panic!("unstage {}: {e}", v.tag));
        assert!(
            loop_device::loops_backed_by(&node.image(&v.id)).is_empty(),
            "{} detached",
            v.tag
        );
        c.delete_volume(DeleteVolumeRequest {
            volume_id: v.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let (mounts, loops) = node.leftovers();
    assert!(mounts.is_empty(), "mounts left on the host: {mounts:?}");
    assert!(loops.is_empty(), "loop devices left: {loops:?}");
}

/// The kernel fact under all of this, without the driver: a device attached inside a mount
/// namespace through a bind mount prints, once that namespace is gone, a backing path that is
/// no path on the host; it is still found by the image's identity, and attaching the image
/// again reuses it.
#[test]
fn a_device_attached_from_a_vanished_namespace_is_found_by_identity() {
    if !root_or_skip("identity across namespaces") {
        return;
    }
    let node = Node::new();
    let image = node.host_pool.join("img.img");
    File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let ns_pool = node.root.join("gone/pool");
    std::fs::create_dir_all(&ns_pool).unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "unchanged", "--", "sh", "-c"])
        .arg(r#"set -e; mount --bind "$1" "$2"; losetup --find --show "$2/img.img""#)
        .arg("attach")
        .arg(&node.host_pool)
        .arg(&ns_pool)
        .output()
        .expect("run unshare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let found = loop_device::loops_backed_by(&image);
    assert_eq!(
        found.iter().map(|l| &l.device).collect::<Vec<_>>(),
        [&device]
    );
    let l = &found[0];
    assert_eq!(
        l.backing_file,
        Path::new("/img.img"),
        "the path sysfs prints"
    );
    assert_eq!(l.backing, loopvol::datapath::FileId::of(&image));
    // The kernel's encoding of the backing device, decoded, agrees with losetup's and stat's.
    let out = Command::new("losetup")
        .args([
            "--list",
            "--noheadings",
            "--output",
            "BACK-MAJ:MIN,BACK-INO",
        ])
        .arg(&device)
        .output()
        .unwrap();
    let shown = String::from_utf8(out.stdout).unwrap();
    let id = l.backing.unwrap();
    assert_eq!(
        shown.split_whitespace().collect::<Vec<_>>(),
        [id.dev.to_string(), id.ino.to_string()],
        "losetup says {shown:?}"
    );
    assert_eq!(
        loop_device::loop_if_backed_by(&device, &image).map(|l| l.device),
        Some(device.clone())
    );
    let under: Vec<PathBuf> = loop_device::loops_under(&node.host_pool)
        .into_iter()
        .map(|l| l.device)
        .collect();
    assert_eq!(under, std::slice::from_ref(&device));
    let again = loopvol::datapath::loop_device::attach(&image, false, true).unwrap();
    assert!(!again.created, "attached a second time");
    assert_eq!(again.device, device);
    loopvol::datapath::loop_device::detach(&device).unwrap();
    assert!(loop_device::loops_backed_by(&image).is_empty());
}

/// An encrypted volume (issue 26) across a node plugin restart: its key lives with the mounted
/// filesystem in the kernel, so the pod keeps reading and writing while no driver runs; the
/// kubelet's stage through the new container adds the key again (harmless, and what brings it
/// back when it went) and checks it, a wrong Secret is refused without disturbing the pod, and
/// the unstage through the new container removes the key.
#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_volume_keeps_working_across_a_plugin_restart() {
    if !root_or_skip("encrypted volume across a restart") {
        return;
    }
    const KEY: &str = "9e8d7c6b5a4938271605f4e3d2c1b0a99e8d7c6b5a4938271605f4e3d2c1b0a9";
    let secrets = |k: &str| std::collections::HashMap::from([("key".to_string(), k.to_string())]);
    let mut node = Node::new();
    node.start("container-a").await;
    let mut c = node.controller().await;
    let mut n = node.node().await;
    let mut req = create_req("enc", 64 * MIB, rw_mount("ext4"));
    req.parameters
        .insert("encryption".to_string(), "fscrypt".to_string());
    let v = Vol {
        tag: "enc",
        id: create_volume_id(&mut c, req).await,
        cap: rw_mount("ext4"),
        block: false,
    };
    let stage_with = |kubelet: PathBuf, key: &str| NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging(&kubelet).to_string_lossy().into(),
        volume_capability: Some(v.cap.clone()),
        secrets: secrets(key),
        ..Default::default()
    };
    n.node_stage_volume(stage_with(node.ns().kubelet.clone(), KEY))
        .await
        .unwrap();
    publish(&mut n, &v, &node.ns().kubelet.clone())
        .await
        .unwrap();
    let host = node.host_kubelet.clone();
    let writer = Writer::start(v.target(&host).join("log"));
    writer.wait_for(20);

    node.kill9();
    writer.wait_for(20);
    node.start("container-b").await;
    let mut n = node.node().await;
    let kubelet_b = node.ns().kubelet.clone();
    // A wrong Secret is refused and changes nothing for the pod.
    let e = n
        .node_stage_volume(stage_with(kubelet_b.clone(), &KEY.replace('9', "8")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    writer.wait_for(20);
    n.node_stage_volume(stage_with(kubelet_b.clone(), KEY))
        .await
        .unwrap();
    publish(&mut n, &v, &kubelet_b).await.unwrap();
    writer.wait_for(20);
    let (blocks, result) = writer.finish();
    assert_eq!(result, Ok(()), "the writer saw an error");
    let log = v.target(&host).join("log");
    for i in [0, blocks / 2, blocks - 1] {
        assert_eq!(
            read_at(&log, i * BLOCK as u64, BLOCK),
            block(i),
            "block {i}"
        );
    }
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: v.id.clone(),
        target_path: v.target(&kubelet_b).to_string_lossy().into(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging(&kubelet_b).to_string_lossy().into(),
    })
    .await
    .unwrap();
    assert!(
        node.log()
            .contains("encryption key removed from the filesystem"),
        "{}",
        node.log()
    );
    assert!(!node.log().contains(KEY), "the key is in the log");
    let (mounts, loops) = node.leftovers();
    assert!(mounts.is_empty(), "mounts left on the host: {mounts:?}");
    assert!(loops.is_empty(), "loop devices left: {loops:?}");
}
