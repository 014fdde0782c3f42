//! The loopvol process under test: find the release binary, start `loopvol serve --mode all` on
//! a private socket and pool, wait until it accepts connections, read its memory, stop it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::csi_ops::Csi;

pub const NODE_ID: &str = "bench-node";

/// Where the driver binary is: `--loopvol`, else next to the bench binary (target/release).
/// Under `cargo run` it is (re)built first, since cargo builds only the bench's library
/// dependencies, not the `loopvol` binary. That build must be the very build `scripts/run` and
/// a plain `cargo build --release --bin loopvol` make, or each one rebuilds what the other
/// built: the same selection (the workspace, not `-p loopvol-driver`, whose feature set differs
/// for rustix and fastrand), and none of the variables `cargo run` sets for the bench, since
/// build scripts track some (ring's tracks CARGO_PKG_NAME and CARGO_MANIFEST_DIR: with them
/// set, ring, rustls, tonic, kube and ten more were rebuilt after every bench run).
pub fn locate_binary(explicit: Option<PathBuf>, build: bool) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("find the bench binary")?;
    let dir = exe.parent().context("bench binary has no directory")?;
    let bin = dir.join("loopvol");
    if build {
        if let Some(cargo) = std::env::var_os("CARGO") {
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "--bin", "loopvol"])
                .current_dir(crate::workspace_dir());
            for (name, _) in std::env::vars_os() {
                if name.to_str().is_some_and(set_by_cargo_run) {
                    cmd.env_remove(name);
                }
            }
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            eprintln!("building the loopvol binary next to the bench binary ({cmd:?})");
            let status = cmd.status().context("run cargo build")?;
            if !status.success() {
                bail!("cargo build of loopvol failed ({status})");
            }
        }
    }
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p loopvol-driver -p bench` \
             or pass --loopvol",
            bin.display()
        );
    }
    Ok(bin)
}

/// How long a start took.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StartTiming {
    /// spawn → the socket accepts a connection.
    pub socket_ms: f64,
    /// spawn → the first Probe RPC answered ready.
    pub probe_ms: f64,
}

/// A running `loopvol serve`; killed on drop.
pub struct Driver {
    child: Option<Child>,
    bin: PathBuf,
    pub socket: PathBuf,
    pub pool: PathBuf,
    log: PathBuf,
    extra_args: Vec<String>,
}

/// How to start the driver: the binary and any flags beyond socket, pool and node ID.
#[derive(Debug, Clone)]
pub struct Launch {
    pub bin: PathBuf,
    pub extra_args: Vec<String>,
}

impl Driver {
    /// Start on `pool`, listening on `socket`; the driver's log goes to `log` (appended).
    pub async fn start(
        launch: &Launch,
        pool: &Path,
        socket: &Path,
        log: &Path,
    ) -> anyhow::Result<(Driver, StartTiming)> {
        let mut d = Driver {
            child: None,
            bin: launch.bin.clone(),
            socket: socket.to_path_buf(),
            pool: pool.to_path_buf(),
            log: log.to_path_buf(),
            extra_args: launch.extra_args.clone(),
        };
        let timing = d.spawn().await?;
        Ok((d, timing))
    }

    async fn spawn(&mut self) -> anyhow::Result<StartTiming> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let started = Instant::now();
        let child = Command::new(&self.bin)
            .arg("serve")
            .args(["--mode", "all", "--node-id", NODE_ID])
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--pool-dir")
            .arg(&self.pool)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = started + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "loopvol exited at start ({status}); log:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("loopvol did not come up in 30 s; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let socket_ms = started.elapsed().as_secs_f64() * 1e3;
        Csi::connect(&self.socket).await?.probe().await?;
        let probe_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(StartTiming {
            socket_ms,
            probe_ms,
        })
    }

    /// Stop (SIGTERM, then kill after 20 s) and start again on the same pool and socket.
    pub async fn restart(&mut self) -> anyhow::Result<StartTiming> {
        self.stop().await?;
        self.spawn().await
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident and peak-resident memory, from /proc/<pid>/status.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let pid = self.pid().context("loopvol is not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        Memory::parse(&status).context("no VmRSS in /proc/<pid>/status")
    }

    /// SIGTERM, as kubelet stops a pod, and wait for a clean exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    eprintln!("loopvol exited with {status} on SIGTERM");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("loopvol ignored SIGTERM for 20 s and was killed");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The end of the driver's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A process's memory, in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Memory {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

impl Memory {
    fn parse(status: &str) -> Option<Memory> {
        let kib = |key: &str| {
            status.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        };
        Some(Memory {
            rss_bytes: kib("VmRSS:")? * 1024,
            peak_rss_bytes: kib("VmHWM:").unwrap_or(0) * 1024,
        })
    }
}

/// Variables `cargo run` sets for the program it runs (cargo's "environment variables Cargo
/// sets for crates"), which a shell running `cargo build` does not have.
fn set_by_cargo_run(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_MANIFEST_LINKS",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
            "OUT_DIR",
        ]
        .contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nested_build_drops_what_cargo_run_set() {
        for v in [
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_MANIFEST_DIR",
            "OUT_DIR",
        ] {
            assert!(set_by_cargo_run(v), "{v}");
        }
        // What cargo itself needs, and the user's own settings, stay.
        for v in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "RUSTFLAGS",
            "PATH",
            "CC",
        ] {
            assert!(!set_by_cargo_run(v), "{v}");
        }
    }

    #[test]
    fn reads_memory_from_proc_status() {
        let status = "Name:\tloopvol\nVmHWM:\t   12000 kB\nVmRSS:\t    8192 kB\nThreads:\t5\n";
        let m = Memory::parse(status).unwrap();
        assert_eq!(m.rss_bytes, 8192 * 1024);
        assert_eq!(m.peak_rss_bytes, 12000 * 1024);
        assert!(Memory::parse("Name:\tx\n").is_none());
    }
}
