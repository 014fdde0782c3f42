//! The floor: the same kernel and file-system steps loopvol takes, done directly with the same
//! tools and no driver around them, so a ratio to the floor is loopvol's own overhead.
//!
//! * create: temp file → set_len (thin) or fallocate (thick) → fsync → rename into place →
//!   write + fsync a small JSON record via a temp name → rename → fsync the directory once.
//! * delete: unlink the record and the image, fsync the directory once.
//! * stage + publish: `losetup --direct-io=on --find --show` → mkfs with loopvol's own
//!   arguments → mount(2) → mkdir target → bind mount(2).
//! * unpublish + unstage: umount(2) the bind → rmdir target → umount(2) → `losetup -d`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use provisioner::{Allocation, FsType};
use serde::{Deserialize, Serialize};

use crate::csi_ops::MountPaths;
use crate::tools;

/// A directory laid out like a pool (`tmp/`, `volumes/`) for the file-level floor.
pub struct FloorPool {
    tmp: PathBuf,
    volumes: PathBuf,
}

impl FloorPool {
    pub fn new(dir: &Path) -> anyhow::Result<FloorPool> {
        let (tmp, volumes) = (dir.join("tmp"), dir.join("volumes"));
        fs::create_dir_all(&tmp)?;
        fs::create_dir_all(&volumes)?;
        Ok(FloorPool { tmp, volumes })
    }

    /// What CreateVolume does to the file system, and nothing else.
    pub fn create(&self, name: &str, size: u64, allocation: Allocation) -> anyhow::Result<()> {
        let tmp = self.tmp.join(format!("{name}.img"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        match allocation {
            Allocation::Thin => file.set_len(size)?,
            Allocation::Thick => nix::fcntl::fallocate(
                file.as_fd(),
                nix::fcntl::FallocateFlags::empty(),
                0,
                size as i64,
            )?,
        }
        file.sync_all()?;
        fs::rename(&tmp, self.volumes.join(format!("{name}.img")))?;
        let record = serde_json::to_vec_pretty(&serde_json::json!({
            "format": 1,
            "id": format!("vol-{name}@floor"),
            "name": name,
            "size_bytes": size,
            "fs_type": "ext4",
            "allocation": allocation.as_str(),
            "created_unix": 0,
        }))?;
        let rec_tmp = self.volumes.join(format!(".{name}.json.tmp"));
        let mut f = File::create(&rec_tmp)?;
        f.write_all(&record)?;
        f.sync_all()?;
        fs::rename(&rec_tmp, self.volumes.join(format!("{name}.json")))?;
        sync_dir(&self.volumes)
    }

    /// What DeleteVolume does to the file system.
    pub fn delete(&self, name: &str) -> anyhow::Result<()> {
        fs::remove_file(self.volumes.join(format!("{name}.json")))?;
        fs::remove_file(self.volumes.join(format!("{name}.img")))?;
        sync_dir(&self.volumes)
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The mkfs command loopvol would run for `fs` on this machine: same program, same arguments
/// (from `loopvol::fs::format::mkfs_args`, for this mkfs version and this kernel).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mkfs {
    pub program: String,
    pub args: Vec<String>,
}

impl Mkfs {
    pub fn for_fs(fs: FsType) -> anyhow::Result<Mkfs> {
        let program = format!("mkfs.{}", fs.as_str());
        let text = tools::output_text(&program, &["-V"])
            .with_context(|| format!("{program} is not installed"))?;
        let tool = loopvol::shared::kernel::parse_version(&text)
            .with_context(|| format!("cannot tell the version of {program} from {text:?}"))?;
        let args = loopvol::fs::format::mkfs_args(fs, tool, loopvol::shared::kernel::running());
        Ok(Mkfs { program, args })
    }

    fn run(&self, device: &Path) -> anyhow::Result<()> {
        let mut argv = self.args.clone();
        argv.push(device.to_string_lossy().into_owned());
        tools::run(&self.program, &argv).map(|_| ())
    }
}

/// A sparse image of `size` bytes, as CreateVolume leaves it (not part of the timed floor).
pub fn sparse_image(path: &Path, size: u64) -> anyhow::Result<()> {
    File::create(path)?.set_len(size)?;
    Ok(())
}

/// A volume attached, formatted, mounted and bound by the floor.
pub struct Mounted {
    pub device: PathBuf,
    staging: PathBuf,
    target: PathBuf,
}

/// Per-step times of the floor's stage + publish.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpSteps {
    pub losetup: Duration,
    pub mkfs: Duration,
    pub mount: Duration,
    pub bind: Duration,
}

impl UpSteps {
    pub fn total(&self) -> Duration {
        self.losetup + self.mkfs + self.mount + self.bind
    }
}

/// Per-step times of the floor's unpublish + unstage.
#[derive(Debug, Clone, Copy, Default)]
pub struct DownSteps {
    pub unbind: Duration,
    pub umount: Duration,
    pub detach: Duration,
}

impl DownSteps {
    pub fn total(&self) -> Duration {
        self.unbind + self.umount + self.detach
    }
}

fn step<T>(slot: &mut Duration, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let t = Instant::now();
    let v = f();
    *slot = t.elapsed();
    v
}

/// losetup → mkfs → mount → bind, each step timed. On failure, whatever was set up is undone.
pub fn stage_publish(
    image: &Path,
    paths: &MountPaths,
    fs: FsType,
    mkfs: &Mkfs,
) -> anyhow::Result<(Mounted, UpSteps)> {
    let mut s = UpSteps::default();
    let out = step(&mut s.losetup, || {
        tools::run(
            "losetup",
            [
                "--direct-io=on".as_ref(),
                "--find".as_ref(),
                "--show".as_ref(),
                image.as_os_str(),
            ],
        )
    })?;
    let device = PathBuf::from(out.trim());
    let m = Mounted {
        device,
        staging: paths.staging.clone(),
        target: paths.target.clone(),
    };
    let up = (|| {
        step(&mut s.mkfs, || mkfs.run(&m.device))?;
        step(&mut s.mount, || {
            mount(
                Some(&m.device),
                &m.staging,
                Some(fs.as_str()),
                MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| format!("mount {}", m.device.display()))
        })?;
        step(&mut s.bind, || {
            fs::create_dir(&m.target)?;
            mount(
                Some(&m.staging),
                &m.target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .context("bind mount")
        })
    })();
    if let Err(e) = up {
        let _ = unpublish_unstage(&m);
        return Err(e);
    }
    Ok((m, s))
}

/// umount bind → rmdir target → umount → losetup -d, each step timed.
pub fn unpublish_unstage(m: &Mounted) -> anyhow::Result<DownSteps> {
    let mut s = DownSteps::default();
    step(&mut s.unbind, || {
        let _ = umount2(&m.target, MntFlags::empty());
        match fs::remove_dir(&m.target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    })?;
    step(&mut s.umount, || {
        match umount2(&m.staging, MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(()),
            Err(e) => bail!("umount {}: {e}", m.staging.display()),
        }
    })?;
    step(&mut s.detach, || {
        tools::run("losetup", ["-d".as_ref(), m.device.as_os_str()]).map(|_| ())
    })?;
    Ok(s)
}

/// Is direct I/O on for this loop device (as `--direct-io=on` asked)?
pub fn direct_io(device: &Path) -> bool {
    let name = device.file_name().unwrap_or_default();
    fs::read_to_string(Path::new("/sys/block").join(name).join("loop/dio"))
        .is_ok_and(|s| s.trim() == "1")
}

/// The work loopvol does in NodeStageVolume that the floor does not need, timed on its own to
/// explain the gap: probing the device for an existing filesystem and asking mkfs its version.
pub fn stage_extras(image: &Path, mkfs: &Mkfs) -> (Duration, Duration) {
    let t = Instant::now();
    let _ = tools::output_text("blkid", &["-p", "-o", "export", &image.to_string_lossy()]);
    let probe = t.elapsed();
    let t = Instant::now();
    let _ = tools::output_text(&mkfs.program, &["-V"]);
    (probe, t.elapsed())
}
