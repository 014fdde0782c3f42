//! Which node plugin serves which node's pool, as discovery (or `--node-endpoints`) says, and
//! the mTLS channels to them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use provisioner::ids::validate_node_id;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::csi::controller_client::ControllerClient;
use crate::error::{Error, Result};

/// How long the router waits for node discovery's first complete answer before an RPC that
/// needs the node set answers UNAVAILABLE (csi-provisioner starts asking about capacity a
/// moment before the first pod list arrives).
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(5);

/// How long a node whose plugin pod has vanished altogether stays known. A rolling update
/// deletes a node's pod before the DaemonSet creates the next one; only a node that is gone
/// for good (removed from the cluster) stays without a pod this long.
pub const FORGET_AFTER: Duration = Duration::from_secs(300);

/// Which node plugin serves which node's pool: `node-id → https://ip:port`, and which nodes
/// the router knows at all. A known node whose plugin is not ready (restarting) answers
/// UNAVAILABLE; it is not left out, so lists are never silently partial and a node's capacity
/// is never reported as zero because its plugin was restarting.
pub struct NodeDirectory {
    nodes: RwLock<Nodes>,
    /// False until the first complete answer from discovery (or the static list) came in.
    synced: tokio::sync::watch::Sender<bool>,
    tls: ClientTlsConfig,
    channels: Mutex<HashMap<String, (String, Channel)>>,
    discovery_wait: Duration,
    forget_after: Duration,
}

#[derive(Default)]
struct Nodes {
    /// Nodes with a ready plugin, and its pool URL.
    ready: BTreeMap<String, String>,
    /// Every known node; `Some(t)`: without any plugin pod since `t`.
    known: BTreeMap<String, Option<tokio::time::Instant>>,
}

impl NodeDirectory {
    pub fn new(tls: ClientTlsConfig) -> Self {
        NodeDirectory {
            nodes: RwLock::new(Nodes::default()),
            synced: tokio::sync::watch::Sender::new(false),
            tls,
            channels: Mutex::new(HashMap::new()),
            discovery_wait: DISCOVERY_WAIT,
            forget_after: FORGET_AFTER,
        }
    }

    /// Other waits than [`DISCOVERY_WAIT`] and [`FORGET_AFTER`] (tests).
    pub fn with_timing(mut self, discovery_wait: Duration, forget_after: Duration) -> Self {
        self.discovery_wait = discovery_wait;
        self.forget_after = forget_after;
        self
    }

    /// Replace the whole map with a fixed set of nodes (`--node-endpoints`).
    pub fn set(&self, nodes: BTreeMap<String, String>) {
        let present = nodes.keys().cloned().collect();
        self.discovered(nodes, present);
    }

    /// What discovery sees now: the nodes with a ready plugin (and its URL), and every node
    /// that has a plugin pod in any state (starting, not ready, terminating). A node missing
    /// from both stays known for [`FORGET_AFTER`].
    pub fn discovered(&self, ready: BTreeMap<String, String>, present: BTreeSet<String>) {
        let now = tokio::time::Instant::now();
        let mut cur = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let before: Vec<(String, bool)> = cur
            .known
            .keys()
            .map(|n| (n.clone(), cur.ready.contains_key(n)))
            .collect();
        for node in ready.keys().chain(present.iter()) {
            cur.known.insert(node.clone(), None);
        }
        cur.known.retain(|node, gone| {
            if ready.contains_key(node) || present.contains(node) {
                return true;
            }
            let since = *gone.get_or_insert(now);
            now.duration_since(since) < self.forget_after
        });
        let changed = cur.ready != ready
            || before
                != cur
                    .known
                    .keys()
                    .map(|n| (n.clone(), ready.contains_key(n)))
                    .collect::<Vec<_>>();
        cur.ready = ready;
        if changed {
            let waiting: Vec<&String> = cur
                .known
                .keys()
                .filter(|n| !cur.ready.contains_key(*n))
                .collect();
            tracing::info!(ready = ?cur.ready, not_ready = ?waiting, "node directory updated");
        }
        drop(cur);
        self.synced.send_replace(true);
    }

    /// Wait (up to [`DISCOVERY_WAIT`]) until the node set is known: before discovery's first
    /// answer, an empty node set would read as "no capacity anywhere" and "no volumes".
    pub async fn wait_synced(&self) -> Result<()> {
        let mut rx = self.synced.subscribe();
        let synced = tokio::time::timeout(self.discovery_wait, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok());
        if synced {
            return Ok(());
        }
        Err(Error::Unavailable(
            "the router has not discovered the loopvol node plugins yet; retry".into(),
        ))
    }

    /// Every node the router knows, ready or not, in name order.
    pub fn names(&self) -> Vec<String> {
        let now = tokio::time::Instant::now();
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .known
            .iter()
            .filter(|(_, gone)| gone.is_none_or(|t| now.duration_since(t) < self.forget_after))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The pool URL of `node`'s plugin: UNAVAILABLE, with why, when there is no ready one.
    pub fn url(&self, node: &str) -> Result<String> {
        let cur = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        if let Some(url) = cur.ready.get(node) {
            return Ok(url.clone());
        }
        Err(match cur.known.get(node) {
            Some(_) => Error::Unavailable(format!(
                "the loopvol node plugin on node {node:?} is not ready (restarting?); retry"
            )),
            None => {
                Error::Unavailable(format!("no loopvol node plugin is known for node {node:?}"))
            }
        })
    }

    /// A Controller client for `node`'s pool API.
    pub fn client(&self, node: &str) -> Result<ControllerClient<Channel>> {
        self.channel(node).map(ControllerClient::new)
    }

    /// The channel to `node`'s pool API (every service on it shares it); connections are made
    /// lazily and reused.
    pub fn channel(&self, node: &str) -> Result<Channel> {
        let url = self.url(node)?;
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((u, c)) = channels.get(node) {
            if *u == url {
                return Ok(c.clone());
            }
        }
        let channel = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::Internal(format!("bad endpoint {url}: {e}")))?
            .tls_config(self.tls.clone())
            .map_err(|e| Error::Internal(format!("TLS setup for {url}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(300))
            .connect_lazy();
        channels.insert(node.to_string(), (url, channel.clone()));
        Ok(channel)
    }
}

/// Parse `--node-endpoints name=https://host:port,...`.
pub fn parse_endpoints(spec: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, url) = part
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("{part:?} is not name=https://host:port"))?;
        validate_node_id(name)?;
        if !url.starts_with("https://") {
            anyhow::bail!("{url:?}: node endpoints must be https:// (the pool API is mTLS only)");
        }
        out.insert(name.to_string(), url.to_string());
    }
    Ok(out)
}
