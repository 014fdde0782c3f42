//! Scaffolding shared by the side binaries (`cbt`, `group`): a pool filesystem of its own on a
//! loop device, and a driver process stopped on drop. Included by path from each binary, since
//! they are separate crates of the bench package without a library between them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::Context;

/// A pool filesystem on its own loop device, mounted; torn down on drop.
pub struct PoolFs {
    pub mount: PathBuf,
    pub device: PathBuf,
}

impl PoolFs {
    pub fn new(dir: &Path, fs: &str, bytes: u64) -> anyhow::Result<PoolFs> {
        let img = dir.join(format!("{fs}.img"));
        File::create(&img)?.set_len(bytes)?;
        let device = loopvol::datapath::loop_device::attach(&img, false, false)
            .context("attach")?
            .device;
        let p = PoolFs {
            mount: dir.join(format!("{fs}-pool")),
            device,
        };
        let fs_type = if fs == "xfs" {
            provisioner::FsType::Xfs
        } else {
            provisioner::FsType::Ext4
        };
        loopvol::fs::format::mkfs(&p.device, fs_type).context("mkfs")?;
        std::fs::create_dir_all(&p.mount)?;
        loopvol::fs::mount::mount_fs(&p.device, &p.mount, fs, nix::mount::MsFlags::empty(), "")
            .context("mount")?;
        Ok(p)
    }
}

impl Drop for PoolFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::empty());
        let _ = loopvol::datapath::loop_device::detach(&self.device);
    }
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// `loopvol serve --mode all` over `pool` on the socket `sock`, its log in `log`, with
/// `extra` flags; returns once the socket answers, with the process (stopped on drop) and a
/// channel to it.
pub async fn serve(
    bin: &Path,
    pool: &Path,
    sock: &Path,
    log: File,
    extra: &[&std::ffi::OsStr],
) -> anyhow::Result<(Proc, tonic::transport::Channel)> {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let driver = Proc(
        Command::new(bin)
            .args(["serve", "--mode", "all", "--node-id", "bench-node"])
            .arg("--endpoint")
            .arg(format!("unix://{}", sock.display()))
            .arg("--pool-dir")
            .arg(pool)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if Instant::now() > deadline {
            anyhow::bail!("loopvol did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("unix://{}", sock.display()))?
        .connect()
        .await?;
    Ok((driver, ch))
}

/// The loopvol binary: the one given, or `loopvol` next to this binary.
pub fn loopvol_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    Ok(match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("no dir")?
            .join("loopvol"),
    })
}
