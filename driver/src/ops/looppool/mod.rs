//! Pools visible as Kubernetes objects (`serve --publish-pools kubernetes`): one cluster-scoped
//! LoopPool per node and pool, whose status this node plugin keeps current, so
//! `kubectl get looppools` answers "where is room, and on which disk?" for every node.

pub mod object;
pub mod publish;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use provisioner::Pool;

/// Check the object names, build the Kubernetes client (in-cluster, else `KUBECONFIG` or
/// `~/.kube/config`) and start the publisher task. Fails only on what no retry can fix (no
/// client configuration, names the API server would refuse); an API server that is down is
/// the publisher's business, retried in the background.
pub async fn start(
    node: &str,
    pools: Vec<Arc<Pool>>,
    serves_node: bool,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    for p in &pools {
        if let Err(e) = object::check_name(node, p.name()) {
            bail!("--publish-pools kubernetes: {e}");
        }
    }
    let mut config = kube::Config::infer()
        .await
        .context("--publish-pools kubernetes: no Kubernetes client configuration")?;
    // A hung API server must fail a round (and back off), not hold it for the client's
    // default of almost five minutes.
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(10));
    config.write_timeout = Some(Duration::from_secs(10));
    let client = kube::Client::try_from(config).context("Kubernetes client")?;
    let api = kube::Api::<object::LoopPool>::all(client);
    tracing::info!(node = %node, pools = ?pools.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "publishing this node's pools as LoopPool objects");
    let publisher = publish::Publisher::new(api, node.to_string(), pools, serves_node);
    Ok(tokio::spawn(publisher.run()))
}
