//! What the figures were measured on, and with which build.

use std::collections::BTreeMap;
use std::path::Path;

use crate::results::Machine;
use crate::tools;

pub fn describe(pool_dir: &Path) -> Machine {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_bytes = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let kernel = nix::sys::utsname::uname()
        .map(|u| {
            format!(
                "{} {} {}",
                u.sysname().to_string_lossy(),
                u.release().to_string_lossy(),
                u.machine().to_string_lossy()
            )
        })
        .unwrap_or_default();
    // The filesystem the pool lives on: the deepest mount containing it.
    let fs = loopvol::fs::mount::mounts()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| pool_dir.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count());
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_bytes,
        kernel,
        cpu,
        pool_dir: pool_dir.display().to_string(),
        pool_fs: fs.as_ref().map(|m| m.fs_type.clone()).unwrap_or_default(),
        pool_device: fs.map(|m| m.source).unwrap_or_default(),
        loop_devices: crate::workspace::loop_nodes().len(),
        loop_devices_attached: loopvol::datapath::loop_device::attached_loops().len(),
    }
}

pub fn date_utc() -> String {
    tools::run("date", ["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// `git rev-parse --short HEAD` of the workspace, followed by the tracked files that had
/// uncommitted changes (the binaries were built from those).
pub fn commit(workspace: &Path) -> String {
    let dir = workspace.to_string_lossy();
    let Ok(head) = tools::run("git", ["-C", &dir, "rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let changed: Vec<String> = tools::run(
        "git",
        ["-C", &dir, "status", "--porcelain", "--untracked-files=no"],
    )
    .unwrap_or_default()
    .lines()
    .filter_map(|l| l.get(3..).map(str::to_string))
    .collect();
    match changed.len() {
        0 => head.trim().to_string(),
        n if n <= 4 => format!(
            "{} + uncommitted changes to {}",
            head.trim(),
            changed.join(", ")
        ),
        n => format!(
            "{} + uncommitted changes to {n} files ({}, ...)",
            head.trim(),
            changed[..3].join(", ")
        ),
    }
}

pub fn tool_versions() -> BTreeMap<String, String> {
    [
        ("mkfs.ext4", "-V"),
        ("mkfs.xfs", "-V"),
        ("losetup", "--version"),
        ("blkid", "-V"),
        ("fio", "--version"),
    ]
    .into_iter()
    .filter_map(|(t, flag)| Some((t.to_string(), tools::version_line(t, flag)?)))
    .collect()
}
