//! The router's Controller service. An RPC about one existing volume goes, unchanged, to the
//! node that owns the volume: that forwarding is written once, in `router_service!`, and each
//! such RPC is one line of its `to_owner` list. The rest need a choice (where a new volume
//! goes, which node a snapshot is on) or a merge (lists and capacity across nodes).

use tonic::{Request, Response, Status};

use super::Router;
use crate::csi::controller_server::Controller;
use crate::csi::*;
use crate::edge::controller::capabilities;
use crate::edge::transfer::SOURCE_ENDPOINT_PARAM;
use crate::error::Error;
use crate::TOPOLOGY_KEY;
use provisioner::ids::Kind;
use provisioner::VolumeId;

/// `impl Controller for Router`: the `to_owner` RPCs forwarded to the node owning the volume
/// named by their field (INVALID_ARGUMENT when it is empty, NOT_FOUND when it is no loopvol
/// ID), then the RPCs written out by hand.
macro_rules! router_service {
    (
        to_owner {
            $( $rpc:ident($req:ident) -> $resp:ident, by $field:ident, span $span:literal; )*
        }
        $($by_hand:tt)*
    ) => {
        #[tonic::async_trait]
        impl Controller for Router {
            $(
                #[tracing::instrument(skip_all, name = $span,
                    fields($field = %crate::shared::logsafe::text(&req.get_ref().$field)))]
                async fn $rpc(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                    let r = req.into_inner();
                    self.volume_owner(stringify!($field), &r.$field).await?.$rpc(r).await
                }
            )*
            $($by_hand)*
        }
    };
}

router_service! {
    to_owner {
        validate_volume_capabilities(ValidateVolumeCapabilitiesRequest)
            -> ValidateVolumeCapabilitiesResponse, by volume_id, span "ValidateVolumeCapabilities";
        controller_get_volume_health(ControllerGetVolumeHealthRequest)
            -> ControllerGetVolumeHealthResponse, by volume_id, span "ControllerGetVolumeHealth";
        controller_expand_volume(ControllerExpandVolumeRequest)
            -> ControllerExpandVolumeResponse, by volume_id, span "ControllerExpandVolume";
        controller_get_volume(ControllerGetVolumeRequest)
            -> ControllerGetVolumeResponse, by volume_id, span "ControllerGetVolume";
        controller_modify_volume(ControllerModifyVolumeRequest)
            -> ControllerModifyVolumeResponse, by volume_id, span "ControllerModifyVolume";
    }
    #[tracing::instrument(skip_all, name = "CreateVolume", fields(volume_name = %crate::shared::logsafe::text(&req.get_ref().name)))]
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let mut req = req.into_inner();
        crate::error::required("name", &req.name)?;
        // Only the router sets the transfer endpoint; a StorageClass never can.
        if req.parameters.contains_key(SOURCE_ENDPOINT_PARAM) {
            return Err(Error::InvalidArgument(format!(
                "parameter {SOURCE_ENDPOINT_PARAM} is reserved for loopvol's router"
            ))
            .into());
        }
        let (node, source_node) = self.place(&req).await?;
        let mut client = self.node(&node).await?;
        match source_node.filter(|s| *s != node) {
            Some(src) => {
                // The target pulls the data from the source's node: tell it where that is.
                let endpoint = self.source_endpoint(&src).await?;
                tracing::info!(node = %node, source_node = %src, "routing CreateVolume: a copy across nodes");
                req.parameters
                    .insert(SOURCE_ENDPOINT_PARAM.to_string(), endpoint);
            }
            None => tracing::info!(node = %node, "routing CreateVolume"),
        }
        client.create_volume(req).await
    }

    #[tracing::instrument(skip_all, name = "DeleteVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::error::required("volume_id", &r.volume_id)?;
        match self.for_volume(&r.volume_id).await {
            Some(c) => c?.delete_volume(r).await,
            None => Ok(Response::new(DeleteVolumeResponse {})),
        }
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Error::Unimplemented("loopvol has no attach step".into()).into())
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Error::Unimplemented("loopvol has no attach step".into()).into())
    }


    #[tracing::instrument(skip_all, name = "ListVolumes")]
    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let (entries, next_token) = self
            .merged_page(
                r.max_entries,
                &r.starting_token,
                |mut c, max_entries, starting_token| async move {
                    let resp = c
                        .list_volumes(ListVolumesRequest {
                            max_entries,
                            starting_token,
                        })
                        .await?
                        .into_inner();
                    Ok((resp.entries, resp.next_token))
                },
            )
            .await?;
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    #[tracing::instrument(skip_all, name = "ControllerListVolumeHealth")]
    async fn controller_list_volume_health(
        &self,
        req: Request<ControllerListVolumeHealthRequest>,
    ) -> Result<Response<ControllerListVolumeHealthResponse>, Status> {
        let r = req.into_inner();
        let (entries, next_token) = self
            .merged_page(
                r.max_entries,
                &r.starting_token,
                |mut c, max_entries, starting_token| async move {
                    let resp = c
                        .controller_list_volume_health(ControllerListVolumeHealthRequest {
                            max_entries,
                            starting_token,
                            secrets: Default::default(),
                        })
                        .await?
                        .into_inner();
                    Ok((resp.entries, resp.next_token))
                },
            )
            .await?;
        Ok(Response::new(ControllerListVolumeHealthResponse {
            entries,
            next_token,
        }))
    }


    #[tracing::instrument(skip_all, name = "GetCapacity")]
    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let r = req.into_inner();
        if let Some(node) = r
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(TOPOLOGY_KEY))
        {
            // A node whose plugin the router does not know (yet), or that is restarting, is
            // UNAVAILABLE, never 0: csi-provisioner would publish a capacity of 0 for it and
            // the scheduler would stop placing volumes there. The sidecar retries.
            return self.node(node).await?.get_capacity(r).await;
        }
        // No segment: what the whole cluster offers; the largest single volume is one node's.
        // A node that cannot answer makes the total unknown, not smaller.
        let (mut total, mut largest) = (0i64, 0i64);
        for node in self.names().await? {
            let resp = self.dir.client(&node)?.get_capacity(r.clone()).await?;
            let resp = resp.into_inner();
            total = total.saturating_add(resp.available_capacity);
            largest = largest.max(resp.maximum_volume_size.unwrap_or(resp.available_capacity));
        }
        Ok(Response::new(GetCapacityResponse {
            available_capacity: total,
            maximum_volume_size: Some(largest),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities(&self.advertised)))
    }

    #[tracing::instrument(skip_all, name = "CreateSnapshot", fields(source = %crate::shared::logsafe::text(&req.get_ref().source_volume_id)))]
    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        crate::error::required("name", &r.name)?;
        self.volume_owner("source_volume_id", &r.source_volume_id)
            .await?
            .create_snapshot(r)
            .await
    }

    #[tracing::instrument(skip_all, name = "DeleteSnapshot", fields(snapshot_id = %crate::shared::logsafe::text(&req.get_ref().snapshot_id)))]
    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        crate::error::required("snapshot_id", &r.snapshot_id)?;
        match self.for_snapshot(&r.snapshot_id).await {
            Some(c) => c?.delete_snapshot(r).await,
            None => Ok(Response::new(DeleteSnapshotResponse {})),
        }
    }

    #[tracing::instrument(skip_all, name = "ListSnapshots")]
    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        // A filter pins the answer to one node.
        let pinned = if !r.snapshot_id.is_empty() {
            Some(VolumeId::parse(Kind::Snapshot, &r.snapshot_id).map(|v| v.node))
        } else if !r.source_volume_id.is_empty() {
            Some(VolumeId::parse(Kind::Volume, &r.source_volume_id).map(|v| v.node))
        } else {
            None
        };
        match pinned {
            Some(None) => return Ok(Response::new(ListSnapshotsResponse::default())),
            Some(Some(node)) => return self.node(&node).await?.list_snapshots(r).await,
            None => {}
        }
        let (entries, next_token) = self
            .merged_page(
                r.max_entries,
                &r.starting_token,
                |mut c, max_entries, starting_token| async move {
                    let resp = c
                        .list_snapshots(ListSnapshotsRequest {
                            max_entries,
                            starting_token,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    Ok((resp.entries, resp.next_token))
                },
            )
            .await?;
        Ok(Response::new(ListSnapshotsResponse {
            entries,
            next_token,
        }))
    }

    #[tracing::instrument(skip_all, name = "GetSnapshot", fields(snapshot_id = %crate::shared::logsafe::text(&req.get_ref().snapshot_id)))]
    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        match self.for_snapshot(&r.snapshot_id).await {
            Some(c) => c?.get_snapshot(r).await,
            None => {
                crate::error::required("snapshot_id", &r.snapshot_id)?;
                Err(Error::NotFound(format!(
                    "snapshot {} is not a loopvol snapshot",
                    r.snapshot_id
                ))
                .into())
            }
        }
    }
}
