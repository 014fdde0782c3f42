//! A tower layer on the gRPC server that counts and times every RPC by method and status code.
//!
//! Where the code is: every CSI RPC is unary, and for a unary call tonic answers an error as a
//! *trailers-only* response, with `grpc-status` in the response headers; a success carries
//! `grpc-status: 0` in the trailers after the one message. So a response whose headers have no
//! `grpc-status` is OK, and the latency to the response headers is the handler's whole time
//! (the message is already encoded by then). Reading headers only avoids wrapping the response
//! body. A call the client abandons before it is answered is counted as CANCELLED.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tonic::Code;
use tower::{Layer, Service};

/// Add with `Server::builder().layer(RpcMetricsLayer)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let mut pending = Pending {
            method: method_of(req.uri().path()),
            started: Instant::now(),
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => status_of(r.headers()),
                Err(_) => Code::Unknown,
            };
            pending.finish(code);
            res
        })
    }
}

/// Records the call exactly once: when it is answered, or as CANCELLED when it is dropped first.
struct Pending {
    method: &'static str,
    started: Instant,
    done: bool,
}

impl Pending {
    fn finish(&mut self, code: Code) {
        self.done = true;
        super::observe_rpc(self.method, code, self.started.elapsed());
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Code::Cancelled);
        }
    }
}

/// The code of a trailers-only (error) response; OK when the headers carry none (see above).
fn status_of(headers: &http::HeaderMap) -> Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// The CSI method named by a gRPC path (`/csi.v1.Node/NodeStageVolume` → `NodeStageVolume`).
/// Anything else is `"unknown"`, so a client cannot create label values at will.
fn method_of(path: &str) -> &'static str {
    let Some((service, method)) = path
        .strip_prefix("/csi.v1.")
        .and_then(|p| p.split_once('/'))
    else {
        return "unknown";
    };
    if !matches!(
        service,
        "Identity" | "Controller" | "Node" | "GroupController" | "SnapshotMetadata"
    ) {
        return "unknown";
    }
    CSI_METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("unknown")
}

/// Every RPC of CSI v1.13 (`proto/csi.proto`; a test keeps the two in step).
const CSI_METHODS: &[&str] = &[
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "ControllerListVolumeHealth",
    "ControllerGetVolumeHealth",
    "GetCapacity",
    "ControllerGetCapabilities",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "GetSnapshot",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "ControllerModifyVolume",
    "GroupControllerGetCapabilities",
    "CreateVolumeGroupSnapshot",
    "DeleteVolumeGroupSnapshot",
    "GetVolumeGroupSnapshot",
    "GetMetadataAllocated",
    "GetMetadataDelta",
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeGetVolumeHealth",
    "NodeGetStorageHealth",
    "NodeExpandVolume",
    "NodeGetCapabilities",
    "NodeGetInfo",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_match_the_proto() {
        let proto = include_str!("../../../proto/csi.proto");
        let in_proto: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split([' ', '(']).next())
            .collect();
        assert_eq!(in_proto.len(), CSI_METHODS.len(), "{in_proto:?}");
        for m in in_proto {
            assert!(CSI_METHODS.contains(&m), "{m} is missing from CSI_METHODS");
        }
    }

    #[test]
    fn paths_and_codes() {
        assert_eq!(method_of("/csi.v1.Node/NodeStageVolume"), "NodeStageVolume");
        assert_eq!(method_of("/csi.v1.Controller/Nope"), "unknown");
        assert_eq!(method_of("/other.Svc/Probe"), "unknown");
        let mut h = http::HeaderMap::new();
        assert_eq!(status_of(&h), Code::Ok);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(status_of(&h), Code::NotFound);
    }
}
