//! Removing the idle loop device nodes loopvol used, in the background and at shutdown.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::ioctl::{open_control, remove_node};

/// The kernel makes this many loop devices at boot (`CONFIG_BLK_DEV_LOOP_MIN_COUNT`, default 8)
/// and tools expect them to exist: never removed.
const BOOT_NODES: u32 = 8;

/// Which idle loop device nodes loopvol may remove after a detach.
///
/// `LOOP_CTL_GET_FREE` adds a node whenever none is free, and a detached node stays until
/// someone removes it: without removal a node that staged a thousand volumes keeps a thousand
/// idle `/dev/loopN`, and every later sysfs scan pays for each. loopvol removes the nodes it
/// attached and detached, except nodes that were already idle when it started (the system's
/// spare nodes, or another tool's) and the boot-time ones. A node attached to a pool image when
/// loopvol started was attached by an earlier loopvol and counts as its own, and so do the
/// nodes a previous loopvol had queued for removal when it stopped (see [`finish_node_cleanup`]).
///
/// Removal is slow (the kernel deletes a whole gendisk and waits out an RCU grace period: about
/// 45 ms each on this machine kind) but mostly waiting, so a few threads do it in parallel, off
/// the RPC path: an unstage answers as soon as its device is detached. At shutdown more
/// threads join in (the waits overlap: 8 threads remove ~175 nodes/s here, 32 about 500/s).
struct NodeReaper {
    spare_at_start: HashSet<u32>,
    queue: mpsc::Sender<u32>,
    jobs: Arc<Mutex<mpsc::Receiver<u32>>>,
    /// Queued and not yet removed.
    pending: Mutex<HashSet<u32>>,
    /// Still open by someone after [`BUSY_RETRY`]: tried again at shutdown, and handed over if
    /// still there, so that no node loopvol owes a removal is forgotten.
    busy: Mutex<HashSet<u32>>,
    /// Set at shutdown: a busy node is retried until then.
    stop_by: Mutex<Option<Instant>>,
}

static REAPER: OnceLock<NodeReaper> = OnceLock::new();
const REAPER_THREADS: usize = 8;
/// Threads added at shutdown, when the remaining removals race the grace period.
const STOP_THREADS: usize = 24;
/// How long a node stays busy (open: udev's probe after the detach, a tool) before it is left
/// for the shutdown.
const BUSY_RETRY: Duration = Duration::from_secs(5);
/// Under the node state directory: the nodes a stopping loopvol had not removed yet.
const PENDING_FILE: &str = "loop-nodes-to-remove";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn loop_node_numbers() -> Vec<(u32, bool)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix("loop")?.parse().ok()?;
            Some((n, e.path().join("loop/backing_file").exists()))
        })
        .collect()
}

/// Attached to a file again (by anyone): no longer an idle node loopvol owes a removal.
fn attached(n: u32) -> bool {
    Path::new(&format!("/sys/block/loop{n}/loop/backing_file")).exists()
}

/// The node exists and is attached to nothing.
fn idle(n: u32) -> bool {
    Path::new(&format!("/sys/block/loop{n}")).exists() && !attached(n)
}

/// Note the idle loop nodes that exist now, so that [`reap_node`] removes only the ones
/// loopvol used, and start the threads that remove them. Called once by a node plugin at
/// start; processes that never call it (the admin CLI) remove no node.
pub fn adopt_node_cleanup(state_dir: &Path) {
    let file = state_dir.join(PENDING_FILE);
    let left_by_predecessor: HashSet<u32> = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let _ = std::fs::remove_file(&file);
    let idle: Vec<u32> = loop_node_numbers()
        .into_iter()
        .filter(|&(_, attached)| !attached)
        .map(|(n, _)| n)
        .collect();
    let (tx, rx) = mpsc::channel();
    let reaper = NodeReaper {
        spare_at_start: idle
            .iter()
            .copied()
            .filter(|n| !left_by_predecessor.contains(n))
            .collect(),
        queue: tx,
        jobs: Arc::new(Mutex::new(rx)),
        pending: Mutex::new(HashSet::new()),
        busy: Mutex::new(HashSet::new()),
        stop_by: Mutex::new(None),
    };
    if REAPER.set(reaper).is_err() {
        return;
    }
    spawn_workers(REAPER_THREADS, 0);
    for n in idle.into_iter().filter(|n| left_by_predecessor.contains(n)) {
        queue_removal(n);
    }
}

fn spawn_workers(count: usize, first: usize) {
    let Some(r) = REAPER.get() else { return };
    for i in first..first + count {
        let jobs = r.jobs.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("loop-reaper-{i}"))
            .spawn(move || reap_worker(&jobs));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a loop node reaper thread");
        }
    }
}

enum Outcome {
    Done,
    Busy,
}

/// Remove queued nodes one at a time. EBUSY right after a detach is normal (the kernel
/// finishes tearing a device down after its last close, and udev probes it on the change
/// event): retried for [`BUSY_RETRY`] (at shutdown: until the deadline), then left for the
/// shutdown. The kernel refuses atomically to remove a device that is attached or open, so a
/// node another attacher picked up meanwhile is never pulled away, and is no longer ours.
fn reap_worker(jobs: &Mutex<mpsc::Receiver<u32>>) {
    let control = open_control();
    let Some(r) = REAPER.get() else { return };
    loop {
        let next = lock(jobs).recv();
        let Ok(n) = next else { return };
        let started = Instant::now();
        let outcome = match &control {
            Err(_) => Outcome::Done,
            Ok(control) => loop {
                match remove_node(control, n) {
                    Err(Errno::EBUSY) if !attached(n) => {
                        let until = lock(&r.stop_by).unwrap_or(started + BUSY_RETRY);
                        if Instant::now() >= until {
                            tracing::debug!(device = n, "loop node still busy; not removed yet");
                            break Outcome::Busy;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    // Removed, gone already, or attached again by someone: done with it.
                    _ => break Outcome::Done,
                }
            },
        };
        if let Outcome::Busy = outcome {
            lock(&r.busy).insert(n);
        }
        lock(&r.pending).remove(&n);
    }
}

fn queue_removal(n: u32) {
    let Some(r) = REAPER.get() else { return };
    if lock(&r.pending).insert(n) {
        let _ = r.queue.send(n);
    }
}

/// At shutdown: give the queued removals (and the nodes that were busy, if idle now) up to
/// `wait`, with more threads, and leave the rest to the next loopvol in the node state
/// directory (written plainly, not fsynced: a lost list leaks idle nodes, nothing else).
pub fn finish_node_cleanup(state_dir: &Path, wait: Duration) {
    let Some(r) = REAPER.get() else { return };
    let started = Instant::now();
    *lock(&r.stop_by) = Some(started + wait);
    let busy: Vec<u32> = lock(&r.busy).drain().collect();
    for n in busy.into_iter().filter(|&n| idle(n)) {
        queue_removal(n);
    }
    let queued = lock(&r.pending).len();
    if queued > 0 && !wait.is_zero() {
        spawn_workers(STOP_THREADS, REAPER_THREADS);
    }
    loop {
        let mut left: Vec<u32> = lock(&r.pending).iter().copied().collect();
        if left.is_empty() || started.elapsed() >= wait {
            left.extend(lock(&r.busy).iter().copied());
            left.sort_unstable();
            left.dedup();
            if left.is_empty() {
                if queued > 0 {
                    tracing::info!(nodes = queued, took = ?started.elapsed(),
                        "idle loop nodes removed before the exit");
                }
                return;
            }
            let list: String = left.iter().map(|n| format!("{n}\n")).collect();
            let tmp = state_dir.join(format!("{PENDING_FILE}.tmp"));
            if std::fs::write(&tmp, list).is_ok() {
                let _ = std::fs::rename(&tmp, state_dir.join(PENDING_FILE));
            }
            tracing::info!(
                nodes = left.len(),
                of = queued,
                "idle loop nodes not removed within the shutdown budget; the next start \
                 removes them"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn loop_number(device: &Path) -> Option<u32> {
    device.to_str()?.strip_prefix("/dev/loop")?.parse().ok()
}

/// Queue the node of a device loopvol detached for removal, if it is its own (see
/// [`NodeReaper`]).
pub(super) fn reap_node(device: &Path) {
    let Some(reaper) = REAPER.get() else { return };
    let Some(n) = loop_number(device) else { return };
    if ours_to_remove(n, &reaper.spare_at_start) {
        queue_removal(n);
    }
}

/// Boot-time nodes and the ones idle when loopvol started are not loopvol's to remove.
fn ours_to_remove(n: u32, spare_at_start: &HashSet<u32>) -> bool {
    n >= BOOT_NODES && !spare_at_start.contains(&n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nodes_loopvol_used_are_removed() {
        let spare: HashSet<u32> = [0, 1, 9].into_iter().collect();
        assert!(!ours_to_remove(3, &spare), "boot-time node");
        assert!(!ours_to_remove(9, &spare), "idle before loopvol started");
        assert!(ours_to_remove(10, &spare));
        assert_eq!(loop_number(Path::new("/dev/loop12")), Some(12));
        assert_eq!(loop_number(Path::new("/dev/sda")), None);
        assert_eq!(loop_number(Path::new("/dev/loop-control")), None);
    }
}
