//! The private temp dir every run works in, and the guard that leaves the machine as it found
//! it: whatever happens (error, panic, Ctrl-C), every mount under the dir is unmounted, deepest
//! first, and every loop device whose backing file is under it is detached, before the dir
//! itself is removed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::mount::{umount2, MntFlags};

pub struct Workspace {
    root: PathBuf,
    /// Loop device nodes that existed before the run (see [`remove_new_loop_nodes`]).
    loop_nodes_before: BTreeSet<u32>,
    // Removed after `Drop::drop` has swept the mounts off it (fields drop after the body);
    // taken out and kept instead when something could not be unmounted.
    dir: Option<tempfile::TempDir>,
}

/// What a sweep found and removed.
#[derive(Debug, Default, Clone)]
pub struct Swept {
    pub unmounted: Vec<PathBuf>,
    pub detached: Vec<PathBuf>,
}

impl Workspace {
    /// A fresh `loopvol-bench-*` dir under `parent`.
    pub fn new(parent: &Path) -> anyhow::Result<Workspace> {
        let dir = tempfile::Builder::new()
            .prefix("loopvol-bench-")
            .tempdir_in(parent)
            .with_context(|| format!("create a temp dir in {}", parent.display()))?;
        // mountinfo and sysfs show resolved paths.
        let root = std::fs::canonicalize(dir.path())?;
        Ok(Workspace {
            root,
            loop_nodes_before: loop_nodes(),
            dir: Some(dir),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh directory inside the workspace.
    pub fn subdir(&self, rel: &str) -> anyhow::Result<PathBuf> {
        let p = self.root.join(rel);
        std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(p)
    }

    /// Mounts under the workspace and loop devices over files under it, right now.
    pub fn leftovers(&self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        leftovers_under(&self.root)
    }

    /// Unmount and detach everything of ours. Safe to call at any time; used between phases
    /// after a failure and on drop.
    pub fn sweep(&self) -> Swept {
        sweep_under(&self.root)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let mut swept = self.sweep();
        // A tool still finishing on a blocking thread (an interrupted losetup or mount) may
        // add something just after the first pass.
        let (m, l) = self.leftovers();
        if !m.is_empty() || !l.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
            let again = self.sweep();
            swept.unmounted.extend(again.unmounted);
            swept.detached.extend(again.detached);
        }
        let removed = remove_new_loop_nodes(&self.loop_nodes_before);
        if !swept.unmounted.is_empty() || !swept.detached.is_empty() || removed > 0 {
            eprintln!(
                "cleanup: unmounted {} mount(s), detached {} loop device(s) under {}, removed \
                 {removed} idle loop device node(s) added during the run",
                swept.unmounted.len(),
                swept.detached.len(),
                self.root.display()
            );
        }
        let (m, l) = self.leftovers();
        if !m.is_empty() || !l.is_empty() {
            eprintln!(
                "cleanup FAILED: still mounted {m:?}, still attached {l:?}; the temp dir {} is \
                 kept so nothing mounted is deleted through",
                self.root.display()
            );
            // Keep the directory: removing it recursively would descend into live mounts.
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
        }
    }
}

fn leftovers_under(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mounts = loopvol::fs::mount::mounts()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .map(|m| m.mount_point)
        .collect();
    let loops = loopvol::datapath::loop_device::loops_under(root)
        .into_iter()
        .map(|l| l.device)
        .collect();
    (mounts, loops)
}

fn sweep_under(root: &Path) -> Swept {
    let mut swept = Swept::default();
    // Stacked mounts on one point need one pass each; a few passes always suffice here.
    for _ in 0..4 {
        let (mut mounts, _) = leftovers_under(root);
        if mounts.is_empty() {
            break;
        }
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            let r = umount2(&m, MntFlags::empty()).or_else(|_| umount2(&m, MntFlags::MNT_DETACH));
            if r.is_ok() {
                swept.unmounted.push(m);
            }
        }
    }
    for l in loopvol::datapath::loop_device::loops_under(root) {
        if loopvol::datapath::loop_device::detach(&l.device).is_ok() {
            swept.detached.push(l.device);
        }
    }
    swept
}

/// Numbers of the loop device nodes that exist now (attached or not).
pub fn loop_nodes() -> BTreeSet<u32> {
    std::fs::read_dir("/sys/block")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("loop")?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

nix::ioctl_write_int_bad!(loop_ctl_remove, 0x4C81);

/// Remove the loop device nodes that did not exist in `before` and are not attached: attaching
/// hundreds of volumes makes the kernel add as many nodes, which outlive their detach and make
/// every later sysfs scan (loopvol's included, on this whole machine) slower. The kernel
/// refuses to remove an attached device, so nothing in use can go.
pub fn remove_new_loop_nodes(before: &BTreeSet<u32>) -> usize {
    let Ok(control) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
    else {
        return 0;
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&control);
    loop_nodes()
        .difference(before)
        .filter(|n| !Path::new(&format!("/sys/block/loop{n}/loop/backing_file")).exists())
        // SAFETY: LOOP_CTL_REMOVE takes the device number by value.
        .filter(|n| unsafe { loop_ctl_remove(fd, **n as i32) }.is_ok())
        .count()
}
