//! Running a batch of operations with bounded concurrency, the way csi-provisioner's worker
//! pool or kubelet's volume manager issue them: `concurrency` workers, each taking the next
//! operation as soon as its previous one returns.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::stats::Summary;

/// What happened to one operation of a batch.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub index: usize,
    pub latency: Duration,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// One entry per operation, in index order.
    pub outcomes: Vec<Outcome>,
    pub wall: Duration,
}

impl Batch {
    pub fn summary(&self) -> Summary {
        let ok: Vec<Duration> = self
            .outcomes
            .iter()
            .filter(|o| o.error.is_none())
            .map(|o| o.latency)
            .collect();
        Summary::new(&ok, self.failures(), self.wall)
    }

    pub fn failures(&self) -> usize {
        self.outcomes.iter().filter(|o| o.error.is_some()).count()
    }

    /// The first few distinct error messages, for the report.
    pub fn errors(&self, max: usize) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in self.outcomes.iter().filter_map(|o| o.error.as_ref()) {
            if out.len() == max {
                break;
            }
            if !out.contains(e) {
                out.push(e.clone());
            }
        }
        out
    }
}

/// Run `op(0..n)` with at most `concurrency` in flight; every operation is timed on its own.
pub async fn run<F, Fut>(n: usize, concurrency: usize, op: F) -> Batch
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.clamp(1, n.max(1)))
        .map(|_| {
            let (op, next, outcomes) = (op.clone(), next.clone(), outcomes.clone());
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= n {
                        break;
                    }
                    let t = Instant::now();
                    // Each operation in its own task, so a panic is one failure, not a lost
                    // worker.
                    let result = tokio::spawn(op(index)).await;
                    let latency = t.elapsed();
                    let error = match result {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(format!("{e:#}")),
                        Err(e) => Some(format!("task failed: {e}")),
                    };
                    outcomes.lock().unwrap().push(Outcome {
                        index,
                        latency,
                        error,
                    });
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let wall = started.elapsed();
    let mut outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    outcomes.sort_by_key(|o| o.index);
    Batch { outcomes, wall }
}

/// Run blocking work (syscalls, child processes) on tokio's blocking pool.
pub async fn blocking<T, F>(f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}

/// Time one async operation.
pub async fn timed<T, Fut>(fut: Fut) -> (Duration, T)
where
    Fut: Future<Output = T>,
{
    let t = Instant::now();
    let v = fut.await;
    (t.elapsed(), v)
}

/// Run two measurements one after the other, `b` first when `flip`: alternating the order
/// between rounds keeps drift on a shared machine (other load, caches warming, the disk's
/// write-back) from favouring one side.
pub async fn side_by_side<A, B>(flip: bool, a: A, b: B) -> (A::Output, B::Output)
where
    A: Future,
    B: Future,
{
    if flip {
        let b = b.await;
        (a.await, b)
    } else {
        let a = a.await;
        (a, b.await)
    }
}
