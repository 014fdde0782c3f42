//! The `--metrics-address` listener: `GET /metrics` (OpenMetrics text, which Prometheus
//! scrapes natively), `GET /healthz` and `GET /readyz`.
//!
//! Served with hyper's HTTP/1.1 server, already in the build through tonic, rather than a
//! hand-rolled responder: request parsing, keep-alive and malformed input are hyper's problem.
//! Both probes answer 200 when the pool is usable (the Identity Probe's check) and 503 with the
//! reason otherwise; a process without a pool has nothing that can become unusable.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::shared::Mode;
use crate::state::Driver;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A client that opens a connection and sends nothing is dropped after this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the endpoints report on.
#[derive(Clone)]
pub struct Sources {
    /// `None` in a process that serves no pool of its own.
    driver: Option<Arc<Driver>>,
}

impl Sources {
    pub fn for_driver(driver: Arc<Driver>) -> Self {
        Sources {
            driver: Some(driver),
        }
    }

    pub fn without_pool() -> Self {
        Sources { driver: None }
    }

    /// Blocking: measures the pool.
    fn exposition(&self) -> String {
        let samples: Vec<_> = self
            .driver
            .iter()
            .flat_map(|d| {
                let node = matches!(d.mode, Mode::Node | Mode::All);
                d.pools.iter().filter_map(move |p| {
                    crate::ops::pool_gauges::measure(p, node)
                        .inspect_err(|e| tracing::warn!(pool = %p.name(), error = %e, "pool gauges unavailable for this scrape"))
                        .ok()
                })
            })
            .collect();
        crate::metrics::encode(&samples)
    }

    /// Blocking: `Err(reason)` when the pool is not usable.
    fn health(&self) -> Result<(), String> {
        let Some(d) = &self.driver else {
            return Ok(());
        };
        match d
            .pools
            .iter()
            .find(|p| !crate::shared::pool_usable(p.dir()))
        {
            Some(p) => Err(format!(
                "pool directory {} is not usable\n",
                p.dir().display()
            )),
            None => Ok(()),
        }
    }
}

/// The running listener; dropping it stops serving.
pub struct MetricsServer {
    pub address: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind `addr` (port 0 picks a free port; the bound address is logged and returned) and serve
/// until the returned handle is dropped.
pub async fn start(addr: SocketAddr, sources: Sources) -> anyhow::Result<MetricsServer> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind the metrics address {addr}"))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "serving /metrics, /healthz and /readyz");
    let task = tokio::spawn(accept_loop(listener, Arc::new(sources)));
    Ok(MetricsServer { address, task })
}

/// [`start`] when `--metrics-address` was given.
pub async fn start_if(
    addr: Option<SocketAddr>,
    sources: Sources,
) -> anyhow::Result<Option<MetricsServer>> {
    match addr {
        Some(addr) => start(addr, sources).await.map(Some),
        None => Ok(None),
    }
}

async fn accept_loop(listener: TcpListener, sources: Arc<Sources>) {
    // Connections live in the set, so stopping the server (aborting this task) closes them too.
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let sources = sources.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| handle(req, sources.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    sources: Arc<Sources>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".into(),
        ));
    }
    if req.method() != Method::GET {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ));
    }
    let resp = if path == "/metrics" {
        match tokio::task::spawn_blocking(move || sources.exposition()).await {
            Ok(text) => reply(StatusCode::OK, OPENMETRICS, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        }
    } else {
        match tokio::task::spawn_blocking(move || sources.health()).await {
            Ok(Ok(())) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            Ok(Err(why)) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{e}\n"),
            ),
        }
    };
    Ok(resp)
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}
