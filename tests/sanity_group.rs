//! csi-sanity's GroupController specs, ported like tests/sanity.rs ports identity.go,
//! controller.go and node.go: kubernetes-csi/csi-test **v5.4.0** `pkg/sanity/groupcontroller.go`
//! (unchanged on master), restated against the real `loopvol serve --mode all`.
//!
//! The file has two `DescribeSanity` blocks and six `It`s. Both blocks' `BeforeEach` skip the
//! specs unless GetPluginCapabilities names GROUP_CONTROLLER_SERVICE, and the second block's
//! also unless GroupControllerGetCapabilities names CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT;
//! the port checks the same at run time. The `GroupControllerClient` is made on
//! `sc.ControllerConn`, which for loopvol is the one socket. Secrets are csi-sanity's defaults
//! (none). `GenerateInvalidVolumeID` is `fake-vol-id`. `Resources.Cleanup` has nothing to
//! release here: none of the six specs creates anything.

mod common;

use common::*;
use loopvol::csi::group_controller_client::GroupControllerClient;
use loopvol::csi::group_controller_service_capability::rpc::Type as GroupCap;
use loopvol::csi::group_controller_service_capability::Type as GroupCapType;
use loopvol::csi::plugin_capability::{self, service};
use loopvol::csi::*;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

/// `DefaultIDGenerator.GenerateInvalidVolumeID`.
const INVALID_VOLUME_ID: &str = "fake-vol-id";

/// `ExpectErrorCode`: an error, no response, and exactly this code.
#[track_caller]
fn expect_error_code<T: std::fmt::Debug>(r: Result<Response<T>, Status>, code: Code) {
    match r {
        Ok(rsp) => panic!("expected {code:?}, got a response: {:?}", rsp.get_ref()),
        Err(s) => assert_eq!(s.code(), code, "unexpected error: {}", s.message()),
    }
}

struct Sanity {
    d: Driver,
    g: GroupControllerClient<Channel>,
}

/// The shared `BeforeEach`: `None` when not root.
async fn before_each(test: &str, needs_group_snapshots: bool) -> Option<Sanity> {
    if !root_or_skip(test) {
        return None;
    }
    let d = Driver::start_with(&["--overcommit-ratio", "1000"]).await;
    let caps = d
        .identity()
        .await
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .expect("GetPluginCapabilities")
        .into_inner();
    let provides = caps.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(plugin_capability::Type::Service(s))
            if s.r#type == service::Type::GroupControllerService as i32)
    });
    // csi-sanity would Skip here; loopvol offers the service, so a skip would only hide a
    // regression, and fails instead.
    assert!(
        provides,
        "GroupControllerService not supported (csi-sanity would skip)"
    );
    let mut g = GroupControllerClient::new(
        tonic::transport::Endpoint::from_shared(format!("unix://{}", d.socket.display()))
            .unwrap()
            .connect()
            .await
            .expect("connect"),
    );
    if needs_group_snapshots {
        assert!(
            is_group_controller_capability_supported(
                &mut g,
                GroupCap::CreateDeleteGetVolumeGroupSnapshot
            )
            .await,
            "VolumeGroupSnapshots not supported (csi-sanity would skip)"
        );
    }
    Some(Sanity { d, g })
}

/// `isGroupControllerCapabilitySupported`.
async fn is_group_controller_capability_supported(
    g: &mut GroupControllerClient<Channel>,
    cap: GroupCap,
) -> bool {
    let caps = g
        .group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {})
        .await
        .expect("GroupControllerGetCapabilities")
        .into_inner();
    caps.capabilities.iter().any(|c| match &c.r#type {
        Some(GroupCapType::Rpc(r)) => r.r#type == cap as i32,
        None => panic!("capability without an RPC: {c:?}"),
    })
}

impl Sanity {
    /// `AfterEach`: `r.Cleanup()` (nothing to release), plus the harness's own check.
    fn finish(self) {
        self.d.assert_clean();
    }
}

// =============================================================================================
// GroupController Service [GroupController Server]

/// csi-sanity: "GroupController Service [GroupController Server] GroupControllerGetCapabilities
/// should return appropriate capabilities"
#[tokio::test(flavor = "multi_thread")]
async fn group_controller_get_capabilities_should_return_appropriate_capabilities() {
    let Some(mut s) = before_each("group_controller_get_capabilities", false).await else {
        return;
    };
    let caps =
        s.g.group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {})
            .await;
    // By("checking successful response")
    let caps = caps.expect("GroupControllerGetCapabilities").into_inner();
    for cap in &caps.capabilities {
        match &cap.r#type {
            Some(GroupCapType::Rpc(r))
                if r.r#type == GroupCap::CreateDeleteGetVolumeGroupSnapshot as i32 => {}
            other => panic!("Unknown capability: {other:?}"),
        }
    }
    s.finish();
}

// =============================================================================================
// GroupController Service [GroupController VolumeGroupSnapshots]

/// csi-sanity: "GroupController Service [GroupController VolumeGroupSnapshots]
/// CreateVolumeGroupSnapshot should fail when no name is provided"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_group_snapshot_should_fail_when_no_name_is_provided() {
    let Some(mut s) = before_each("create_volume_group_snapshot_no_name", true).await else {
        return;
    };
    let r =
        s.g.create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest::default())
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish();
}

/// csi-sanity: "GroupController Service [GroupController VolumeGroupSnapshots]
/// GetVolumeGroupSnapshot should fail when no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn get_volume_group_snapshot_should_fail_when_no_volume_id_is_provided() {
    let Some(mut s) = before_each("get_volume_group_snapshot_no_id", true).await else {
        return;
    };
    let r =
        s.g.get_volume_group_snapshot(GetVolumeGroupSnapshotRequest::default())
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish();
}

/// csi-sanity: "GroupController Service [GroupController VolumeGroupSnapshots]
/// GetVolumeGroupSnapshot should fail when an invalid volume id is used"
#[tokio::test(flavor = "multi_thread")]
async fn get_volume_group_snapshot_should_fail_when_an_invalid_volume_id_is_used() {
    let Some(mut s) = before_each("get_volume_group_snapshot_invalid_id", true).await else {
        return;
    };
    let r =
        s.g.get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: INVALID_VOLUME_ID.into(),
            ..Default::default()
        })
        .await;
    expect_error_code(r, Code::NotFound);
    s.finish();
}

/// csi-sanity: "GroupController Service [GroupController VolumeGroupSnapshots]
/// DeleteVolumeGroupSnapshot should fail when no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn delete_volume_group_snapshot_should_fail_when_no_volume_id_is_provided() {
    let Some(mut s) = before_each("delete_volume_group_snapshot_no_id", true).await else {
        return;
    };
    let r =
        s.g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest::default())
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish();
}

/// csi-sanity: "GroupController Service [GroupController VolumeGroupSnapshots]
/// DeleteVolumeGroupSnapshot should succeed when an invalid volume id is used"
#[tokio::test(flavor = "multi_thread")]
async fn delete_volume_group_snapshot_should_succeed_when_an_invalid_volume_id_is_used() {
    let Some(mut s) = before_each("delete_volume_group_snapshot_invalid_id", true).await else {
        return;
    };
    let r =
        s.g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: INVALID_VOLUME_ID.into(),
            ..Default::default()
        })
        .await;
    r.expect("DeleteVolumeGroupSnapshot");
    s.finish();
}
