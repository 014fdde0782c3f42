//! The CSI v1 API generated from `proto/csi.proto`.
#![allow(clippy::all, missing_docs)]
tonic::include_proto!("csi.v1");
