//! Small helpers every layer may import, and that import nothing of loopvol's above
//! `error`: how this process runs (`Mode`), what it advertises, its allocator's thresholds,
//! sizes, log-safe text, the external programs it runs and the kernel version.

pub mod advertise;
pub mod allocator;
pub mod kernel;
pub mod logsafe;
pub mod tools;
pub mod units;

use std::path::PathBuf;

/// Which CSI services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity + Controller (CreateVolume, DeleteVolume, capacity...).
    Controller,
    /// Identity + Node (stage, publish, stats, expand).
    Node,
    /// Identity + Controller + Node on one socket: the single-machine embedded default.
    All,
}

/// The pool is usable when its volume directory is writable and its filesystem answers statvfs.
pub fn pool_usable(dir: &std::path::Path) -> bool {
    use nix::unistd::{access, AccessFlags};
    access(&dir.join("volumes"), AccessFlags::W_OK | AccessFlags::X_OK).is_ok()
        && nix::sys::statvfs::statvfs(dir).is_ok()
}

/// `unix:///run/x.sock` or `/run/x.sock` → the socket path.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        anyhow::bail!("endpoint {endpoint:?} must be unix:///absolute/path.sock");
    }
    Ok(PathBuf::from(path))
}

/// For root-only unit tests: `true` when running as root; otherwise the test is reported as
/// skipped, unless `LOOPVOL_REQUIRE_ROOT=1` (CI) makes a skip a failure. The integration
/// tests have the same rule in `tests/common::root_or_skip`.
#[cfg(test)]
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("LOOPVOL_REQUIRE_ROOT").as_deref() != Ok("1"),
        "{test} needs root, and LOOPVOL_REQUIRE_ROOT forbids skipping"
    );
    eprintln!("SKIP {test}: needs root");
    false
}

/// Paths for a person reading an error: `/a, /b`, not Rust's `["/a", "/b"]`.
pub fn paths_list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
