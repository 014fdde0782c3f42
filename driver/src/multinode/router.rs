//! Router mode: the controller Deployment keeps no volume state. It forwards every Controller
//! RPC to the node plugin whose pool holds (or will hold) the volume, over mTLS. The owning
//! node is read from the volume or snapshot ID; new volumes go where the topology requirements
//! (the scheduler's choice, with WaitForFirstConsumer) say. An unreachable node is UNAVAILABLE,
//! which the sidecars retry: nothing is deleted or forgotten because a node was down.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use provisioner::ids::{validate_node_id, Kind};
use provisioner::VolumeId;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use crate::csi::controller_client::ControllerClient;
use crate::csi::controller_server::Controller;
use crate::csi::*;
use crate::edge::controller::capabilities;
use crate::shared::advertise::Advertised;
use crate::TOPOLOGY_KEY;

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
    pub async fn wait_synced(&self) -> Result<(), Status> {
        let mut rx = self.synced.subscribe();
        let synced = tokio::time::timeout(self.discovery_wait, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok());
        if synced {
            return Ok(());
        }
        Err(Status::unavailable(
            "the router has not discovered the loopvol node plugins yet; retry",
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
    fn url(&self, node: &str) -> Result<String, Status> {
        let cur = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        if let Some(url) = cur.ready.get(node) {
            return Ok(url.clone());
        }
        Err(match cur.known.get(node) {
            Some(_) => Status::unavailable(format!(
                "the loopvol node plugin on node {node:?} is not ready (restarting?); retry"
            )),
            None => {
                Status::unavailable(format!("no loopvol node plugin is known for node {node:?}"))
            }
        })
    }

    /// A Controller client for `node`'s pool API.
    pub fn client(&self, node: &str) -> Result<ControllerClient<Channel>, Status> {
        self.channel(node).map(ControllerClient::new)
    }

    /// The channel to `node`'s pool API (every service on it shares it); connections are made
    /// lazily and reused.
    pub fn channel(&self, node: &str) -> Result<Channel, Status> {
        let url = self.url(node)?;
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((u, c)) = channels.get(node) {
            if *u == url {
                return Ok(c.clone());
            }
        }
        let channel = Endpoint::from_shared(url.clone())
            .map_err(|e| Status::internal(format!("bad endpoint {url}: {e}")))?
            .tls_config(self.tls.clone())
            .map_err(|e| Status::internal(format!("TLS setup for {url}: {e}")))?
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

pub struct Router {
    dir: Arc<NodeDirectory>,
    advertised: Advertised,
}

impl Router {
    pub fn new(dir: Arc<NodeDirectory>, advertised: Advertised) -> Self {
        Router { dir, advertised }
    }

    /// A client for `node`, once discovery has had its chance to name it.
    async fn node(&self, node: &str) -> Result<ControllerClient<Channel>, Status> {
        self.dir.wait_synced().await?;
        self.dir.client(node)
    }

    /// Every known node, once discovery has had its chance to name them.
    async fn names(&self) -> Result<Vec<String>, Status> {
        self.dir.wait_synced().await?;
        Ok(self.dir.names())
    }

    async fn for_volume(&self, id: &str) -> Option<Result<ControllerClient<Channel>, Status>> {
        match VolumeId::parse(Kind::Volume, id) {
            Some(v) => Some(self.node(&v.node).await),
            None => None,
        }
    }

    /// The pool API of the node owning volume `id`: INVALID_ARGUMENT when the ID is missing,
    /// NOT_FOUND when it is not a loopvol ID at all.
    async fn volume_owner(
        &self,
        field: &str,
        id: &str,
    ) -> Result<ControllerClient<Channel>, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(format!("{field} is required")));
        }
        self.for_volume(id)
            .await
            .unwrap_or_else(|| Err(unknown_volume(id)))
    }

    async fn for_snapshot(&self, id: &str) -> Option<Result<ControllerClient<Channel>, Status>> {
        match VolumeId::parse(Kind::Snapshot, id) {
            Some(v) => Some(self.node(&v.node).await),
            None => None,
        }
    }

    /// Choose the node for a new volume.
    async fn place(&self, req: &CreateVolumeRequest) -> Result<String, Status> {
        let named = |ts: &[Topology]| -> Vec<String> {
            ts.iter()
                .filter_map(|t| t.segments.get(TOPOLOGY_KEY).cloned())
                .collect()
        };
        let (preferred, requisite) = req
            .accessibility_requirements
            .as_ref()
            .map(|r| (named(&r.preferred), named(&r.requisite)))
            .unwrap_or_default();
        let source_node = req
            .volume_content_source
            .as_ref()
            .and_then(|s| match &s.r#type {
                Some(volume_content_source::Type::Snapshot(x)) => {
                    VolumeId::parse(Kind::Snapshot, &x.snapshot_id).map(|v| v.node)
                }
                Some(volume_content_source::Type::Volume(x)) => {
                    VolumeId::parse(Kind::Volume, &x.volume_id).map(|v| v.node)
                }
                None => None,
            });
        if let Some(src) = source_node {
            if !requisite.is_empty() && !requisite.contains(&src) {
                return Err(Status::resource_exhausted(format!(
                    "the content source lives on node {src}, which the requisite topologies exclude"
                )));
            }
            return Ok(src);
        }
        let wanted: Vec<&String> = preferred.iter().chain(requisite.iter()).collect();
        if !wanted.is_empty() {
            let known = self.names().await?;
            return wanted
                .into_iter()
                .find(|n| known.contains(n))
                .cloned()
                .ok_or_else(|| {
                    Status::unavailable(format!(
                        "none of the requested nodes {preferred:?} {requisite:?} has a reachable loopvol node plugin"
                    ))
                });
        }
        // No constraint: the node with the most room for this kind of volume.
        let mut best: Option<(i64, String)> = None;
        for node in self.names().await? {
            let mut c = match self.dir.client(&node) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "node skipped for placement");
                    continue;
                }
            };
            let cap = c
                .get_capacity(GetCapacityRequest {
                    volume_capabilities: req.volume_capabilities.clone(),
                    parameters: req.parameters.clone(),
                    accessible_topology: None,
                })
                .await;
            match cap {
                Ok(r) => {
                    let free = r.into_inner().available_capacity;
                    if best.as_ref().is_none_or(|(b, _)| free > *b) {
                        best = Some((free, node));
                    }
                }
                Err(e) => tracing::warn!(node = %node, error = %e, "node skipped for placement"),
            }
        }
        best.map(|(_, n)| n)
            .ok_or_else(|| Status::unavailable("no loopvol node plugin is reachable"))
    }

    /// One page of a list merged across nodes in node-name order. The token `node:inner`
    /// names the node to continue with and that node's own token, so it stays valid while
    /// volumes are added and when nodes come or go.
    async fn merged_page<T, F, Fut>(
        &self,
        max_entries: i32,
        token: &str,
        mut fetch: F,
    ) -> Result<(Vec<T>, String), Status>
    where
        F: FnMut(ControllerClient<Channel>, i32, String) -> Fut,
        Fut: Future<Output = Result<(Vec<T>, String), Status>>,
    {
        if max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let (start, mut inner) = parse_token(token)?;
        let names: Vec<String> = self
            .names()
            .await?
            .into_iter()
            .filter(|n| start.as_ref().is_none_or(|s| n >= s))
            .collect();
        if start.as_ref().is_some_and(|s| names.first() != Some(s)) {
            inner.clear(); // the node we stopped at is gone: start the next one afresh
        }
        let max = max_entries as usize;
        let mut out = Vec::new();
        for (i, node) in names.iter().enumerate() {
            loop {
                let want = if max == 0 {
                    0
                } else {
                    (max - out.len()) as i32
                };
                let (entries, next) =
                    fetch(self.dir.client(node)?, want, std::mem::take(&mut inner)).await?;
                out.extend(entries);
                let full = max != 0 && out.len() >= max;
                if !next.is_empty() {
                    if full {
                        return Ok((out, format!("{node}:{next}")));
                    }
                    inner = next;
                    continue;
                }
                if full {
                    let more = names
                        .get(i + 1)
                        .map(|n| format!("{n}:"))
                        .unwrap_or_default();
                    return Ok((out, more));
                }
                break;
            }
        }
        Ok((out, String::new()))
    }
}

fn parse_token(token: &str) -> Result<(Option<String>, String), Status> {
    if token.is_empty() {
        return Ok((None, String::new()));
    }
    let bad = || {
        Status::aborted(format!(
            "starting_token {token:?} is not a token this driver issued"
        ))
    };
    let (node, inner) = token.split_once(':').ok_or_else(bad)?;
    validate_node_id(node).map_err(|_| bad())?;
    if !(inner.is_empty()
        || (inner.len() == 20
            && inner
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))))
    {
        return Err(bad());
    }
    Ok((Some(node.to_string()), inner.to_string()))
}

fn unknown_volume(id: &str) -> Status {
    Status::not_found(format!("volume {id} is not a loopvol volume"))
}

#[tonic::async_trait]
impl Controller for Router {
    #[tracing::instrument(skip_all, name = "CreateVolume", fields(volume_name = %crate::shared::logsafe::text(&req.get_ref().name)))]
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        let node = self.place(&req).await?;
        tracing::info!(node = %node, "routing CreateVolume");
        self.node(&node).await?.create_volume(req).await
    }

    #[tracing::instrument(skip_all, name = "DeleteVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        match self.for_volume(&r.volume_id).await {
            Some(c) => c?.delete_volume(r).await,
            None => Ok(Response::new(DeleteVolumeResponse {})),
        }
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented("loopvol has no attach step"))
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented("loopvol has no attach step"))
    }

    #[tracing::instrument(skip_all, name = "ValidateVolumeCapabilities", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        self.volume_owner("volume_id", &r.volume_id)
            .await?
            .validate_volume_capabilities(r)
            .await
    }

    #[tracing::instrument(skip_all, name = "ListVolumes")]
    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let (entries, next_token) = self
            .merged_page(
                r.max_entries,
                &r.starting_token,
                |mut c, max_entries, starting_token| async move {
                    let resp = c
                        .list_volumes(ListVolumesRequest {
                            max_entries,
                            starting_token,
                        })
                        .await?
                        .into_inner();
                    Ok((resp.entries, resp.next_token))
                },
            )
            .await?;
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    #[tracing::instrument(skip_all, name = "ControllerListVolumeHealth")]
    async fn controller_list_volume_health(
        &self,
        req: Request<ControllerListVolumeHealthRequest>,
    ) -> Result<Response<ControllerListVolumeHealthResponse>, Status> {
        let r = req.into_inner();
        let (entries, next_token) = self
            .merged_page(
                r.max_entries,
                &r.starting_token,
                |mut c, max_entries, starting_token| async move {
                    let resp = c
                        .controller_list_volume_health(ControllerListVolumeHealthRequest {
                            max_entries,
                            starting_token,
                            secrets: Default::default(),
                        })
                        .await?
                        .into_inner();
                    Ok((resp.entries, resp.next_token))
                },
            )
            .await?;
        Ok(Response::new(ControllerListVolumeHealthResponse {
            entries,
            next_token,
        }))
    }

    #[tracing::instrument(skip_all, name = "ControllerGetVolumeHealth", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn controller_get_volume_health(
        &self,
        req: Request<ControllerGetVolumeHealthRequest>,
    ) -> Result<Response<ControllerGetVolumeHealthResponse>, Status> {
        let r = req.into_inner();
        self.volume_owner("volume_id", &r.volume_id)
            .await?
            .controller_get_volume_health(r)
            .await
    }

    #[tracing::instrument(skip_all, name = "GetCapacity")]
    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let r = req.into_inner();
        if let Some(node) = r
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(TOPOLOGY_KEY))
        {
            // A node whose plugin the router does not know (yet), or that is restarting, is
            // UNAVAILABLE, never 0: csi-provisioner would publish a capacity of 0 for it and
            // the scheduler would stop placing volumes there. The sidecar retries.
            return self.node(node).await?.get_capacity(r).await;
        }
        // No segment: what the whole cluster offers; the largest single volume is one node's.
        // A node that cannot answer makes the total unknown, not smaller.
        let (mut total, mut largest) = (0i64, 0i64);
        for node in self.names().await? {
            let resp = self.dir.client(&node)?.get_capacity(r.clone()).await?;
            let resp = resp.into_inner();
            total = total.saturating_add(resp.available_capacity);
            largest = largest.max(resp.maximum_volume_size.unwrap_or(resp.available_capacity));
        }
        Ok(Response::new(GetCapacityResponse {
            available_capacity: total,
            maximum_volume_size: Some(largest),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities(&self.advertised)))
    }

    #[tracing::instrument(skip_all, name = "CreateSnapshot", fields(source = %crate::shared::logsafe::text(&req.get_ref().source_volume_id)))]
    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        self.volume_owner("source_volume_id", &r.source_volume_id)
            .await?
            .create_snapshot(r)
            .await
    }

    #[tracing::instrument(skip_all, name = "DeleteSnapshot", fields(snapshot_id = %crate::shared::logsafe::text(&req.get_ref().snapshot_id)))]
    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.snapshot_id.is_empty() {
            return Err(Status::invalid_argument("snapshot_id is required"));
        }
        match self.for_snapshot(&r.snapshot_id).await {
            Some(c) => c?.delete_snapshot(r).await,
            None => Ok(Response::new(DeleteSnapshotResponse {})),
        }
    }

    #[tracing::instrument(skip_all, name = "ListSnapshots")]
    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        // A filter pins the answer to one node.
        let pinned = if !r.snapshot_id.is_empty() {
            Some(VolumeId::parse(Kind::Snapshot, &r.snapshot_id).map(|v| v.node))
        } else if !r.source_volume_id.is_empty() {
            Some(VolumeId::parse(Kind::Volume, &r.source_volume_id).map(|v| v.node))
        } else {
            None
        };
        match pinned {
            Some(None) => return Ok(Response::new(ListSnapshotsResponse::default())),
            Some(Some(node)) => return self.node(&node).await?.list_snapshots(r).await,
            None => {}
        }
        let (entries, next_token) = self
            .merged_page(
                r.max_entries,
                &r.starting_token,
                |mut c, max_entries, starting_token| async move {
                    let resp = c
                        .list_snapshots(ListSnapshotsRequest {
                            max_entries,
                            starting_token,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    Ok((resp.entries, resp.next_token))
                },
            )
            .await?;
        Ok(Response::new(ListSnapshotsResponse {
            entries,
            next_token,
        }))
    }

    #[tracing::instrument(skip_all, name = "GetSnapshot", fields(snapshot_id = %crate::shared::logsafe::text(&req.get_ref().snapshot_id)))]
    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        match self.for_snapshot(&r.snapshot_id).await {
            Some(c) => c?.get_snapshot(r).await,
            None if r.snapshot_id.is_empty() => {
                Err(Status::invalid_argument("snapshot_id is required"))
            }
            None => Err(Status::not_found(format!(
                "snapshot {} is not a loopvol snapshot",
                r.snapshot_id
            ))),
        }
    }

    #[tracing::instrument(skip_all, name = "ControllerExpandVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        self.volume_owner("volume_id", &r.volume_id)
            .await?
            .controller_expand_volume(r)
            .await
    }

    #[tracing::instrument(skip_all, name = "ControllerGetVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        self.volume_owner("volume_id", &r.volume_id)
            .await?
            .controller_get_volume(r)
            .await
    }

    #[tracing::instrument(skip_all, name = "ControllerModifyVolume", fields(volume_id = %req.get_ref().volume_id))]
    async fn controller_modify_volume(
        &self,
        req: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let r = req.into_inner();
        self.volume_owner("volume_id", &r.volume_id)
            .await?
            .controller_modify_volume(r)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity_at(node: &str) -> Request<GetCapacityRequest> {
        Request::new(GetCapacityRequest {
            accessible_topology: Some(crate::edge::controller::topology(node)),
            ..Default::default()
        })
    }

    fn directory() -> NodeDirectory {
        NodeDirectory::new(ClientTlsConfig::new())
            .with_timing(Duration::from_millis(200), Duration::from_millis(300))
    }

    /// Before discovery's first answer nothing is known, and nothing may read as empty: no
    /// capacity of 0, no empty list. The router waits a moment for discovery, then answers
    /// UNAVAILABLE.
    #[tokio::test]
    async fn an_undiscovered_node_is_unavailable_not_empty() {
        let router = Router::new(Arc::new(directory()), Advertised::default());
        let started = std::time::Instant::now();
        let e = router.get_capacity(capacity_at("n1")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(started.elapsed() >= Duration::from_millis(200), "it waited");
        let whole = Request::new(GetCapacityRequest::default());
        assert_eq!(
            router.get_capacity(whole).await.unwrap_err().code(),
            tonic::Code::Unavailable
        );
        let list = router
            .list_volumes(Request::new(ListVolumesRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(list.code(), tonic::Code::Unavailable);

        // Discovery answers while a call waits: the call goes on with the node set.
        let dir = Arc::new(directory().with_timing(Duration::from_secs(10), FORGET_AFTER));
        let router = Router::new(dir.clone(), Advertised::default());
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            dir.discovered(BTreeMap::new(), BTreeSet::new());
        });
        let list = router
            .list_volumes(Request::new(ListVolumesRequest::default()))
            .await
            .unwrap();
        assert!(list.into_inner().entries.is_empty());
        late.await.unwrap();
        // Discovered, and still not a node of this cluster: UNAVAILABLE, not 0.
        let e = router.get_capacity(capacity_at("n9")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    }

    /// A plugin restart (pod terminating, gone, new pod not ready yet) keeps the node in the
    /// set: its calls are UNAVAILABLE and lists are not silently shorter. Only a node without
    /// any pod for FORGET_AFTER is forgotten.
    #[tokio::test]
    async fn a_restarting_plugin_keeps_its_node_known() {
        let dir = directory();
        let url = |n: &str| (n.to_string(), format!("https://127.0.0.1:1/{n}"));
        dir.discovered(
            BTreeMap::from([url("n1"), url("n2")]),
            BTreeSet::from(["n1".to_string(), "n2".to_string()]),
        );
        assert!(dir.client("n1").is_ok());
        // n1's pod terminates and is replaced by one that is not ready yet.
        dir.discovered(
            BTreeMap::from([url("n2")]),
            BTreeSet::from(["n1".to_string(), "n2".to_string()]),
        );
        assert_eq!(dir.names(), ["n1", "n2"]);
        let e = dir.client("n1").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("not ready"), "{e}");
        // For a moment n1 has no pod at all.
        dir.discovered(
            BTreeMap::from([url("n2")]),
            BTreeSet::from(["n2".to_string()]),
        );
        assert_eq!(dir.names(), ["n1", "n2"]);
        let router = Router::new(Arc::new(dir), Advertised::default());
        let e = router.get_capacity(capacity_at("n1")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        let dir = router.dir.clone();
        dir.discovered(
            BTreeMap::from([url("n1"), url("n2")]),
            BTreeSet::from(["n1".to_string(), "n2".to_string()]),
        );
        assert!(dir.client("n1").is_ok(), "back");
        // A node that is really gone is forgotten after FORGET_AFTER (300 ms here).
        dir.discovered(
            BTreeMap::from([url("n2")]),
            BTreeSet::from(["n2".to_string()]),
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(dir.names(), ["n2"]);
        dir.discovered(
            BTreeMap::from([url("n2")]),
            BTreeSet::from(["n2".to_string()]),
        );
        assert_eq!(dir.names(), ["n2"]);
        assert!(dir
            .client("n1")
            .unwrap_err()
            .message()
            .contains("no loopvol node plugin"));
    }

    #[test]
    fn endpoints_and_tokens_parse() {
        let m = parse_endpoints("n1=https://10.0.0.1:9820, n2=https://10.0.0.2:9820").unwrap();
        assert_eq!(m.len(), 2);
        assert!(parse_endpoints("n1=http://x:1").is_err());
        assert!(parse_endpoints("bad/name=https://x:1").is_err());
        assert_eq!(parse_token("").unwrap(), (None, String::new()));
        assert_eq!(
            parse_token("n2:").unwrap(),
            (Some("n2".into()), String::new())
        );
        assert_eq!(
            parse_token("n2:0123456789abcdef0123").unwrap().1,
            "0123456789abcdef0123"
        );
        for bad in ["nonsense", "n2:xyz", "a/b:", ":"] {
            assert_eq!(
                parse_token(bad).unwrap_err().code(),
                tonic::Code::Aborted,
                "{bad}"
            );
        }
    }
}
