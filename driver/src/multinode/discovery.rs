//! Finding the node plugins: the pods of the node DaemonSet, by label selector, watched through
//! the Kubernetes API (not polled per request). Each ready pod with an IP serves its node's
//! pool at `https://<pod IP>:<pool port>`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};

use crate::multinode::router::NodeDirectory;

/// node name → pool URL, from a set of pods. Pods that are not running and ready, are being
/// deleted, or lack a node or an IP are left out; if two pods claim a node (a rollout), the
/// newest wins.
pub fn endpoints_from_pods<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    port: u16,
) -> BTreeMap<String, String> {
    let mut best: BTreeMap<String, (String, String)> = BTreeMap::new();
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else {
            continue;
        };
        let ready = status.phase.as_deref() == Some("Running")
            && status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
        let (Some(node), Some(ip)) = (&spec.node_name, &status.pod_ip) else {
            continue;
        };
        if !ready || provisioner::ids::validate_node_id(node).is_err() {
            continue;
        }
        let created = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| format!("{:?}", t.0))
            .unwrap_or_default();
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.clone()
        };
        let url = format!("https://{host}:{port}");
        match best.get(node) {
            Some((c, _)) if *c >= created => {}
            _ => {
                best.insert(node.clone(), (created, url));
            }
        }
    }
    best.into_iter().map(|(n, (_, u))| (n, u)).collect()
}

/// Nodes that have a node plugin pod in any state: starting, not ready, terminating. During a
/// rolling update the node's plugin is unavailable for a moment, but the node has not gone
/// anywhere, and the router must keep it in its node set.
pub fn nodes_with_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeSet<String> {
    pods.into_iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .filter(|n| provisioner::ids::validate_node_id(n).is_ok())
        .collect()
}

/// Watch the node plugin pods and keep `dir` current until the process exits.
pub async fn watch(
    dir: Arc<NodeDirectory>,
    namespace: String,
    selector: String,
    port: u16,
) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let api: Api<Pod> = Api::namespaced(client, &namespace);
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().labels(&selector)),
    )
    .default_backoff();
    tracing::info!(namespace = %namespace, selector = %selector, "watching node plugin pods");
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Err(e) => {
                    tracing::warn!(error = %e, "node plugin watch interrupted; retrying");
                    continue;
                }
                // A (re)list in progress: the store still holds the previous complete state,
                // and the first complete list is what the router waits for.
                Ok(watcher::Event::Init) | Ok(watcher::Event::InitApply(_)) => continue,
                // Deletions too: a pod that is gone must not keep its endpoint.
                Ok(watcher::Event::InitDone)
                | Ok(watcher::Event::Apply(_))
                | Ok(watcher::Event::Delete(_)) => {}
            }
            let pods = reader.state();
            dir.discovered(
                endpoints_from_pods(pods.iter().map(|p| p.as_ref()), port),
                nodes_with_pods(pods.iter().map(|p| p.as_ref())),
            );
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PodList in the API server's JSON wire format for the DaemonSet's selector, written
    /// for this test (no API server runs here): ready pods, a rollout leftover on the same
    /// node, an IPv6 pod, an unready, a terminating and an unscheduled one.
    const RECORDED: &str = include_str!("../../testdata/node-pods.json");

    #[test]
    fn recorded_pod_list_gives_one_endpoint_per_ready_node() {
        let list: k8s_openapi::List<Pod> = serde_json::from_str(RECORDED).unwrap();
        let eps = endpoints_from_pods(list.items.iter(), 9820);
        assert_eq!(
            eps,
            BTreeMap::from([
                ("node-a".to_string(), "https://10.244.1.7:9820".to_string()),
                ("node-b".to_string(), "https://[fd00::b]:9820".to_string()),
            ])
        );
        // Starting and terminating plugins keep their nodes known; an unscheduled pod names
        // no node.
        assert_eq!(
            nodes_with_pods(list.items.iter()),
            BTreeSet::from(["node-a", "node-b", "node-c", "node-d"].map(String::from))
        );
    }
}
