//! GroupController in router mode: a group snapshot is forwarded to the one node whose pool
//! holds every member (read from the volume IDs, like the Controller router in router.rs).
//!
//! A group whose members live on different nodes is refused with FAILED_PRECONDITION: the
//! spec's CreateVolumeGroupSnapshot error table has exactly this row ("Cannot snapshot
//! multiple volumes together … the volumes are not configured properly based on requirements
//! from the SP"; the caller must fix the volumes' configuration). INVALID_ARGUMENT would say the
//! request is malformed, which it is not: each ID is valid, and the same request succeeds once
//! the volumes are placed on one node. Cross-node groups cannot be consistent here: there is no
//! way to freeze filesystems on two nodes at one instant without a distributed barrier.

use std::collections::BTreeSet;
use std::sync::Arc;

use provisioner::ids::Kind;
use provisioner::VolumeId;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::csi::group_controller_client::GroupControllerClient;
use crate::csi::group_controller_server::GroupController;
use crate::csi::*;
use crate::multinode::router::NodeDirectory;

pub struct GroupRouter {
    dir: Arc<NodeDirectory>,
}

impl GroupRouter {
    pub fn new(dir: Arc<NodeDirectory>) -> Self {
        GroupRouter { dir }
    }

    async fn node(&self, node: &str) -> Result<GroupControllerClient<Channel>, Status> {
        self.dir.wait_synced().await?;
        Ok(self.dir.channel(node).map(GroupControllerClient::new)?)
    }
}

/// The one node owning every volume of a group request.
pub fn owner_of(source_volume_ids: &[String]) -> Result<String, Status> {
    if source_volume_ids.is_empty() {
        return Err(Status::invalid_argument("source_volume_ids is required"));
    }
    let mut nodes = BTreeSet::new();
    for id in source_volume_ids {
        match VolumeId::parse(Kind::Volume, id) {
            Some(v) => {
                nodes.insert(v.node);
            }
            None => {
                return Err(Status::not_found(format!(
                    "volume {} is not a loopvol volume",
                    crate::shared::logsafe::text(id)
                )))
            }
        }
    }
    if nodes.len() > 1 {
        return Err(Status::failed_precondition(format!(
            "the volumes of a group snapshot must live on one node, and these live on nodes \
             {nodes:?}: loopvol volumes are node-local, and a crash-consistent group needs \
             every member frozen together on one node"
        )));
    }
    Ok(nodes.into_iter().next().expect("one node"))
}

#[tonic::async_trait]
impl GroupController for GroupRouter {
    async fn group_controller_get_capabilities(
        &self,
        _req: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(crate::edge::group_controller::capabilities()))
    }

    #[tracing::instrument(skip_all, name = "CreateVolumeGroupSnapshot", fields(group_name = %crate::shared::logsafe::text(&req.get_ref().name)))]
    async fn create_volume_group_snapshot(
        &self,
        req: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        let node = owner_of(&r.source_volume_ids)?;
        self.node(&node)
            .await?
            .create_volume_group_snapshot(r)
            .await
    }

    #[tracing::instrument(skip_all, name = "DeleteVolumeGroupSnapshot", fields(group_snapshot_id = %crate::shared::logsafe::text(&req.get_ref().group_snapshot_id)))]
    async fn delete_volume_group_snapshot(
        &self,
        req: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.group_snapshot_id.is_empty() {
            return Err(Status::invalid_argument("group_snapshot_id is required"));
        }
        match VolumeId::parse(Kind::Group, &r.group_snapshot_id) {
            Some(g) => {
                self.node(&g.node)
                    .await?
                    .delete_volume_group_snapshot(r)
                    .await
            }
            // Not an ID loopvol issued: nothing to delete, which is success for a delete.
            None => Ok(Response::new(DeleteVolumeGroupSnapshotResponse {})),
        }
    }

    #[tracing::instrument(skip_all, name = "GetVolumeGroupSnapshot", fields(group_snapshot_id = %crate::shared::logsafe::text(&req.get_ref().group_snapshot_id)))]
    async fn get_volume_group_snapshot(
        &self,
        req: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.group_snapshot_id.is_empty() {
            return Err(Status::invalid_argument("group_snapshot_id is required"));
        }
        match VolumeId::parse(Kind::Group, &r.group_snapshot_id) {
            Some(g) => self.node(&g.node).await?.get_volume_group_snapshot(r).await,
            None => Err(Status::not_found(format!(
                "group snapshot {} is not a loopvol group snapshot",
                crate::shared::logsafe::text(&r.group_snapshot_id)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_must_live_on_one_node() {
        let a = "vol-0123456789abcdef0123@n1".to_string();
        let b = "vol-0123456789abcdef0124@n1".to_string();
        let c = "vol-0123456789abcdef0125@n2".to_string();
        assert_eq!(owner_of(&[a.clone(), b.clone()]).unwrap(), "n1");
        let e = owner_of(&[a.clone(), c]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("one node"), "{e}");
        assert_eq!(
            owner_of(&[]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            owner_of(&[a, "nonsense".into()]).unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
}
