//! CSI Node: the gRPC edge. Requests are validated here (INVALID_ARGUMENT before anything is
//! touched), then the blocking work in `node_ops` runs on a worker thread.

use std::sync::Arc;
use tonic::{Request, Response, Status};

use crate::csi::node_server::Node;
use crate::csi::node_service_capability::{Rpc, Type as CapType};
use crate::csi::*;
use crate::edge::capability::{self, Access};
use crate::engine::io_throttle;
use crate::engine::{self, check_path};
use crate::error::{required, Error};
use crate::state::Driver;

pub struct NodeService {
    driver: Arc<Driver>,
}

impl NodeService {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }

    /// A staging or target path: well-formed, inside an allowed root, not the pool, no
    /// symlink on the way (see `paths`).
    fn confined(&self, field: &str, s: &str) -> Result<std::path::PathBuf, Error> {
        let p = check_path(field, s)?;
        self.driver.paths.check(field, &p)?;
        Ok(p)
    }
}

fn capability_of(cap: Option<&VolumeCapability>) -> Result<capability::Checked, Error> {
    capability::check(
        cap.ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?,
    )
}

#[tonic::async_trait]
impl Node for NodeService {
    #[tracing::instrument(skip_all, name = "NodeStageVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required("volume_id", &req.volume_id)?.to_string();
        let staging = self.confined("staging_target_path", &req.staging_target_path)?;
        let cap = capability_of(req.volume_capability.as_ref())?;
        let mut secrets = req.secrets;
        // Taken out into a buffer wiped on drop; the rest of the Secret is dropped unread.
        let key = secrets
            .remove(engine::encryption::SECRET_ENTRY)
            .map(zeroize::Zeroizing::new);
        for v in secrets.values_mut() {
            zeroize::Zeroize::zeroize(v);
        }
        self.driver
            .blocking(move |d| {
                engine::stage(d, &id, &staging, &cap, &key)?;
                // Pods still holding rules for this volume (a re-stage after its device went
                // away) get them moved to the device it has now.
                io_throttle::reapply(d, &id, || engine::attached_device(d, &id)).map(drop)
            })
            .await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, name = "NodeUnstageVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required("volume_id", &req.volume_id)?.to_string();
        let staging = self.confined("staging_target_path", &req.staging_target_path)?;
        self.driver
            .blocking(move |d| engine::unstage(d, &id, &staging))
            .await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, name = "NodePublishVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required("volume_id", &req.volume_id)?.to_string();
        let target = self.confined("target_path", &req.target_path)?;
        let cap = capability_of(req.volume_capability.as_ref())?;
        if req.staging_target_path.is_empty() {
            return Err(Error::FailedPrecondition(
                "staging_target_path is required: loopvol stages volumes (STAGE_UNSTAGE_VOLUME)"
                    .into(),
            )
            .into());
        }
        let staging = self.confined("staging_target_path", &req.staging_target_path)?;
        let readonly = req.readonly;
        let pod_uid = req.volume_context.get(io_throttle::POD_UID_KEY).cloned();
        self.driver
            .blocking(move |d| {
                let cgroup = io_throttle::before_publish(d, &id, pod_uid.as_deref())?;
                engine::publish(d, &id, &staging, &target, &cap, readonly)?;
                // The rules go to the device the volume is attached to now; if they cannot be
                // written, the pod must not run unlimited: undo the publish.
                let applied = engine::attached_device(d, &id)?
                    .ok_or_else(|| Error::Internal(format!("volume {id} lost its device")))
                    .and_then(|dev| io_throttle::after_publish(d, &id, &target, cgroup, &dev));
                if let Err(e) = applied {
                    if let Err(undo) = engine::unpublish(d, &id, &target) {
                        tracing::error!(error = %undo, "could not undo a publish whose IO limits failed");
                    }
                    return Err(e);
                }
                Ok(())
            })
            .await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, name = "NodeUnpublishVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required("volume_id", &req.volume_id)?.to_string();
        let target = self.confined("target_path", &req.target_path)?;
        self.driver
            .blocking(move |d| {
                engine::unpublish(d, &id, &target)?;
                io_throttle::after_unpublish(d, &id, &target)
            })
            .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, name = "NodeGetVolumeStats", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        let id = required("volume_id", &req.volume_id)?.to_string();
        let path = required("volume_path", &req.volume_path)?.to_string();
        let usage = self
            .driver
            .blocking(move |d| engine::stats(d, &id, &path))
            .await?;
        Ok(Response::new(NodeGetVolumeStatsResponse { usage }))
    }

    #[tracing::instrument(skip_all, name = "NodeGetVolumeHealth", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn node_get_volume_health(
        &self,
        req: Request<NodeGetVolumeHealthRequest>,
    ) -> Result<Response<NodeGetVolumeHealthResponse>, Status> {
        let id = required("volume_id", &req.get_ref().volume_id)?.to_string();
        let health = self
            .driver
            .blocking(move |d| engine::volume_health(d, &id))
            .await?;
        Ok(Response::new(NodeGetVolumeHealthResponse {
            volume_health: Some(health),
        }))
    }

    #[tracing::instrument(skip_all, name = "NodeGetStorageHealth")]
    async fn node_get_storage_health(
        &self,
        _req: Request<NodeGetStorageHealthRequest>,
    ) -> Result<Response<NodeGetStorageHealthResponse>, Status> {
        use node_get_storage_health_response::StorageBackendHealth;
        let findings = self
            .driver
            .blocking(|d| {
                let mut out = Vec::new();
                if let Some((reason, message)) = d.data_path.missing() {
                    out.push(StorageBackendHealth {
                        status: StorageHealthErrorType::StorageUnreachable as i32,
                        reason: reason.into(),
                        message,
                        volume_capability: None,
                    });
                }
                for pool in d.pools.iter() {
                    match pool.capacity() {
                        Ok(c) if c.available_bytes < (1 << 20) => out.push(StorageBackendHealth {
                            status: StorageHealthErrorType::StorageDegraded as i32,
                            reason: "PoolFull".into(),
                            message: format!(
                                "pool {} filesystem under {} is full",
                                pool.name(),
                                pool.dir().display()
                            ),
                            volume_capability: None,
                        }),
                        Ok(_) => {}
                        Err(e) => out.push(StorageBackendHealth {
                            status: StorageHealthErrorType::StorageUnreachable as i32,
                            reason: "PoolUnusable".into(),
                            message: format!("pool {}: {e}", pool.name()),
                            volume_capability: None,
                        }),
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(Response::new(NodeGetStorageHealthResponse {
            backend_health: findings,
        }))
    }

    #[tracing::instrument(skip_all, name = "NodeExpandVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required("volume_id", &req.volume_id)?.to_string();
        let path = required("volume_path", &req.volume_path)?.to_string();
        let block = match req.volume_capability.as_ref() {
            Some(c) => matches!(capability::check(c)?.access, Access::Block),
            None => false,
        };
        let size = self
            .driver
            .blocking(move |d| engine::expand(d, &id, &path, block))
            .await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    #[tracing::instrument(skip_all, name = "NodeGetCapabilities")]
    async fn node_get_capabilities(
        &self,
        _req: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = self
            .driver
            .advertised
            .node()
            .into_iter()
            .map(|t| NodeServiceCapability {
                r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    #[tracing::instrument(skip_all, name = "NodeGetInfo")]
    async fn node_get_info(
        &self,
        _req: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.driver.node_id().to_string(),
            max_volumes_per_node: self.driver.max_volumes_per_node,
            accessible_topology: Some(crate::edge::controller::topology(self.driver.node_id())),
        }))
    }
}
