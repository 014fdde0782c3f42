//! Wiring: open the pool, build the engine and the services for the chosen mode, and serve
//! them on the unix socket (and the pool API, and the metrics endpoint).

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

use crate::cli::ServeArgs;
use crate::shared::advertise::Advertised;
use crate::shared::{socket_path, Mode};

mod hint;
mod pools;
pub mod shutdown;
pub mod unix_authority;
use crate::csi::controller_server::ControllerServer;
use crate::csi::group_controller_server::GroupControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;
use crate::csi::snapshot_metadata_server::SnapshotMetadataServer;
use crate::edge::controller::ControllerService;
use crate::edge::group_controller::GroupControllerService;
use crate::edge::identity::IdentityService;
use crate::edge::node::NodeService;
use crate::edge::snapshot_metadata::SnapshotMetadataService;
use crate::edge::transfer::TransferService;
use crate::engine::Engine;
use crate::state::Driver;
use crate::transfer_api::transfer_server::TransferServer;
use shutdown::Stop;

/// Bind the socket: mode 0600, replacing a stale socket file only if nothing answers on it.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use by a running server; refusing to replace it",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
        tracing::info!(socket = %path.display(), "removed stale socket");
    }
    // umask-independent: create, then tighten before anyone is told we are ready.
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Serve until `shutdown` resolves; in-flight RPCs finish, then the socket file is removed.
/// A controller given node endpoints (or Kubernetes discovery) is a stateless router; every
/// other mode serves a local pool.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let multi = &args.multi;
    if multi.is_router() && args.mode != Mode::Controller {
        bail!("--nodes-from / --node-endpoints make a router: they need --mode controller");
    }
    if multi.is_router() && args.publish_pools.is_some() {
        bail!("--publish-pools publishes the pools this process serves; a router serves none");
    }
    if multi.pool_listen.is_some() && args.mode != Mode::Node {
        bail!("--pool-listen serves a node's pool to the router: it needs --mode node");
    }
    if (multi.is_router() || multi.pool_listen.is_some()) && multi.tls().is_none() {
        bail!("the pool API is mTLS only: give --tls-cert, --tls-key and --tls-ca");
    }
    // Before the pool is opened (and its directory created): a second `serve` on a busy socket
    // must change nothing. `bind` checks again, for a server that starts in between.
    let socket = socket_path(&args.endpoint)?;
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        bail!(
            "{} is in use by a running server; stop it first, or give another --endpoint",
            socket.display()
        );
    }
    // One shutdown signal fans out to every listener, with one time budget for the stop.
    let stop = Stop::new(
        shutdown,
        std::time::Duration::from_secs(args.shutdown_timeout),
    );
    let result = if multi.is_router() {
        serve_router(&args, &stop).await
    } else {
        serve_pool(&args, &stop).await
    };
    // Last: the issue 27 log said "stopped" while the pool API still waited for a call.
    tracing::info!("loopvol stopped");
    result
}

/// Bind the unix socket and serve `routes` on it until `stop`, draining in-flight calls for
/// at most its drain budget. `pool_dir` is the pool served (none for a router), for the
/// start-up hint.
async fn serve_socket(
    endpoint: &str,
    pool_dir: Option<&Path>,
    routes: tonic::service::Routes,
    stop: &Stop,
) -> anyhow::Result<()> {
    let path = socket_path(endpoint)?;
    let listener = bind(&path)?;
    tracing::info!(socket = %path.display(), "{}", hint::next_steps(&path, pool_dir));
    tracing::info!(socket = %path.display(), "listening");
    let server = tonic::transport::Server::builder()
        .layer(crate::metrics::rpc_layer::RpcMetricsLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener)
                .map(|conn| conn.map(crate::server::unix_authority::AuthorityFix::new)),
            stop.signal(),
        );
    let result = stop.bounded("CSI socket", server).await;
    let _ = std::fs::remove_file(&path);
    result.context("gRPC server")
}

async fn serve_router(args: &ServeArgs, stop: &Stop) -> anyhow::Result<()> {
    let tls = args.multi.tls().expect("checked by serve").client()?;
    let dir = Arc::new(crate::multinode::router::NodeDirectory::new(tls));
    if let Some(spec) = &args.multi.node_endpoints {
        dir.set(crate::multinode::router::parse_endpoints(spec)?);
    }
    #[cfg(not(feature = "kubernetes"))]
    if args.multi.nodes_from.is_some() {
        bail!("this loopvol was built without the kubernetes feature: give --node-endpoints");
    }
    #[cfg(feature = "kubernetes")]
    if args.multi.nodes_from.is_some() {
        crate::multinode::discovery::watch(
            dir.clone(),
            args.multi.node_pod_namespace.clone(),
            args.multi.node_pod_selector.clone(),
            args.multi.node_pool_port,
        )
        .await?;
    }
    tracing::info!(nodes = ?dir.names(), "loopvol serving as a router");
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(IdentityServer::new(IdentityService::new(
            args.driver_name.clone(),
            args.mode,
            true,
            None,
        )))
        .add_service(ControllerServer::new(
            crate::multinode::router::Router::new(
                dir.clone(),
                Advertised::new(&args.advertise_capabilities),
            ),
        ))
        .add_service(GroupControllerServer::new(
            crate::multinode::group_router::GroupRouter::new(dir.clone()),
        ))
        .add_service(SnapshotMetadataServer::new(
            crate::multinode::snapshot_metadata_router::SnapshotMetadataRouter::new(dir),
        ));
    let metrics = crate::ops::metrics_http::Sources::without_pool();
    let _metrics = crate::ops::metrics_http::start_if(args.metrics_address, metrics).await?;
    serve_socket(&args.endpoint, None, routes.routes(), stop).await
}

/// Open the pool, then serve it on the socket (and to the router, with --pool-listen).
async fn serve_pool(args: &ServeArgs, stop: &Stop) -> anyhow::Result<()> {
    let node_id = args.pool.node_id();
    let pool_api = args.multi.pool_listen;
    let pools = {
        let (args, node_id) = (args.clone(), node_id.clone());
        tokio::task::spawn_blocking(move || pools::open(&args, &node_id)).await??
    };
    let pool = pools.default_pool();
    if args.max_concurrent_ops == 0 {
        bail!("--max-concurrent-ops must be at least 1");
    }
    let freeze = crate::fs::freeze::Settings {
        node_dir: pool.node_state_dir(),
        pool_dir: pool.dir().to_path_buf(),
        timeout: std::time::Duration::from_secs(args.freeze_timeout),
        hold: std::time::Duration::from_millis(args.test_freeze_hold_ms),
    };
    // Before anything is served: no filesystem stays frozen by a loopvol that was killed
    // (in any mode: whichever process took a snapshot may have been the one killed).
    for pool in pools.iter() {
        let image_of = {
            let pool_dir = pool.dir().to_path_buf();
            move |hex: &str| pool_dir.join("volumes").join(format!("{hex}.img"))
        };
        let node_dir = pool.node_state_dir();
        for line in
            tokio::task::spawn_blocking(move || crate::fs::freeze::recover(&node_dir, image_of))
                .await?
        {
            tracing::warn!(pool = %pool.name(), recovery = %line, "abandoned filesystem freeze cleared at start-up");
        }
    }
    let roots: Vec<PathBuf> = std::iter::once(args.kubelet_dir.clone())
        .chain(args.allowed_root.iter().cloned())
        .collect();
    if let Some(r) = roots.iter().find(|r| !r.is_absolute()) {
        bail!(
            "--kubelet-dir and --allowed-root take absolute paths, not {}",
            r.display()
        );
    }
    let paths = crate::engine::paths::Confinement::with_pools(roots, pools.iter().map(|p| p.dir()));
    let engine = Engine {
        pools,
        paths,
        cgroups: crate::engine::io_throttle::CgroupConfig {
            root: args.cgroup_root.clone(),
            default_cgroup: args.io_cgroup.clone(),
        },
        freeze,
        data_path: crate::datapath::default_path(),
    };
    let transfer = crate::state::TransferSettings {
        client_tls: match args.multi.tls() {
            Some(t) if pool_api.is_some() => Some(t.client()?),
            _ => None,
        },
        limit: Arc::new(provisioner::transfer::RateLimit::new(
            args.transfer_rate_limit,
        )),
        corrupt_chunk: args.test_corrupt_transfer_chunk,
        starting: Default::default(),
    };
    let driver = Arc::new(
        Driver::new(
            engine,
            args.driver_name.clone(),
            args.mode,
            args.max_volumes_per_node,
            Advertised::new(&args.advertise_capabilities),
            args.max_concurrent_ops,
        )
        .with_transfer(transfer),
    );
    if matches!(args.mode, Mode::Node | Mode::All) {
        // The attachment index is the node's, not a pool's: it lives with the default pool.
        driver
            .data_path
            .start(&driver.pools.default_pool().node_state_dir());
        let d = driver.clone();
        let report = tokio::task::spawn_blocking(move || crate::engine::recover(&d)).await?;
        for line in report {
            tracing::info!(recovery = %line, "node state at start-up");
        }
    }
    let identity = |controller: bool| {
        IdentityServer::new(IdentityService::new(
            args.driver_name.clone(),
            args.mode,
            controller,
            Some(driver.pools.default_pool().dir().to_path_buf()),
        ))
    };
    let pool_server = match pool_api {
        Some(addr) => {
            let tls = args.multi.tls().expect("checked by serve").server()?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind pool API on {addr}"))?;
            tracing::info!(address = %addr, "serving this node's pool to the router (mTLS)");
            let server = tonic::transport::Server::builder()
                .tls_config(tls)?
                .add_service(identity(true))
                .add_service(ControllerServer::new(ControllerService::for_pool_api(
                    driver.clone(),
                )))
                .add_service(GroupControllerServer::new(GroupControllerService::new(
                    driver.clone(),
                )))
                .add_service(SnapshotMetadataServer::new(SnapshotMetadataService::new(
                    driver.clone(),
                )))
                // Other nodes pull restore and clone data here (never on the CSI socket).
                .add_service(
                    TransferServer::new(TransferService::new(driver.clone()))
                        .max_encoding_message_size(8 << 20),
                )
                // TCP_NODELAY, which tonic sets only on listeners it binds itself: with Nagle
                // on, a transfer stream's last segments waited for the sink's delayed ACK, and
                // a cross-node copy spent a third of its time in 40 ms stalls.
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stop.signal(),
                );
            // Transfers a killed process left: resumed from scratch, or dropped.
            crate::edge::transfer::sink::resume_pending(&driver);
            let stop = stop.clone();
            Some(tokio::spawn(async move {
                stop.bounded("pool API", server).await
            }))
        }
        None => None,
    };
    let mut routes = tonic::service::Routes::builder();
    routes.add_service(identity(matches!(args.mode, Mode::Controller | Mode::All)));
    if matches!(args.mode, Mode::Controller | Mode::All) {
        routes.add_service(ControllerServer::new(ControllerService::new(
            driver.clone(),
        )));
        routes.add_service(GroupControllerServer::new(GroupControllerService::new(
            driver.clone(),
        )));
        // The external-snapshot-metadata sidecar shares the controller's socket.
        routes.add_service(SnapshotMetadataServer::new(SnapshotMetadataService::new(
            driver.clone(),
        )));
    }
    if matches!(args.mode, Mode::Node | Mode::All) {
        routes.add_service(NodeServer::new(NodeService::new(driver.clone())));
    }
    let metrics = crate::ops::metrics_http::Sources::for_driver(driver.clone());
    let _metrics = crate::ops::metrics_http::start_if(args.metrics_address, metrics).await?;
    let publisher = publish_pools(args, &driver).await?;
    tracing::info!(
        mode = ?args.mode,
        node_id = %node_id,
        pool = %driver.pools.default_pool().dir().display(),
        pools = ?driver.pools.names(),
        allowed_roots = ?driver.paths.roots(),
        volumes = driver.pools.iter().map(|p| p.len()).sum::<usize>(),
        "loopvol serving"
    );
    let result = serve_socket(
        &args.endpoint,
        Some(&args.pool.pool_dir),
        routes.routes(),
        stop,
    )
    .await;
    if let Some(h) = pool_server {
        h.await?.context("pool API server")?;
    }
    if let Some(h) = publisher {
        h.abort();
    }
    if matches!(args.mode, Mode::Node | Mode::All) {
        let state_dir = driver.pools.default_pool().node_state_dir();
        let data_path = driver.data_path;
        // Whatever the drain left of the budget: idle loop nodes removed before the exit.
        let wait = stop.remaining();
        tokio::task::spawn_blocking(move || data_path.stop(&state_dir, wait)).await?;
    }
    result
}

/// With --publish-pools: start keeping the LoopPool objects current (a task of its own; CSI
/// never waits for it).
async fn publish_pools(
    args: &ServeArgs,
    driver: &Arc<Driver>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(crate::cli::PublishPools::Kubernetes) = args.publish_pools else {
        return Ok(None);
    };
    #[cfg(not(feature = "kubernetes"))]
    {
        let _ = driver;
        bail!("this loopvol was built without the kubernetes feature: --publish-pools kubernetes needs it");
    }
    #[cfg(feature = "kubernetes")]
    {
        let pools = driver.pools.iter().cloned().collect();
        let serves_node = matches!(args.mode, Mode::Node | Mode::All);
        Ok(Some(
            crate::ops::looppool::start(driver.node_id(), pools, serves_node).await?,
        ))
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight requests"),
    }
}
