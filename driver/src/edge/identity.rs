//! CSI Identity: who we are, what we offer, whether we are ready.

use std::path::PathBuf;
use tonic::{Request, Response, Status};

use crate::csi::identity_server::Identity;
use crate::csi::plugin_capability::{self, service, volume_expansion};
use crate::csi::*;
use crate::shared::{pool_usable, Mode};

/// Identity needs no pool: a router serves it too.
pub struct IdentityService {
    driver_name: String,
    mode: Mode,
    /// Whether this endpoint serves the Controller service.
    controller: bool,
    /// The pool whose health Probe reports; `None` for the router, which has no pool.
    pool_dir: Option<PathBuf>,
}

impl IdentityService {
    pub fn new(
        driver_name: String,
        mode: Mode,
        controller: bool,
        pool_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            driver_name,
            mode,
            controller,
            pool_dir,
        }
    }
}

fn service_cap(t: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    #[tracing::instrument(skip_all, name = "GetPluginInfo")]
    async fn get_plugin_info(
        &self,
        _req: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: [(
                "mode".to_string(),
                format!("{:?}", self.mode).to_lowercase(),
            )]
            .into(),
        }))
    }

    #[tracing::instrument(skip_all, name = "GetPluginCapabilities")]
    async fn get_plugin_capabilities(
        &self,
        _req: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = vec![service_cap(service::Type::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.push(service_cap(service::Type::ControllerService));
            // Served wherever the Controller is (the sidecar shares the controller's socket);
            // csi-test v5.4 names this value, so it is advertised by default.
            capabilities.push(service_cap(service::Type::SnapshotMetadataService));
            // Group snapshots (spec v1.11, named by csi-test v5.4), wherever the Controller is.
            capabilities.push(service_cap(service::Type::GroupControllerService));
        }
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                },
            )),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    #[tracing::instrument(skip_all, name = "Probe")]
    async fn probe(&self, _req: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        if let Some(dir) = self.pool_dir.clone() {
            let check = dir.clone();
            let ready = tokio::task::spawn_blocking(move || pool_usable(&check))
                .await
                .unwrap_or(false);
            if !ready {
                return Err(Status::failed_precondition(format!(
                    "pool directory {} is not usable",
                    dir.display()
                )));
            }
        }
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
