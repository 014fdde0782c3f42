//! CSI Controller over the node's pools: provisioning, deletion, capacity, listing.

use std::collections::HashMap;
use std::sync::Arc;

use provisioner::ids::Kind;
use provisioner::params::VolumeParams;
use provisioner::pool::{CreateRequest, Quiesced};
use provisioner::record::SnapshotRecord;
use provisioner::record::VolumeRecord;
use provisioner::size::MAX_SIZE;
use provisioner::{PoolError, VolumeId};
use tonic::{Request, Response, Status};

use crate::csi::controller_server::Controller;
use crate::csi::controller_service_capability::{Rpc, Type as CapType};
use crate::csi::*;
use crate::edge::capability::{self, Access};
use crate::edge::content_source::{content_source, source_of};
use crate::edge::transfer;
use crate::engine;
use crate::engine::health;
use crate::engine::io_throttle;
use crate::error::{required, Error, Result};
use crate::shared::advertise::Advertised;
use crate::shared::tools;
use crate::state::Driver;
use crate::TOPOLOGY_KEY;
use provisioner::IoLimitsChange;

pub struct ControllerService {
    driver: Arc<Driver>,
    /// Serving the pool API (mTLS peers only): the router's reserved parameters are accepted.
    peer: bool,
}

impl ControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self {
            driver,
            peer: false,
        }
    }

    /// The service on the pool API, where only the router and other nodes call.
    pub fn for_pool_api(driver: Arc<Driver>) -> Self {
        Self { driver, peer: true }
    }
}

pub fn topology(node: &str) -> Topology {
    Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_string(), node.to_string())]),
    }
}

/// Does `t` name this node? Segments without our key do not constrain us.
fn topology_allows(t: &Topology, node: &str) -> bool {
    t.segments.get(TOPOLOGY_KEY).is_none_or(|n| n == node)
}

fn to_volume(r: &VolumeRecord) -> Volume {
    let node = VolumeId::parse(provisioner::ids::Kind::Volume, &r.id)
        .map(|v| v.node)
        .unwrap_or_default();
    Volume {
        capacity_bytes: r.size_bytes as i64,
        volume_id: r.id.clone(),
        // A raw block volume has no filesystem to name.
        volume_context: [
            (!r.block_only).then(|| ("fsType".to_string(), r.fs_type.to_string())),
            Some(("allocation".to_string(), r.allocation.as_str().to_string())),
        ]
        .into_iter()
        .flatten()
        .collect(),
        content_source: r.source.as_ref().map(content_source),
        accessible_topology: vec![topology(&node)],
    }
}

pub fn to_snapshot(s: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: (s.created_unix_nanos / 1_000_000_000) as i64,
            nanos: (s.created_unix_nanos % 1_000_000_000) as i32,
        }),
        ready_to_use: true,
        group_snapshot_id: s.group_snapshot_id.clone().unwrap_or_default(),
        accessible_topology: VolumeId::parse(Kind::Snapshot, &s.id)
            .map(|v| vec![topology(&v.node)])
            .unwrap_or_default(),
    }
}

/// The pool's quiesce hook: freeze a live source volume's filesystem while it is copied.
pub(crate) fn quiesce(d: &Driver, r: &VolumeRecord) -> Result<Box<dyn Quiesced>, PoolError> {
    match engine::quiesce(d, r).map_err(crate::error::to_pool_error)? {
        Some(frozen) => Ok(Box::new(frozen)),
        None => Ok(Box::new(())),
    }
}

/// Snapshot classes carry no loopvol parameters yet; refuse typos like StorageClasses do.
pub fn check_snapshot_parameters(parameters: &HashMap<String, String>) -> Result<()> {
    match parameters
        .keys()
        .find(|k| !k.starts_with("csi.storage.k8s.io/"))
    {
        Some(k) => Err(Error::InvalidArgument(format!(
            "unknown snapshot parameter {k:?}: loopvol snapshots take no parameters"
        ))),
        None => Ok(()),
    }
}

/// ControllerGetCapabilities' answer, shared with the router (which offers the same).
pub fn capabilities(advertised: &Advertised) -> ControllerGetCapabilitiesResponse {
    ControllerGetCapabilitiesResponse {
        capabilities: advertised
            .controller()
            .into_iter()
            .map(|t| ControllerServiceCapability {
                r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect(),
    }
}

/// Check paging arguments; the pools check the token (one we did not issue is ABORTED).
fn page_token(max_entries: i32, token: &str) -> Result<Option<&str>> {
    if max_entries < 0 {
        return Err(Error::InvalidArgument(
            "max_entries must not be negative".into(),
        ));
    }
    Ok((!token.is_empty()).then_some(token))
}

fn params_of(
    parameters: &HashMap<String, String>,
    caps: &[capability::Checked],
) -> Result<VolumeParams> {
    let cap_fs = capability::fs_type_of(caps)?;
    let cap_fs = cap_fs.map(|f| f.as_str());
    Ok(VolumeParams::parse(
        parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        cap_fs,
    )?)
}

#[tonic::async_trait]
impl Controller for ControllerService {
    #[tracing::instrument(skip_all, name = "CreateVolume", fields(volume_name = %crate::shared::logsafe::text(&req.get_ref().name), volume_id = tracing::field::Empty))]
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let mut req = req.into_inner();
        provisioner::validate_name(&req.name).map_err(Error::from)?;
        let endpoint = transfer::take_endpoint(&mut req.parameters, self.peer)?;
        let caps = capability::check_all(&req.volume_capabilities)?;
        let mut params = params_of(&req.parameters, &caps)?;
        // VolumeAttributesClass parameters at creation: IO limits only, and they override the
        // StorageClass's.
        let vac = IoLimitsChange::parse_mutable(
            req.mutable_parameters
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .map_err(Error::from)?;
        params.io_limits = params.io_limits.with(&vac);
        let source = req
            .volume_content_source
            .as_ref()
            .map(source_of)
            .transpose()?;
        if let Some(reqs) = &req.accessibility_requirements {
            let node = self.driver.node_id();
            if !reqs.requisite.is_empty()
                && !reqs.requisite.iter().any(|t| topology_allows(t, node))
            {
                return Err(Error::ResourceExhausted(format!(
                    "the requisite topologies exclude node {node}, the only node this pool serves"
                ))
                .into());
            }
        }
        let range = req.capacity_range.unwrap_or_default();
        let needs_filesystem = caps
            .iter()
            .any(|c| matches!(c.access, Access::Mount { .. }));
        // A blank mount volume is formatted at its first stage on this node; without the mkfs
        // that would fail only then, after the PVC was bound. Clones and restores bring theirs.
        if needs_filesystem && source.is_none() {
            tools::require(tools::mkfs_of(params.fs_type))?;
        }
        let pool = params.pool;
        let create = CreateRequest {
            name: req.name,
            required_bytes: range.required_bytes,
            limit_bytes: range.limit_bytes,
            params,
            needs_filesystem,
            source,
        };
        let record = match endpoint {
            // The source is on another node: a transfer fills the volume (edge/transfer/).
            Some(ep) => transfer::sink::create(&self.driver, pool.to_string(), create, ep).await?,
            None => {
                let local = move |d: &Driver| {
                    let quiesce = |r: &VolumeRecord| quiesce(d, r);
                    Ok(d.pools.create_volume(pool.as_str(), &create, &quiesce)?)
                };
                self.driver.blocking(local).await?
            }
        };
        tracing::Span::current().record("volume_id", record.id.as_str());
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(to_volume(&record)),
        }))
    }

    #[tracing::instrument(skip_all, name = "DeleteVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let id = required("volume_id", &req.get_ref().volume_id)?.to_string();
        transfer::sink::forget_start(&self.driver, &id);
        self.driver
            .blocking(move |d| Ok(d.pools.for_id(Kind::Volume, &id)?.delete_volume(&id)?))
            .await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, name = "ControllerPublishVolume", fields(volume_id = %crate::shared::logsafe::text(&_req.get_ref().volume_id)))]
    async fn controller_publish_volume(
        &self,
        _req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "loopvol has no attach step (PUBLISH_UNPUBLISH_VOLUME is not advertised)",
        ))
    }

    #[tracing::instrument(skip_all, name = "ControllerUnpublishVolume", fields(volume_id = %crate::shared::logsafe::text(&_req.get_ref().volume_id)))]
    async fn controller_unpublish_volume(
        &self,
        _req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "loopvol has no attach step (PUBLISH_UNPUBLISH_VOLUME is not advertised)",
        ))
    }

    #[tracing::instrument(skip_all, name = "ValidateVolumeCapabilities", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument("volume_capabilities is required".into()).into());
        }
        let record = self
            .driver
            .pools
            .get_volume(&req.volume_id)
            .map_err(Error::from)?;
        let verdict = capability::check_all(&req.volume_capabilities).and_then(|caps| {
            let p = params_of(&req.parameters, &caps)?;
            let needs_fs = caps
                .iter()
                .any(|c| matches!(c.access, Access::Mount { .. }));
            if needs_fs && p.fs_type != record.fs_type {
                return Err(Error::InvalidArgument(format!(
                    "volume holds {} but {} was asked for",
                    record.fs_type, p.fs_type
                )));
            }
            let pool = VolumeId::parse(Kind::Volume, &record.id).map(|v| v.pool_name().to_string());
            if !req.parameters.is_empty() && pool.as_deref() != Some(p.pool.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "volume is in pool {pool:?} but pool {} was asked for",
                    p.pool
                )));
            }
            if !req.parameters.is_empty() && p.allocation != record.allocation {
                return Err(Error::InvalidArgument(format!(
                    "volume is {} but {} was asked for",
                    record.allocation.as_str(),
                    p.allocation.as_str()
                )));
            }
            Ok(())
        });
        let resp = match verdict {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(e) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
        };
        Ok(Response::new(resp))
    }

    #[tracing::instrument(skip_all, name = "ListVolumes")]
    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = req.into_inner();
        let after = page_token(req.max_entries, &req.starting_token)?;
        let (page, next) = (self.driver.pools)
            .list_page(after, req.max_entries as usize)
            .map_err(Error::from)?;
        let entries = page
            .iter()
            .map(|r| list_volumes_response::Entry {
                volume: Some(to_volume(r)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: vec![],
                }),
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token: next.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all, name = "GetCapacity")]
    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = req.into_inner();
        let caps: Vec<_> = req
            .volume_capabilities
            .iter()
            .map(capability::check)
            .collect::<Result<_>>()?;
        let params = params_of(&req.parameters, &caps)?;
        let elsewhere = req
            .accessible_topology
            .as_ref()
            .is_some_and(|t| !topology_allows(t, self.driver.node_id()));
        // Per pool: the parameters name one, so CSIStorageCapacity is per StorageClass. A
        // pool this node lacks has nothing to offer here.
        let pool = self.driver.pools.get(params.pool.as_str()).cloned();
        let available = match pool {
            Some(pool) if !elsewhere => {
                let cap = self.driver.blocking(move |_| Ok(pool.capacity()?)).await?;
                cap.for_allocation(params.allocation)
            }
            _ => 0,
        };
        let available = available.min(i64::MAX as u64) as i64;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(available.min(MAX_SIZE as i64)),
            minimum_volume_size: None,
        }))
    }

    #[tracing::instrument(skip_all, name = "ControllerGetCapabilities")]
    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities(&self.driver.advertised)))
    }

    #[tracing::instrument(skip_all, name = "CreateSnapshot", fields(snapshot_name = %crate::shared::logsafe::text(&req.get_ref().name), volume_id = %crate::shared::logsafe::text(&req.get_ref().source_volume_id)))]
    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        let source = required("source_volume_id", &req.source_volume_id)?.to_string();
        provisioner::validate_name(&req.name).map_err(Error::from)?;
        check_snapshot_parameters(&req.parameters)?;
        let name = req.name;
        let snap = self
            .driver
            .blocking(move |d| {
                Ok(d.pools
                    .create_snapshot(&name, &source, &|r| quiesce(d, r))?)
            })
            .await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(to_snapshot(&snap)),
        }))
    }

    #[tracing::instrument(skip_all, name = "DeleteSnapshot", fields(snapshot_id = %crate::shared::logsafe::text(&req.get_ref().snapshot_id)))]
    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let id = required("snapshot_id", &req.get_ref().snapshot_id)?.to_string();
        self.driver
            .blocking(move |d| Ok(d.pools.for_id(Kind::Snapshot, &id)?.delete_snapshot(&id)?))
            .await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    #[tracing::instrument(skip_all, name = "ListSnapshots")]
    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = req.into_inner();
        let after = page_token(req.max_entries, &req.starting_token)?;
        let entry = |s: &SnapshotRecord| list_snapshots_response::Entry {
            snapshot: Some(to_snapshot(s)),
        };
        // A filter naming something that does not exist yields an empty list, not an error.
        if !req.snapshot_id.is_empty() {
            let found = self.driver.pools.get_snapshot(&req.snapshot_id).ok();
            let entries = found
                .filter(|s| {
                    req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id
                })
                .map(|s| vec![entry(&s)])
                .unwrap_or_default();
            return Ok(Response::new(ListSnapshotsResponse {
                entries,
                next_token: String::new(),
            }));
        }
        let source = (!req.source_volume_id.is_empty()).then_some(req.source_volume_id.as_str());
        let (page, next) = (self.driver.pools)
            .list_snapshots(source, after, req.max_entries as usize)
            .map_err(Error::from)?;
        Ok(Response::new(ListSnapshotsResponse {
            entries: page.iter().map(entry).collect(),
            next_token: next.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all, name = "GetSnapshot", fields(snapshot_id = %crate::shared::logsafe::text(&req.get_ref().snapshot_id)))]
    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let id = required("snapshot_id", &req.get_ref().snapshot_id)?;
        let snap = self.driver.pools.get_snapshot(id).map_err(Error::from)?;
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(to_snapshot(&snap)),
        }))
    }

    #[tracing::instrument(skip_all, name = "ControllerGetVolumeHealth", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn controller_get_volume_health(
        &self,
        req: Request<ControllerGetVolumeHealthRequest>,
    ) -> Result<Response<ControllerGetVolumeHealthResponse>, Status> {
        let id = required("volume_id", &req.get_ref().volume_id)?;
        let record = self.driver.pools.get_volume(id).map_err(Error::from)?;
        Ok(Response::new(ControllerGetVolumeHealthResponse {
            volume_health: Some(health::of_volume(&self.driver.pools, &record)),
        }))
    }

    #[tracing::instrument(skip_all, name = "ControllerListVolumeHealth")]
    async fn controller_list_volume_health(
        &self,
        req: Request<ControllerListVolumeHealthRequest>,
    ) -> Result<Response<ControllerListVolumeHealthResponse>, Status> {
        let req = req.into_inner();
        let after = page_token(req.max_entries, &req.starting_token)?;
        let (page, next) = (self.driver.pools)
            .list_page(after, req.max_entries as usize)
            .map_err(Error::from)?;
        // Only volumes with something to report are listed, as the spec asks.
        let inspector = health::Inspector::new(&self.driver.pools);
        let entries = page
            .iter()
            .map(|r| inspector.of_volume(r))
            .filter(|h| !h.health_statuses.is_empty())
            .collect();
        Ok(Response::new(ControllerListVolumeHealthResponse {
            entries,
            next_token: next.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all, name = "ControllerExpandVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required("volume_id", &req.volume_id)?.to_string();
        let range = req
            .capacity_range
            .ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
        if let Some(cap) = &req.volume_capability {
            capability::check(cap)?;
        }
        let record = self
            .driver
            .blocking(move |d| {
                Ok(d.pools.for_id(Kind::Volume, &id)?.expand_volume(
                    &id,
                    range.required_bytes,
                    range.limit_bytes,
                )?)
            })
            .await?;
        // The loop device must pick up the new size on the node even for raw block volumes,
        // and a filesystem must be grown there too.
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: record.size_bytes as i64,
            node_expansion_required: true,
        }))
    }

    #[tracing::instrument(skip_all, name = "ControllerGetVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let id = required("volume_id", &req.get_ref().volume_id)?;
        let record = self.driver.pools.get_volume(id).map_err(Error::from)?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(to_volume(&record)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: vec![],
            }),
        }))
    }

    #[tracing::instrument(skip_all, name = "ControllerModifyVolume", fields(volume_id = %crate::shared::logsafe::text(&req.get_ref().volume_id)))]
    async fn controller_modify_volume(
        &self,
        req: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required("volume_id", &req.volume_id)?.to_string();
        // All or nothing: one bad key or value and the record is not touched.
        let change = IoLimitsChange::parse_mutable(
            req.mutable_parameters
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .map_err(Error::from)?;
        self.driver
            .blocking(move |d| {
                d.pools
                    .for_id(Kind::Volume, &id)?
                    .modify_volume(&id, &change)?;
                // Pods using the volume on this node get the new rules now, without a
                // remount; a volume staged nowhere gets them at its next publish.
                io_throttle::reapply(d, &id, || engine::attached_device(d, &id))?;
                Ok(())
            })
            .await?;
        Ok(Response::new(ControllerModifyVolumeResponse {}))
    }
}
