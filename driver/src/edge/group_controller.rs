//! CSI GroupController over the local pool: crash-consistent snapshots of several volumes of
//! this node at one instant (provisioner/src/group_snapshot.rs keeps the records crash-safe).
//!
//! Consistency: every member that is staged and mounted here has its filesystem frozen (the
//! same freeze as single snapshots, with its markers and guardian, freeze.rs), all in volume-ID
//! order; only when all are frozen are they copied, and only then thawed. An unstaged member has
//! no writer and is copied as it is: exactly its last state. A member that is staged but cannot
//! be frozen here (raw block access, or mounted in a mount namespace this process cannot see)
//! could be written between two members' copies, so a group of several volumes that includes
//! one is refused with FAILED_PRECONDITION: the spec requires a group snapshot to "give a
//! write-order consistency guarantee or fail if that's not possible". What this gives is crash
//! consistency at one instant across the group, not application consistency: an application
//! that needs its own flush or pause must do it itself before the snapshot.

use std::sync::Arc;
use std::time::Duration;

use provisioner::group_snapshot::{check_members, GroupRecord, GroupTestHooks};
use provisioner::record::SnapshotRecord;
use tonic::{Request, Response, Status};

use provisioner::ids::Kind;
use provisioner::pool::Quiesced;
use provisioner::{PoolError, VolumeId};

use crate::csi::group_controller_server::GroupController;
use crate::csi::group_controller_service_capability::{rpc::Type as GroupCap, Rpc, Type};
use crate::csi::*;
use crate::edge::controller::{check_snapshot_parameters, to_snapshot};
use crate::error::{required, Error};
use crate::state::Driver;

/// Test-only fault injection, read from the driver's environment on every create (as the test
/// suite sets it per driver process): fail the copy of the n-th member, in volume-ID order.
pub const FAIL_COPY_ENV: &str = "LOOPVOL_TEST_FAIL_GROUP_COPY";
/// Test-only: pause this many milliseconds after each member is made durable (kill -9 tests).
pub const STEP_MS_ENV: &str = "LOOPVOL_TEST_GROUP_STEP_MS";

pub struct GroupControllerService {
    driver: Arc<Driver>,
}

impl GroupControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }
}

/// GroupControllerGetCapabilities' answer, shared with the router.
pub fn capabilities() -> GroupControllerGetCapabilitiesResponse {
    GroupControllerGetCapabilitiesResponse {
        capabilities: vec![GroupControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc {
                r#type: GroupCap::CreateDeleteGetVolumeGroupSnapshot as i32,
            })),
        }],
    }
}

fn test_hooks() -> GroupTestHooks {
    let number = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok());
    GroupTestHooks {
        fail_copy_of: number(FAIL_COPY_ENV).map(|n| n as usize),
        step_delay: Duration::from_millis(number(STEP_MS_ENV).unwrap_or(0)),
    }
}

/// The quiesce hook for one member of a group of `members` volumes: freeze it when it is
/// mounted here; refuse, when the group has several members, one that is staged but cannot be
/// frozen (see the module comment).
fn quiesce_member(
    d: &Driver,
    r: &provisioner::VolumeRecord,
    members: usize,
) -> Result<Box<dyn Quiesced>, PoolError> {
    if let Some(frozen) = crate::engine::quiesce(d, r).map_err(crate::error::to_pool_error)? {
        return Ok(Box::new(frozen));
    }
    if members < 2 {
        return Ok(Box::new(()));
    }
    let Some(hex) = VolumeId::parse(Kind::Volume, &r.id).map(|v| v.hex) else {
        return Ok(Box::new(()));
    };
    let staged = crate::node_state::load(&d.node_dir_of(&hex), &hex)
        .map_err(crate::error::to_pool_error)?
        .is_some();
    if staged {
        return Err(PoolError::FailedPrecondition(format!(
            "volume {} is staged but its filesystem cannot be frozen here (raw block access, or \
             mounted where this process cannot see it), so it cannot be snapshotted at one \
             instant with the other members; snapshot it on its own, or unstage it first",
            r.id
        )));
    }
    Ok(Box::new(()))
}

pub fn to_group(g: &GroupRecord, members: &[SnapshotRecord]) -> VolumeGroupSnapshot {
    let snapshots: Vec<Snapshot> = members.iter().map(to_snapshot).collect();
    VolumeGroupSnapshot {
        group_snapshot_id: g.id.clone(),
        ready_to_use: snapshots.iter().all(|s| s.ready_to_use),
        snapshots,
        creation_time: Some(prost_types::Timestamp {
            seconds: (g.created_unix_nanos / 1_000_000_000) as i64,
            nanos: (g.created_unix_nanos % 1_000_000_000) as i32,
        }),
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    #[tracing::instrument(skip_all, name = "GroupControllerGetCapabilities")]
    async fn group_controller_get_capabilities(
        &self,
        _req: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    #[tracing::instrument(skip_all, name = "CreateVolumeGroupSnapshot", fields(group_name = %crate::shared::logsafe::text(&req.get_ref().name), volume_ids = ?req.get_ref().source_volume_ids.iter().map(|v| crate::shared::logsafe::text(v).to_string()).collect::<Vec<_>>()))]
    async fn create_volume_group_snapshot(
        &self,
        req: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        provisioner::validate_name(&req.name).map_err(Error::from)?;
        if req.source_volume_ids.is_empty() {
            return Err(Error::InvalidArgument("source_volume_ids is required".into()).into());
        }
        check_snapshot_parameters(&req.parameters)?;
        let hooks = test_hooks();
        let count = req.source_volume_ids.len();
        let (group, members) = self
            .driver
            .blocking(move |d| {
                // A group lives in the pool of its volumes; members of another pool are not
                // found there (NOT_FOUND, like volumes of another node).
                let first = req
                    .source_volume_ids
                    .iter()
                    .min()
                    .map_or("", |s| s.as_str());
                let pool = d.pools.for_id(Kind::Volume, first)?;
                Ok(pool.create_group_snapshot(
                    &req.name,
                    &req.source_volume_ids,
                    &|r| quiesce_member(d, r, count),
                    &hooks,
                )?)
            })
            .await?;
        Ok(Response::new(CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(to_group(&group, &members)),
        }))
    }

    #[tracing::instrument(skip_all, name = "DeleteVolumeGroupSnapshot", fields(group_snapshot_id = %crate::shared::logsafe::text(&req.get_ref().group_snapshot_id)))]
    async fn delete_volume_group_snapshot(
        &self,
        req: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        required("group_snapshot_id", &req.group_snapshot_id)?;
        self.driver
            .blocking(move |d| {
                let pool = d.pools.for_id(Kind::Group, &req.group_snapshot_id)?;
                Ok(pool.delete_group_snapshot(&req.group_snapshot_id, &req.snapshot_ids)?)
            })
            .await?;
        Ok(Response::new(DeleteVolumeGroupSnapshotResponse {}))
    }

    #[tracing::instrument(skip_all, name = "GetVolumeGroupSnapshot", fields(group_snapshot_id = %crate::shared::logsafe::text(&req.get_ref().group_snapshot_id)))]
    async fn get_volume_group_snapshot(
        &self,
        req: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        required("group_snapshot_id", &req.group_snapshot_id)?;
        let (group, members) = (self.driver.pools)
            .for_id(Kind::Group, &req.group_snapshot_id)
            .and_then(|p| p.get_group_snapshot(&req.group_snapshot_id))
            .map_err(Error::from)?;
        // The ID alone names the group here; a list given must still match it (the spec asks
        // an SP that can detect a mismatch to report it).
        if !req.snapshot_ids.is_empty() {
            check_members(&group, &req.snapshot_ids).map_err(Error::from)?;
        }
        Ok(Response::new(GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(to_group(&group, &members)),
        }))
    }
}
