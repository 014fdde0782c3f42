//! SnapshotMetadata in router mode: each stream is forwarded to the node named in the snapshot
//! ID and passed back message by message, unchanged, so a long delta is never buffered here.

use std::sync::Arc;

use provisioner::ids::Kind;
use provisioner::VolumeId;
use tonic::{Request, Response, Status};

use crate::csi::snapshot_metadata_client::SnapshotMetadataClient;
use crate::csi::snapshot_metadata_server::SnapshotMetadata;
use crate::csi::*;
use crate::edge::snapshot_metadata::MetadataStream;
use crate::multinode::router::NodeDirectory;

pub struct SnapshotMetadataRouter {
    dir: Arc<NodeDirectory>,
}

impl SnapshotMetadataRouter {
    pub fn new(dir: Arc<NodeDirectory>) -> Self {
        Self { dir }
    }
}

/// The node owning snapshot `id`: INVALID_ARGUMENT when missing, NOT_FOUND when it is not a
/// loopvol snapshot ID (no node could hold it).
fn owner(field: &str, id: &str) -> Result<String, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    VolumeId::parse(Kind::Snapshot, id)
        .map(|v| v.node)
        .ok_or_else(|| Status::not_found(format!("{id} is not a loopvol snapshot")))
}

#[tonic::async_trait]
impl SnapshotMetadata for SnapshotMetadataRouter {
    type GetMetadataAllocatedStream = MetadataStream<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = MetadataStream<GetMetadataDeltaResponse>;

    #[tracing::instrument(skip_all, name = "GetMetadataAllocated", fields(snapshot_id = %req.get_ref().snapshot_id))]
    async fn get_metadata_allocated(
        &self,
        req: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let node = owner("snapshot_id", &req.get_ref().snapshot_id)?;
        let mut client = SnapshotMetadataClient::new(self.dir.channel(&node)?);
        let stream = client
            .get_metadata_allocated(req.into_inner())
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, name = "GetMetadataDelta", fields(
        base = %req.get_ref().base_snapshot_id, target = %req.get_ref().target_snapshot_id))]
    async fn get_metadata_delta(
        &self,
        req: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = req.get_ref();
        let base = owner("base_snapshot_id", &r.base_snapshot_id)?;
        let target = owner("target_snapshot_id", &r.target_snapshot_id)?;
        if base != target {
            return Err(Status::failed_precondition(format!(
                "base snapshot {} is on node {base} and target {} on node {target}: \
                 snapshots of one volume live on one node, so these are not comparable",
                r.base_snapshot_id, r.target_snapshot_id
            )));
        }
        let mut client = SnapshotMetadataClient::new(self.dir.channel(&target)?);
        let stream = client
            .get_metadata_delta(req.into_inner())
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }
}
