//! Router mode: the controller Deployment keeps no volume state. It forwards every Controller
//! RPC to the node plugin whose pool holds (or will hold) the volume, over mTLS. The owning
//! node is read from the volume or snapshot ID; new volumes go where the topology requirements
//! (the scheduler's choice, with WaitForFirstConsumer) say. An unreachable node is UNAVAILABLE,
//! which the sidecars retry: nothing is deleted or forgotten because a node was down.
//!
//! `directory` knows the nodes, this module chooses one, and `controller` is the CSI service,
//! where forwarding an RPC to its volume's node is written once.

mod controller;
mod directory;

use std::future::Future;
use std::sync::Arc;

use provisioner::ids::{validate_node_id, Kind};
use provisioner::VolumeId;
use tonic::transport::Channel;
use tonic::Status;

pub use directory::{parse_endpoints, NodeDirectory, DISCOVERY_WAIT, FORGET_AFTER};

use crate::csi::controller_client::ControllerClient;
use crate::csi::*;
use crate::error::{Error, Result};
use crate::shared::advertise::Advertised;
use crate::TOPOLOGY_KEY;

pub struct Router {
    dir: Arc<NodeDirectory>,
    advertised: Advertised,
}

impl Router {
    pub fn new(dir: Arc<NodeDirectory>, advertised: Advertised) -> Self {
        Router { dir, advertised }
    }

    /// A client for `node`, once discovery has had its chance to name it.
    async fn node(&self, node: &str) -> Result<ControllerClient<Channel>> {
        self.dir.wait_synced().await?;
        self.dir.client(node)
    }

    /// The pool API URL of `node` (a content source's node, for the target to pull from):
    /// UNAVAILABLE while it has no ready plugin.
    async fn source_endpoint(&self, node: &str) -> Result<String> {
        self.dir.wait_synced().await?;
        self.dir.url(node)
    }

    /// Every known node, once discovery has had its chance to name them.
    async fn names(&self) -> Result<Vec<String>> {
        self.dir.wait_synced().await?;
        Ok(self.dir.names())
    }

    async fn for_volume(&self, id: &str) -> Option<Result<ControllerClient<Channel>>> {
        match VolumeId::parse(Kind::Volume, id) {
            Some(v) => Some(self.node(&v.node).await),
            None => None,
        }
    }

    /// The pool API of the node owning volume `id`: INVALID_ARGUMENT when the ID is missing,
    /// NOT_FOUND when it is not a loopvol ID at all.
    async fn volume_owner(&self, field: &str, id: &str) -> Result<ControllerClient<Channel>> {
        crate::error::required(field, id)?;
        self.for_volume(id)
            .await
            .unwrap_or_else(|| Err(unknown_volume(id)))
    }

    async fn for_snapshot(&self, id: &str) -> Option<Result<ControllerClient<Channel>>> {
        match VolumeId::parse(Kind::Snapshot, id) {
            Some(v) => Some(self.node(&v.node).await),
            None => None,
        }
    }

    /// Choose the node for a new volume, and name the node its content source lives on.
    ///
    /// With a content source: the node the CO asks for. csi-provisioner with
    /// WaitForFirstConsumer sends preferred = [the scheduler's node, …] and (without
    /// `--strict-topology`) requisite = every node, so a requisite that contains the source's
    /// node does not mean the volume may go there: the pod runs on preferred[0]. So: the first
    /// preferred node that the requisite allows (any, if it is empty), else the source's node
    /// if the requisite allows it, else the first requisite node. Without topology, the
    /// source's node (no copy). Another node than the source's is filled by a transfer.
    async fn place(&self, req: &CreateVolumeRequest) -> Result<(String, Option<String>)> {
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
            return Ok((target_for_copy(&preferred, &requisite, &src), Some(src)));
        }
        let wanted: Vec<&String> = preferred.iter().chain(requisite.iter()).collect();
        if !wanted.is_empty() {
            let known = self.names().await?;
            return wanted
                .into_iter()
                .find(|n| known.contains(n))
                .map(|n| (n.clone(), None))
                .ok_or_else(|| {
                    Error::Unavailable(format!(
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
        best.map(|(_, n)| (n, None))
            .ok_or_else(|| Error::Unavailable("no loopvol node plugin is reachable".into()))
    }

    /// One page of a list merged across nodes in node-name order. The token `node:inner`
    /// names the node to continue with and that node's own token, so it stays valid while
    /// volumes are added and when nodes come or go.
    async fn merged_page<T, F, Fut>(
        &self,
        max_entries: i32,
        token: &str,
        mut fetch: F,
    ) -> Result<(Vec<T>, String)>
    where
        F: FnMut(ControllerClient<Channel>, i32, String) -> Fut,
        Fut: Future<Output = Result<(Vec<T>, String), Status>>,
    {
        if max_entries < 0 {
            return Err(Error::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
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

/// Where a restore or clone of a source on node `src` goes (see [`Router::place`]).
fn target_for_copy(preferred: &[String], requisite: &[String], src: &String) -> String {
    preferred
        .iter()
        .find(|p| requisite.is_empty() || requisite.contains(p))
        .or_else(|| requisite.contains(src).then_some(src))
        .or(requisite.first())
        .unwrap_or(src)
        .clone()
}

fn parse_token(token: &str) -> Result<(Option<String>, String)> {
    if token.is_empty() {
        return Ok((None, String::new()));
    }
    let bad = || {
        Error::Aborted(format!(
            "starting_token {token:?} is not a token this driver issued"
        ))
    };
    let (node, inner) = token.split_once(':').ok_or_else(bad)?;
    validate_node_id(node).map_err(|_| bad())?;
    if !(inner.is_empty() || provisioner::ids::parse_page_token(inner).is_some()) {
        return Err(bad());
    }
    Ok((Some(node.to_string()), inner.to_string()))
}

fn unknown_volume(id: &str) -> Error {
    Error::NotFound(format!("volume {id} is not a loopvol volume"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::controller_server::Controller;
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;
    use tonic::transport::ClientTlsConfig;
    use tonic::Request;

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
        let e = Status::from(dir.client("n1").unwrap_err());
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
        assert!(Status::from(dir.client("n1").unwrap_err())
            .message()
            .contains("no loopvol node plugin"));
    }

    /// csi-provisioner's two shapes: WaitForFirstConsumer without --strict-topology sends
    /// preferred = [picked, …] and requisite = every node; with it, both = [picked].
    #[test]
    fn a_copy_goes_where_the_co_asks_not_where_its_source_is() {
        let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let src = "n3".to_string();
        let all = v(&["n1", "n2", "n3"]);
        assert_eq!(target_for_copy(&v(&["n1", "n3", "n2"]), &all, &src), "n1");
        assert_eq!(target_for_copy(&v(&["n2"]), &v(&["n2"]), &src), "n2");
        // No preference: the source's node if allowed (no copy), else the first allowed.
        assert_eq!(target_for_copy(&[], &all, &src), "n3");
        assert_eq!(target_for_copy(&[], &v(&["n2", "n1"]), &src), "n2");
        // A preference the requisite excludes is skipped.
        assert_eq!(
            target_for_copy(&v(&["n9", "n1"]), &v(&["n1", "n3"]), &src),
            "n1"
        );
        assert_eq!(target_for_copy(&v(&["n1"]), &[], &src), "n1");
        assert_eq!(target_for_copy(&[], &[], &src), "n3");
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
        // A node's own token names the pool it stopped in when that is not the default.
        assert_eq!(
            parse_token("n2:fast:0123456789abcdef0123").unwrap().1,
            "fast:0123456789abcdef0123"
        );
        for bad in [
            "nonsense",
            "n2:xyz",
            "a/b:",
            ":",
            "n2:Fast:0123456789abcdef0123",
        ] {
            assert_eq!(
                parse_token(bad).unwrap_err().code(),
                tonic::Code::Aborted,
                "{bad}"
            );
        }
    }
}
