//! Router mode: the controller Deployment keeps no volume state. It forwards every Controller
//! RPC to the node plugin whose pool holds (or will hold) the volume, over mTLS. The owning
//! node is read from the volume or snapshot ID; new volumes go where the topology requirements
//! (the scheduler's choice, with WaitForFirstConsumer) say. An unreachable node is UNAVAILABLE,
//! which the sidecars retry: nothing is deleted or forgotten because a node was down.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use provisioner::ids::{validate_node_id, Kind};
use provisioner::VolumeId;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use crate::controller_service::capabilities;
use crate::csi::controller_client::ControllerClient;
use crate::csi::controller_server::Controller;
use crate::csi::*;
use crate::TOPOLOGY_KEY;

/// Which node plugin serves which node's pool: `node-id → https://ip:port`.
pub struct NodeDirectory {
    nodes: RwLock<BTreeMap<String, String>>,
    tls: ClientTlsConfig,
    clients: Mutex<HashMap<String, (String, ControllerClient<Channel>)>>,
}

impl NodeDirectory {
    pub fn new(tls: ClientTlsConfig) -> Self {
        NodeDirectory {
            nodes: RwLock::new(BTreeMap::new()),
            tls,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Replace the whole map (discovery calls this on every change).
    pub fn set(&self, nodes: BTreeMap<String, String>) {
        let mut cur = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        if *cur != nodes {
            tracing::info!(nodes = ?nodes, "node directory updated");
            *cur = nodes;
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn url(&self, node: &str) -> Option<String> {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
    }

    /// A client for `node`'s pool API; connections are made lazily and reused.
    pub fn client(&self, node: &str) -> Result<ControllerClient<Channel>, Status> {
        let url = self.url(node).ok_or_else(|| {
            Status::unavailable(format!("no loopvol node plugin is known for node {node:?}"))
        })?;
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((u, c)) = clients.get(node) {
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
        let client = ControllerClient::new(channel);
        clients.insert(node.to_string(), (url, client.clone()));
        Ok(client)
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
}

impl Router {
    pub fn new(dir: Arc<NodeDirectory>) -> Self {
        Router { dir }
    }

    fn for_volume(&self, id: &str) -> Option<Result<ControllerClient<Channel>, Status>> {
        VolumeId::parse(Kind::Volume, id).map(|v| self.dir.client(&v.node))
    }

    /// The pool API of the node owning volume `id`: INVALID_ARGUMENT when the ID is missing,
    /// NOT_FOUND when it is not a loopvol ID at all.
    fn volume_owner(&self, field: &str, id: &str) -> Result<ControllerClient<Channel>, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(format!("{field} is required")));
        }
        self.for_volume(id)
            .unwrap_or_else(|| Err(unknown_volume(id)))
    }

    fn for_snapshot(&self, id: &str) -> Option<Result<ControllerClient<Channel>, Status>> {
        VolumeId::parse(Kind::Snapshot, id).map(|v| self.dir.client(&v.node))
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
            let known = self.dir.names();
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
        for node in self.dir.names() {
            let mut c = self.dir.client(&node)?;
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
            .dir
            .names()
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
    #[tracing::instrument(skip_all, name = "CreateVolume", fields(volume_name = %crate::logsafe::text(&req.get_ref().name)))]
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
        self.dir.client(&node)?.create_volume(req).await
    }

    #[tracing::instrument(skip_all, name = "DeleteVolume", fields(volume_id = %crate::logsafe::text(&req.get_ref().volume_id)))]
    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        match self.for_volume(&r.volume_id) {
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

    #[tracing::instrument(skip_all, name = "ValidateVolumeCapabilities", fields(volume_id = %crate::logsafe::text(&req.get_ref().volume_id)))]
    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        self.volume_owner("volume_id", &r.volume_id)?
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

    #[tracing::instrument(skip_all, name = "ControllerGetVolumeHealth", fields(volume_id = %crate::logsafe::text(&req.get_ref().volume_id)))]
    async fn controller_get_volume_health(
        &self,
        req: Request<ControllerGetVolumeHealthRequest>,
    ) -> Result<Response<ControllerGetVolumeHealthResponse>, Status> {
        let r = req.into_inner();
        self.volume_owner("volume_id", &r.volume_id)?
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
            return match self.dir.client(node) {
                Ok(mut c) => c.get_capacity(r).await,
                // A node without a reachable plugin offers nothing right now.
                Err(_) => Ok(Response::new(GetCapacityResponse {
                    available_capacity: 0,
                    maximum_volume_size: Some(0),
                    minimum_volume_size: None,
                })),
            };
        }
        // No segment: what the whole cluster offers; the largest single volume is one node's.
        let (mut total, mut largest) = (0i64, 0i64);
        for node in self.dir.names() {
            match self.dir.client(&node)?.get_capacity(r.clone()).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    total = total.saturating_add(resp.available_capacity);
                    largest =
                        largest.max(resp.maximum_volume_size.unwrap_or(resp.available_capacity));
                }
                Err(e) => tracing::warn!(node = %node, error = %e, "capacity of node unknown"),
            }
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
        Ok(Response::new(capabilities()))
    }

    #[tracing::instrument(skip_all, name = "CreateSnapshot", fields(source = %crate::logsafe::text(&req.get_ref().source_volume_id)))]
    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        self.volume_owner("source_volume_id", &r.source_volume_id)?
            .create_snapshot(r)
            .await
    }

    #[tracing::instrument(skip_all, name = "DeleteSnapshot", fields(snapshot_id = %crate::logsafe::text(&req.get_ref().snapshot_id)))]
    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.snapshot_id.is_empty() {
            return Err(Status::invalid_argument("snapshot_id is required"));
        }
        match self.for_snapshot(&r.snapshot_id) {
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
            Some(Some(node)) => return self.dir.client(&node)?.list_snapshots(r).await,
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

    #[tracing::instrument(skip_all, name = "GetSnapshot", fields(snapshot_id = %crate::logsafe::text(&req.get_ref().snapshot_id)))]
    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        match self.for_snapshot(&r.snapshot_id) {
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

    #[tracing::instrument(skip_all, name = "ControllerExpandVolume", fields(volume_id = %crate::logsafe::text(&req.get_ref().volume_id)))]
    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        self.volume_owner("volume_id", &r.volume_id)?
            .controller_expand_volume(r)
            .await
    }

    #[tracing::instrument(skip_all, name = "ControllerGetVolume", fields(volume_id = %crate::logsafe::text(&req.get_ref().volume_id)))]
    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        self.volume_owner("volume_id", &r.volume_id)?
            .controller_get_volume(r)
            .await
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("MODIFY_VOLUME is not advertised"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
