//! The guardian: a separate process (`loopvol freeze-guard`) that holds the frozen mount open
//! and thaws it if the driver dies before the copy is over, or the freeze outlasts its bound.

use super::*;

/// The driver's end of a running guardian.
pub(super) struct Guardian {
    child: Child,
    stdin: ChildStdin,
}

impl Guardian {
    /// Start the guardian and wait until it holds the mount open.
    pub(super) fn spawn(
        mount: &Path,
        dev: u64,
        marker: &Path,
        timeout: Duration,
    ) -> Result<Guardian> {
        // /proc/self/exe still runs this binary after an upgrade replaced the file on disk.
        let mut child = Command::new("/proc/self/exe")
            .arg("freeze-guard")
            .arg("--mount")
            .arg(mount)
            .arg("--dev")
            .arg(dev.to_string())
            .arg("--marker")
            .arg(marker)
            .arg("--timeout-ms")
            .arg(timeout.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::io("start the freeze guardian", e))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let ready = wait_readable(&stdout, Duration::from_secs(10)) && {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).is_ok() && line == "ready\n"
        };
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Internal(
                "the freeze guardian did not start; not freezing without it".into(),
            ));
        }
        Ok(Guardian { child, stdin })
    }

    /// The copy is over and the driver thawed: the guardian exits without touching anything.
    pub(super) fn done(mut self) {
        let _ = self.stdin.write_all(b"done\n");
        drop(self.stdin);
        let _ = self.child.wait();
    }
}

fn wait_readable(f: &impl AsFd, within: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
    let ms = within.as_millis().min(i32::MAX as u128) as i32;
    matches!(poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)), Ok(n) if n > 0)
}

#[derive(Debug, Clone, clap::Args)]
pub struct GuardArgs {
    #[arg(long)]
    pub mount: PathBuf,
    #[arg(long)]
    pub dev: u64,
    #[arg(long)]
    pub marker: PathBuf,
    #[arg(long)]
    pub timeout_ms: u64,
}

/// The guardian process: hold the mount open, thaw it if the driver dies before saying "done"
/// or the freeze outlasts its bound. Returns the exit code.
pub fn guard_main(a: &GuardArgs) -> i32 {
    let dir = match File::open(&a.mount) {
        Ok(d) if d.metadata().is_ok_and(|m| m.dev() == a.dev) => d,
        _ => {
            tracing::error!(mount = %a.mount.display(), "freeze guardian: the mount is not the filesystem to guard");
            return 1;
        }
    };
    // Opened now, while the driver holds it, to recognise this marker (and not a later one).
    let marker = File::open(&a.marker).ok();
    let stdout = std::io::stdout();
    if stdout.lock().write_all(b"ready\n").is_err() || stdout.lock().flush().is_err() {
        return 1;
    }
    let stdin = std::io::stdin();
    let deadline = Instant::now() + Duration::from_millis(a.timeout_ms);
    let mut lifted = false;
    loop {
        let wait = if lifted {
            Duration::from_secs(3600)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        if !wait_readable(&stdin, wait) {
            if !lifted && Instant::now() >= deadline {
                lifted = true;
                let r = thaw_fd(&dir);
                tracing::warn!(mount = %a.mount.display(), timeout_ms = a.timeout_ms, thawed = r.is_ok(),
                    "freeze watchdog: the freeze outlasted --freeze-timeout and was lifted");
            }
            continue;
        }
        let mut buf = [0u8; 64];
        match stdin.lock().read(&mut buf) {
            Ok(n) if n > 0 && buf[..n].contains(&b'd') => return 0,
            Ok(n) if n > 0 => continue,
            // EOF (or a broken pipe): the driver died holding the freeze.
            _ => break,
        }
    }
    driver_died(a, &dir, marker);
    0
}

/// The driver died during a freeze: thaw, unless a newer freeze (of a restarted driver) owns
/// the filesystem now, which shows as its marker being held by a live process.
fn driver_died(a: &GuardArgs, dir: &File, marker: Option<File>) {
    let lock = marker.and_then(|f| lock_within(f, Duration::from_secs(2)));
    let ours = lock.as_ref().is_some_and(|l| same_file(&**l, &a.marker));
    if !ours {
        tracing::info!(mount = %a.mount.display(), "freeze guardian: the marker is gone or taken over; leaving the filesystem alone");
        return;
    }
    let r = thaw_fd(dir);
    let _ = std::fs::remove_file(&a.marker);
    match r {
        Ok(Thaw::Thawed) => tracing::warn!(mount = %a.mount.display(),
            "freeze guardian: loopvol died during a freeze; filesystem thawed"),
        Ok(_) => {}
        Err(e) => tracing::error!(mount = %a.mount.display(), error = %e,
            "freeze guardian: thaw failed"),
    }
}
