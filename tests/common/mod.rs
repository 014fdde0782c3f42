//! Shared harness for the end-to-end tests: start the real `loopvol` binary on a private socket
//! and pool in a temp dir, talk CSI to it over the unix socket, and clean up every mount and
//! loop device under that dir afterwards, even when the test panics.

#![allow(dead_code)]

pub mod container;
pub mod netcluster;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::identity_client::IdentityClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use loopvol::csi::*;
use tonic::transport::Channel;

pub mod cluster;
pub mod transfer;

pub const NODE: &str = "test-node";

/// Tests that need root skip when not root, unless the environment demands them (CI).
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let required = std::env::var("LOOPVOL_REQUIRE_ROOT").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true");
    if required {
        panic!("{test} needs root, and LOOPVOL_REQUIRE_ROOT/CI forbids skipping it");
    }
    eprintln!("SKIP {test}: needs root (loop devices, mounts)");
    false
}

pub struct Driver {
    pub dir: tempfile::TempDir,
    pub pool: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    /// `--node-id` of the next [`Driver::spawn`]; [`NODE`] unless a test moves the pool.
    node_id: String,
    extra_args: Vec<String>,
    /// Environment overrides for the driver process (e.g. a PATH without some tool).
    env: Vec<(String, String)>,
    /// Pass the test's temp dir as an allowed root (all tests but those of the confinement).
    temp_dir_allowed: bool,
    /// The filesystem the pool lives on, when the test made one; dropped (unmounted, detached)
    /// only after `Drop for Driver` has cleaned up every volume inside it.
    pool_fs: Option<SmallFs>,
}

impl Driver {
    /// Start `loopvol serve --mode all` on a fresh temp dir.
    pub async fn start() -> Driver {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> Driver {
        Self::start_in(None, extra).await
    }

    /// Start with environment overrides for the driver process.
    pub async fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Driver {
        Self::start_in_env(None, extra, env).await
    }

    /// Start with the pool at `pool` (socket and log stay in the test's temp dir).
    pub async fn start_with_pool(pool: PathBuf, extra: &[&str]) -> Driver {
        Self::start_in(Some(pool), extra).await
    }

    /// Start with the pool on a fresh ext4 filesystem of `bytes` (a sparse file on its own loop
    /// device), so the pool can really run out of space.
    pub async fn start_on_small_fs(bytes: u64, extra: &[&str]) -> Driver {
        let fs = SmallFs::new(bytes);
        let mut d = Self::start_in(Some(fs.mount_point.join("pool")), extra).await;
        d.pool_fs = Some(fs);
        d
    }

    /// Start with `<temp dir>/kubelet` (created) as the only allowed root: the rest of the temp
    /// dir plays the rest of the machine, where nothing may be staged or published.
    pub async fn start_confined(extra: &[&str]) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("loopvol-test-")
            .tempdir()
            .unwrap();
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir(&kubelet).unwrap();
        let mut d = Driver {
            pool: dir.path().join("pool"),
            socket: dir.path().join("csi.sock"),
            dir,
            child: None,
            node_id: NODE.to_string(),
            extra_args: [
                "--kubelet-dir".to_string(),
                kubelet.to_string_lossy().into(),
            ]
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect(),
            env: Vec::new(),
            temp_dir_allowed: false,
            pool_fs: None,
        };
        d.spawn().await;
        d
    }

    async fn start_in(pool: Option<PathBuf>, extra: &[&str]) -> Driver {
        Self::start_in_env(pool, extra, &[]).await
    }

    async fn start_in_env(pool: Option<PathBuf>, extra: &[&str], env: &[(&str, &str)]) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("loopvol-test-")
            .tempdir()
            .unwrap();
        let pool = pool.unwrap_or_else(|| dir.path().join("pool"));
        let socket = dir.path().join("csi.sock");
        let mut d = Driver {
            pool,
            socket,
            dir,
            child: None,
            node_id: NODE.to_string(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            temp_dir_allowed: true,
            pool_fs: None,
        };
        d.spawn().await;
        d
    }

    /// Replace the extra flags the next [`Driver::spawn`] passes.
    pub fn set_args(&mut self, extra: &[&str]) {
        self.extra_args = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Serve the pool under this node ID from the next [`Driver::spawn`] on.
    pub fn set_node_id(&mut self, id: &str) {
        self.node_id = id.to_string();
    }

    /// Start (again) on the same pool and socket.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("driver.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_loopvol"))
            .arg("serve")
            .args([
                "--mode",
                "all",
                "--node-id",
                &self.node_id,
                "--log-level",
                "info",
            ])
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--pool-dir")
            .arg(&self.pool)
            // Tests stage and publish inside their temp dir, never in the kubelet's.
            .args(
                self.temp_dir_allowed
                    .then(|| ["--allowed-root".as_ref(), self.dir.path().as_os_str()])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start loopvol");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("loopvol exited early ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "loopvol did not come up; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("driver.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Is the driver process still running (it has not crashed or exited)?
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        child.wait().unwrap()
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A channel to the driver. A connection attempt that lands while a just-started driver
    /// is still settling its socket (seen once in CI as ECONNRESET from connect(2) right after
    /// a kill -9 and restart) is retried for up to 5 s; a driver that stays unreachable fails
    /// the test with its log.
    async fn channel(&self) -> Channel {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("unix://{}", self.socket.display()))
                .unwrap();
        let mut last = None;
        for _ in 0..50 {
            match endpoint.connect().await {
                Ok(c) => return c,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "connect to loopvol: {:?}; driver log:\n{}",
            last.unwrap(),
            self.log()
        );
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    /// A path inside this test's temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn image_of(&self, volume_id: &str) -> PathBuf {
        self.pool
            .join("volumes")
            .join(format!("{}.img", hex_of(volume_id)))
    }

    /// Mounts under the temp dir and loop devices over the pool, left right now.
    pub fn leftovers(&self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let root = std::fs::canonicalize(self.dir.path()).unwrap();
        let mounts = loopvol::fs::mount::mounts()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&root))
            .map(|m| m.mount_point)
            .collect();
        let loops = loopvol::datapath::loop_device::loops_under(&self.pool)
            .into_iter()
            .map(|l| l.device)
            .collect();
        (mounts, loops)
    }

    /// Assert that nothing of this test is mounted or attached.
    pub fn assert_clean(&self) {
        let (mounts, loops) = self.leftovers();
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
        assert!(loops.is_empty(), "loop devices left behind: {loops:?}");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Cleanup even after a failed assertion: deepest mounts first, then loop devices.
        let (mut mounts, _) = self.leftovers();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for l in loopvol::datapath::loop_device::loops_under(&self.pool) {
            let _ = loopvol::datapath::loop_device::detach(&l.device);
        }
    }
}

/// A small ext4 filesystem (no root-reserved blocks; or an xfs) in a sparse file of its own temp dir,
/// attached to a loop device and mounted; unmounted and detached on drop.
pub struct SmallFs {
    pub mount_point: PathBuf,
    pub device: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    pub fn new(bytes: u64) -> SmallFs {
        SmallFs::of("ext4", bytes)
    }

    /// An xfs filesystem (reflink on, mkfs.xfs needs at least 300 MB).
    pub fn xfs(bytes: u64) -> SmallFs {
        SmallFs::of("xfs", bytes)
    }

    /// The same with `fs`: `ext4`, or `xfs` with reflink (at least 300 MiB).
    pub fn of(fs_type: &str, bytes: u64) -> SmallFs {
        let dir = tempfile::Builder::new()
            .prefix("loopvol-smallfs-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let args: &[&str] = match fs_type {
            "ext4" => &["-q", "-F", "-m", "0"],
            "xfs" => &["-q", "-f", "-m", "reflink=1"],
            _ => panic!("SmallFs of {fs_type}"),
        };
        let out = Command::new(format!("mkfs.{fs_type}"))
            .args(args)
            .arg(&image)
            .output()
            .expect("run mkfs");
        assert!(
            out.status.success(),
            "mkfs.{fs_type}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = loopvol::datapath::loop_device::attach(&image, false, false)
            .expect("attach the small filesystem")
            .device;
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        let fs = SmallFs {
            mount_point,
            device,
            _dir: dir,
        };
        loopvol::fs::mount::mount_fs(
            &fs.device,
            &fs.mount_point,
            fs_type,
            nix::mount::MsFlags::empty(),
            "",
        )
        .expect("mount the small filesystem");
        fs
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Loop devices over images inside (left when a test failed with the filesystem full:
        // their flush-and-detach fails with EIO) would keep it busy: detach them without a
        // flush first, then unmount, then detach the filesystem's own device.
        for l in loopvol::datapath::loop_device::loops_under(&self.mount_point) {
            let _ = Command::new("losetup").arg("-d").arg(&l.device).status();
        }
        let _ = nix::mount::umount2(&self.mount_point, nix::mount::MntFlags::MNT_DETACH);
        let _ = loopvol::datapath::loop_device::detach(&self.device);
    }
}

pub fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.to_string(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn rw_mount(fs: &str) -> VolumeCapability {
    mount_cap(fs, Mode::SingleNodeWriter)
}

pub fn create_req(name: &str, bytes: i64, cap: VolumeCapability) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

pub const MIB: i64 = 1 << 20;

/// CreateVolume that must succeed; the new volume's ID.
pub async fn create_volume_id(
    c: &mut ControllerClient<Channel>,
    req: CreateVolumeRequest,
) -> String {
    c.create_volume(req)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("CreateVolume returned a volume")
        .volume_id
}

/// CreateSnapshot of `source` named `name` (it must succeed): the new snapshot's ID.
pub async fn create_snapshot_id(
    c: &mut ControllerClient<Channel>,
    source: &str,
    name: &str,
) -> String {
    c.create_snapshot(CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    })
    .await
    .expect("CreateSnapshot")
    .into_inner()
    .snapshot
    .expect("CreateSnapshot returned a snapshot")
    .snapshot_id
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub fn stage_req(id: &str, staging: &Path, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path_string(staging),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path_string(staging),
        target_path: path_string(target),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn unpublish_req(id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: path_string(target),
    }
}

pub fn unstage_req(id: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path_string(staging),
    }
}

/// sha256 of a file's content, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let data = std::fs::read(path).unwrap();
    Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn code_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// An xfs filesystem (reflink on by default) on a loop device of its own, detached on drop.
/// Keep it alive longer than the driver whose pool it holds: the driver's mounts and the loop
/// devices under its pool go first.
pub struct XfsPool {
    pub device: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for XfsPool {
    fn drop(&mut self) {
        let _ = loopvol::datapath::loop_device::detach(&self.device);
    }
}

/// A driver whose pool directory is a fresh 2 GiB xfs filesystem (reflinks), and that pool.
pub async fn driver_on_xfs_pool() -> (Driver, XfsPool) {
    let dir = tempfile::Builder::new()
        .prefix("loopvol-xfs-")
        .tempdir()
        .unwrap();
    let img = dir.path().join("xfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let att = loopvol::datapath::loop_device::attach(&img, false, false).unwrap();
    let xfs = XfsPool {
        device: att.device.clone(),
        _dir: dir,
    };
    loopvol::fs::format::mkfs(&xfs.device, provisioner::FsType::Xfs).unwrap();
    let mut d = Driver::start().await;
    d.stop();
    std::fs::create_dir_all(&d.pool).unwrap();
    loopvol::fs::mount::mount_fs(
        &xfs.device,
        &d.pool,
        "xfs",
        nix::mount::MsFlags::empty(),
        "",
    )
    .unwrap();
    d.spawn().await;
    (d, xfs)
}

/// A volume's hex name, as the pool names its files (`vol-<hex>@<node>`).
pub fn hex_of(id: &str) -> String {
    provisioner::VolumeId::parse(provisioner::ids::Kind::Volume, id)
        .expect("a loopvol volume id")
        .hex
}

/// Thaws `mount` on drop, so a test that fails while its volume is frozen still lets its
/// writer finish and its cleanup unmount (errors ignored: normally it is not frozen).
pub struct ThawOnDrop(pub PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.0)
            .output();
    }
}

/// The driver's `freeze-guard` children.
pub fn guardians_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|v| v.parse::<u32>().ok());
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if ppid == Some(pid) && String::from_utf8_lossy(&cmd).contains("freeze-guard") {
            out.push(p);
        }
    }
    out
}

/// Lines of `text` with a run of three or more spaces after their indentation: a sentence
/// broken by a Rust string continuation that lost its `\`, or padding where none belongs.
pub fn space_runs(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.trim_start().contains("   "))
        .collect()
}

/// A fresh set of mTLS files (`loopvol certs --out`: CA, node server and router client
/// certificates) in `dir`.
pub fn write_certs(dir: &Path) {
    let st = Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(["certs", "--out"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "loopvol certs --out {}", dir.display());
}

/// A channel to the pool API at `url` (`https://…`), as the router connects: with the client
/// certificate [`write_certs`] put in `certs`.
pub async fn pool_api_channel(certs: &Path, url: String) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |f: &str| std::fs::read(certs.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")))
        .identity(Identity::from_pem(read("client.crt"), read("client.key")))
        .domain_name("loopvol-node");
    Endpoint::from_shared(url)
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}
