//! The reconciler that keeps this node's LoopPool objects current: a task of its own, off the
//! CSI path. It publishes at start, within about a second of a change to a pool's records
//! (create, delete, expand, snapshot: [`provisioner::Pool::changes`], polled; a burst is one
//! publish) and every minute (the figures that move without a record change: data written
//! into thin volumes, the filesystem's free space). A failed round is retried after an
//! exponential backoff, 1 s doubling to 5 min, and nothing else is sent meanwhile.
//!
//! Measuring takes each pool's record lock only for the moment `measure` reads the records,
//! never across a call to the API server; CSI never waits for this task, so with the API server
//! down CSI serves on and the objects catch up at the next successful round.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use kube::api::{Api, ListParams, Patch, PatchParams};
use provisioner::Pool;

use super::object::{self, Figures, LoopPool, LoopPoolStatus};

/// How long a change waits for the ones after it before it is published.
pub const DEBOUNCE: Duration = Duration::from_secs(1);
/// The periodic refresh.
pub const PERIOD: Duration = Duration::from_secs(60);
/// How often the change counters are looked at.
const TICK: Duration = Duration::from_millis(250);
/// A call the API server does not answer in this time counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// 1 s, 2 s, 4 s, … 5 min, until [`Backoff::reset`].
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const MIN: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(300);

    pub fn new() -> Backoff {
        Backoff { next: Self::MIN }
    }

    /// The wait before the next attempt; doubles the one after.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        wait
    }

    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Publisher {
    api: Api<LoopPool>,
    node: String,
    pools: Vec<Arc<Pool>>,
    serves_node: bool,
    /// Objects known to exist: their status is applied directly; the others are applied
    /// (created) first, because a status apply on an absent object is NOT_FOUND.
    known: BTreeSet<String>,
    /// The last status published per pool, for the conditions' transition times.
    last: BTreeMap<String, LoopPoolStatus>,
    /// The start-up sweep (objects of pools this node no longer serves) is still to do.
    sweep_pending: bool,
}

impl Publisher {
    pub fn new(
        api: Api<LoopPool>,
        node: String,
        pools: Vec<Arc<Pool>>,
        serves_node: bool,
    ) -> Publisher {
        Publisher {
            api,
            node,
            pools,
            serves_node,
            known: BTreeSet::new(),
            last: BTreeMap::new(),
            sweep_pending: true,
        }
    }

    fn changes(&self) -> Vec<u64> {
        self.pools.iter().map(|p| p.changes()).collect()
    }

    /// Publish until the task is aborted.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut published: Option<Vec<u64>> = None;
        let mut next_refresh = Instant::now();
        let mut dirty_since: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if published.as_ref() != Some(&self.changes()) && dirty_since.is_none() {
                dirty_since = Some(now);
            }
            let due = match retry_at {
                Some(at) => now >= at,
                None => now >= next_refresh || dirty_since.is_some_and(|d| now - d >= DEBOUNCE),
            };
            if due {
                // Read before measuring: a change during the round is published by the next.
                let changes = self.changes();
                match self.round().await {
                    Ok(()) => {
                        if retry_at.is_some() {
                            tracing::info!("LoopPool objects published again");
                        }
                        published = Some(changes);
                        dirty_since = None;
                        retry_at = None;
                        backoff.reset();
                        next_refresh = Instant::now() + PERIOD;
                    }
                    Err(e) => {
                        let wait = backoff.next_wait();
                        tracing::warn!(
                            error = format!("{e:#}"),
                            retry_in_s = wait.as_secs(),
                            "publishing LoopPool objects failed; CSI is not affected"
                        );
                        retry_at = Some(Instant::now() + wait);
                    }
                }
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// One round: the start-up sweep if still due, then every pool's status.
    async fn round(&mut self) -> anyhow::Result<()> {
        if self.sweep_pending {
            self.sweep().await?;
            self.sweep_pending = false;
        }
        for pool in self.pools.clone() {
            let serves_node = self.serves_node;
            let measured = {
                let pool = pool.clone();
                tokio::task::spawn_blocking(move || figures(&pool, serves_node)).await?
            };
            let figures = match measured {
                Ok(f) => f,
                // A pool that cannot be measured now (its filesystem went away) keeps its last
                // status; the other pools are still published.
                Err(e) => {
                    tracing::warn!(pool = %pool.name(), error = %e, "cannot measure pool for its LoopPool");
                    continue;
                }
            };
            let status = object::status(
                &self.node,
                &figures,
                self.last.get(pool.name()),
                &object::now(),
            );
            self.apply(pool.name(), &status).await?;
            self.last.insert(pool.name().to_string(), status);
        }
        Ok(())
    }

    /// Create the object if it is not known to exist, then apply its status.
    async fn apply(&mut self, pool: &str, status: &LoopPoolStatus) -> anyhow::Result<()> {
        let name = object::name(&self.node, pool);
        let params = PatchParams::apply(object::FIELD_MANAGER).force();
        if !self.known.contains(&name) {
            let body = serde_json::json!({
                "apiVersion": object::API_VERSION,
                "kind": object::KIND,
                "metadata": {
                    "name": name,
                    "labels": {object::NODE_LABEL: self.node, object::POOL_LABEL: pool},
                },
            });
            call(
                "apply LoopPool",
                self.api.patch(&name, &params, &Patch::Apply(&body)),
            )
            .await?;
            self.known.insert(name.clone());
        }
        let body = serde_json::json!({
            "apiVersion": object::API_VERSION,
            "kind": object::KIND,
            "metadata": {"name": name},
            "status": status,
        });
        match call(
            "apply LoopPool status",
            self.api.patch_status(&name, &params, &Patch::Apply(&body)),
        )
        .await
        {
            Err(e) => {
                // Deleted behind our back: create it again at the retry.
                if e.not_found {
                    self.known.remove(&name);
                }
                Err(e.error)
            }
            Ok(_) => Ok(()),
        }
    }

    /// At start: this node's objects of pools it no longer serves are marked `Missing`, with
    /// their last figures, and left for the operator to delete.
    async fn sweep(&mut self) -> anyhow::Result<()> {
        let selector = format!("{}={}", object::NODE_LABEL, self.node);
        let list = call(
            "list LoopPools",
            self.api.list(&ListParams::default().labels(&selector)),
        )
        .await?;
        let served: BTreeSet<&str> = self.pools.iter().map(|p| p.name()).collect();
        let params = PatchParams::apply(object::FIELD_MANAGER).force();
        for obj in list.items {
            let Some(name) = obj.metadata.name.clone() else {
                continue;
            };
            let pool = (obj.metadata.labels.as_ref())
                .and_then(|l| l.get(object::POOL_LABEL))
                .cloned()
                .unwrap_or_default();
            if served.contains(pool.as_str()) && name == object::name(&self.node, &pool) {
                self.known.insert(name);
                if let Some(status) = obj.status {
                    self.last.insert(pool, status);
                }
                continue;
            }
            let last = obj.status.unwrap_or_else(|| LoopPoolStatus {
                node: self.node.clone(),
                pool: pool.clone(),
                ..Default::default()
            });
            if last.health == object::MISSING {
                continue;
            }
            let body = serde_json::json!({
                "apiVersion": object::API_VERSION,
                "kind": object::KIND,
                "metadata": {"name": name},
                "status": object::missing(last, &object::now()),
            });
            call(
                "mark LoopPool missing",
                self.api.patch_status(&name, &params, &Patch::Apply(&body)),
            )
            .await?;
            tracing::warn!(looppool = %name, pool = %pool,
                "this node no longer serves the pool: its LoopPool is marked Missing (delete it when it is gone for good)");
        }
        Ok(())
    }
}

/// A failed call, and whether the API server said NOT_FOUND.
struct CallError {
    error: anyhow::Error,
    not_found: bool,
}

impl From<CallError> for anyhow::Error {
    fn from(e: CallError) -> Self {
        e.error
    }
}

async fn call<T>(
    what: &str,
    f: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CallError {
            not_found: matches!(&e, kube::Error::Api(s) if s.is_not_found()),
            error: anyhow::Error::new(e).context(what.to_string()),
        }),
        Err(_) => Err(CallError {
            error: anyhow!("{what}: no answer in {CALL_TIMEOUT:?}"),
            not_found: false,
        }),
    }
}

/// Measure one pool: the per-pool gauges' figures (one computation for metrics, `status` and
/// the LoopPool), plus what only the object shows.
fn figures(pool: &Pool, serves_node: bool) -> anyhow::Result<Figures> {
    let (sample, capacity) = crate::ops::pool_gauges::measure_with_capacity(pool, serves_node)?;
    let dir = pool.dir();
    let read_only = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("statvfs {}", dir.display()))?
        .flags()
        .contains(nix::sys::statvfs::FsFlags::ST_RDONLY);
    Ok(Figures {
        path: dir.display().to_string(),
        filesystem: crate::ops::admin::fs_name::of(dir)
            .with_context(|| format!("statfs {}", dir.display()))?,
        // Probed once per pool; a read-only pool cannot make the probe's scratch files.
        reflink: !read_only && pool.reflinks(),
        read_only,
        sample,
        headroom_bytes: capacity.headroom(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes_and_resets() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..12).map(|_| b.next_wait().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_secs(1));
    }
}
