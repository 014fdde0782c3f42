//! loopvol's internal transfer API generated from `proto/transfer.proto`: how one node pulls
//! an image from another (served on the pool API only).
#![allow(clippy::all, missing_docs)]
tonic::include_proto!("loopvol.transfer.v1");
