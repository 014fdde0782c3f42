//! csi-sanity, ported. kubernetes-csi/csi-test's `pkg/sanity` (identity.go, controller.go,
//! node.go) is the conformance suite the CSI community runs against drivers; it needs a Go
//! toolchain, so its specs are restated here against the real `loopvol serve --mode all`.
//!
//! Every test is one csi-sanity `It` and quotes its title. The port keeps csi-sanity's defaults
//! and habits:
//! - `NewTestConfig()`: TestVolumeSize 10 GiB, expansion to TestVolumeSize + 1 GiB, access type
//!   "mount" (a `MountVolume` with no fs_type and no flags), no parameters, no secrets,
//!   IdempotentCount 10, TestNodeVolumeAttachLimit off.
//! - `DefaultIDGenerator`: unknown IDs look like `fake-vol-id-<10 chars>`, `fake-node-id-...`,
//!   and the "invalid" ones are `fake-vol-id` / `fake-snap-id`.
//! - `TestContext.Setup`: the suite itself creates the staging directory (`StagingPath`, passed
//!   as-is as `staging_target_path`) and the *parent* of the publish target (`TargetPath`); the
//!   driver is handed `TargetPath + "/target"` and must create and remove that entry itself.
//!   Teardown removes both directories again (errors ignored, as `os.Remove` there).
//! - `Resources.Cleanup`: whatever a spec created is released in LIFO order: NodeUnpublish at
//!   `TargetPath/target`, NodeUnstage at `StagingPath` (NOT_FOUND is fine for both),
//!   ControllerUnpublish when it was published, then DeleteVolume; DeleteSnapshot for snapshots.
//!   Any other error fails the spec ("resource cleanup failed").
//! - A spec whose capability is not advertised is skipped the way csi-sanity's `Skip` does, at
//!   run time, so the port follows loopvol's capabilities if they change.
//!
//! Sources read: identity.go, controller.go and node.go of csi-test **v5.4.0**, the newest
//! release (it vendors CSI spec v1.12.0), and resources.go / sanity.go / util.go of v5. The
//! three capability specs use exactly v5.4.0's lists: they fail on any value they cannot name,
//! which is why loopvol advertises GET_SNAPSHOT and the v1.13 health values only on request
//! (`--advertise-capabilities`). Specs csi-sanity disables (`XIt`: ListVolumes pagination) are
//! not ported. Four specs are not in v5.4.0 and are marked `beyond v5.4`: the single-node
//! multi-writer publish spec is on csi-test's master (unreleased v5.5); NodeGetVolumeHealth
//! (twice) and NodeGetStorageHealth are loopvol's own, written in csi-sanity's style for the
//! v1.13 health RPCs that csi-test has no specs for yet, and run against a driver started with
//! those capabilities advertised.
//!
//! Every spec ported here passes; the four deviations this port first found (relative
//! volume_path answered INVALID_ARGUMENT instead of NOT_FOUND in NodeGetVolumeStats and
//! NodeExpandVolume; a second publish of a SINGLE_NODE_SINGLE_WRITER volume accepted) are fixed.
//! A fifth came from reading v5.4.0 again: loopvol's defaults advertised values v5.4.0 cannot
//! name, and the port's lists had been widened to accept them.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::controller_service_capability::rpc::Type as CtrlCap;
use loopvol::csi::identity_client::IdentityClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::node_service_capability::rpc::Type as NodeCap;
use loopvol::csi::plugin_capability::{self, service, volume_expansion};
use loopvol::csi::volume_capability::access_mode::Mode;
use loopvol::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use loopvol::csi::*;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

// ---------------------------------------------------------------------------------------------
// csi-sanity's configuration defaults (sanity.go `NewTestConfig`, controller.go constants).

/// `TestConfig.TestVolumeSize`: 10 GiB (loopvol volumes are thin, i.e. sparse).
const TEST_VOLUME_SIZE: i64 = 10 << 30;
/// `TestVolumeExpandSize()`: TestVolumeSize + `DefTestExpandIncrement` (1 GiB).
const TEST_VOLUME_EXPAND_SIZE: i64 = TEST_VOLUME_SIZE + (1 << 30);
/// `MaxNameLength`.
const MAX_NAME_LENGTH: usize = 128;
/// `TestConfig.IdempotentCount`.
const IDEMPOTENT_COUNT: usize = 10;
/// `TestConfig.TestNodeVolumeAttachLimit` (the `--csi.testnodevolumeattachlimit` flag).
const TEST_NODE_VOLUME_ATTACH_LIMIT: bool = false;
/// Wire values of the `VOLUME_CONDITION` capabilities CSI v1.13 withdrew; csi-sanity still
/// accepts them from older drivers.
const DEPRECATED_CONTROLLER_VOLUME_CONDITION: i32 = 11;
const DEPRECATED_NODE_VOLUME_CONDITION: i32 = 4;

/// `UniqueString`: the prefix plus one random suffix per process (`-XXXXXXXX-XXXXXXXX`).
fn unique_string(prefix: &str) -> String {
    static SUFFIX: OnceLock<String> = OnceLock::new();
    let suffix = SUFFIX.get_or_init(|| {
        let (a, b): (u32, u32) = (rand::random(), rand::random());
        format!("-{a:08X}-{b:08X}")
    });
    format!("{prefix}{suffix}")
}

/// `UniqueStringWithLength`: a unique name of exactly `len` bytes starting with `prefix`.
fn unique_string_with_length(prefix: &str, len: usize) -> String {
    let unique = unique_string(prefix);
    let fill = len.saturating_sub(unique.len());
    let name = format!("{prefix}{}{}", "x".repeat(fill), &unique[prefix.len()..]);
    assert_eq!(name.len(), len);
    name
}

/// `uuid.New().String()[:10]`: eight hex digits, a dash, one more hex digit.
fn uuid10() -> String {
    let (a, b): (u32, u8) = (rand::random(), rand::random());
    format!("{a:08x}-{:x}", b & 0xf)
}

/// `DefaultIDGenerator.GenerateUniqueValidVolumeID`.
fn unique_valid_volume_id() -> String {
    format!("fake-vol-id-{}", uuid10())
}

/// `DefaultIDGenerator.GenerateInvalidVolumeID`.
const INVALID_VOLUME_ID: &str = "fake-vol-id";

/// `DefaultIDGenerator.GenerateUniqueValidNodeID`.
fn unique_valid_node_id() -> String {
    format!("fake-node-id-{}", uuid10())
}

// ---------------------------------------------------------------------------------------------
// Request builders (controller.go's `Make*Req` helpers and `TestVolumeCapabilityWithAccessType`).

/// `TestVolumeCapabilityWithAccessType` with the default access type "mount".
fn test_cap(mode: Mode) -> VolumeCapability {
    if BLOCK_ACCESS {
        block_cap(mode)
    } else {
        mount_cap("", mode)
    }
}

/// `TestConfig.TestVolumeAccessType`: "mount", except in the `sanity_block` test target, which
/// compiles this same file again to run every spec with "block", as csi-sanity is run a second
/// time with `--csi.testvolumeaccesstype=block`.
const BLOCK_ACCESS: bool = same(env!("CARGO_CRATE_NAME"), "sanity_block");

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

fn snw() -> VolumeCapability {
    test_cap(Mode::SingleNodeWriter)
}

fn required(bytes: i64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes: bytes,
        limit_bytes: 0,
    })
}

fn exactly(bytes: i64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes: bytes,
        limit_bytes: bytes,
    })
}

/// A CreateVolumeRequest for one SINGLE_NODE_WRITER mount capability, as most specs send it.
fn volume_req(name: &str, capacity_range: Option<CapacityRange>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range,
        volume_capabilities: vec![snw()],
        ..Default::default()
    }
}

/// `MakeCreateVolumeReq`: required = limit = TestVolumeSize.
fn make_create_volume_req(name: &str) -> CreateVolumeRequest {
    volume_req(name, exactly(TEST_VOLUME_SIZE))
}

/// `MakeCreateSnapshotReq`.
fn make_create_snapshot_req(name: &str, source_volume_id: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source_volume_id.into(),
        ..Default::default()
    }
}

/// `MakeExpandVolumeReq`.
fn make_expand_volume_req(volume_id: &str) -> ControllerExpandVolumeRequest {
    ControllerExpandVolumeRequest {
        volume_id: volume_id.into(),
        capacity_range: required(TEST_VOLUME_EXPAND_SIZE),
        volume_capability: Some(snw()),
        ..Default::default()
    }
}

/// `TestConfig.TestVolumeMutableParameters`, as csi-sanity is run against loopvol:
/// `--csi.testvolumemutableparameters=writeIOPS=1000` (empty by default, which would make the
/// VolumeAttributesClass specs prove nothing).
fn test_volume_mutable_parameters() -> HashMap<String, String> {
    HashMap::from([("writeIOPS".into(), "1000".into())])
}

/// `MakeModifyVolumeReq`.
fn make_modify_volume_req(volume_id: &str) -> ControllerModifyVolumeRequest {
    ControllerModifyVolumeRequest {
        volume_id: volume_id.into(),
        mutable_parameters: test_volume_mutable_parameters(),
        ..Default::default()
    }
}

/// `MakeControllerPublishVolumeReq`.
fn make_controller_publish_volume_req(
    volume_id: &str,
    node_id: &str,
) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node_id.into(),
        volume_capability: Some(snw()),
        ..Default::default()
    }
}

fn fake_mutable_parameters() -> HashMap<String, String> {
    HashMap::from([("XXX_FakeKey".into(), "XXX_FakeValue".into())])
}

/// `ExpectErrorCode`: an error, no response, and exactly this code.
#[track_caller]
fn expect_error_code<T: std::fmt::Debug>(r: Result<Response<T>, Status>, code: Code) {
    match r {
        Ok(rsp) => panic!("expected {code:?}, got a response: {:?}", rsp.get_ref()),
        Err(s) => assert_eq!(s.code(), code, "unexpected error: {}", s.message()),
    }
}

/// `verifySnapshotInfo`.
#[track_caller]
fn verify_snapshot_info(s: Option<&Snapshot>) {
    let s = s.expect("snapshot is nil");
    assert!(!s.snapshot_id.is_empty(), "snapshot ID is empty");
    assert!(!s.source_volume_id.is_empty(), "source volume ID is empty");
    assert!(s.creation_time.is_some(), "creation time is zero");
}

// ---------------------------------------------------------------------------------------------
// The per-spec context: csi-sanity's TestContext (Setup/Teardown) plus its Resources tracker.

enum Managed {
    Volume { id: String, node_id: Option<String> },
    Snapshot(String),
}

struct Sanity {
    d: Driver,
    c: ControllerClient<Channel>,
    n: NodeClient<Channel>,
    i: IdentityClient<Channel>,
    /// `sc.TargetPath`: the parent of every publish target; created by the suite.
    target_path: String,
    /// `sc.StagingPath`: the staging_target_path itself; created by the suite.
    staging_path: String,
    /// `Resources.managedResourceInfos`, released in reverse order.
    managed: Vec<Managed>,
    /// Whether `Resources.NodeClient` is set: the ExpandVolume and ModifyVolume suites leave it
    /// nil, so their cleanup never calls the Node service.
    node_client: bool,
}

impl Sanity {
    /// Start loopvol and run `TestContext.Setup`; `None` (test skipped) when not root.
    async fn setup(test: &str) -> Option<Sanity> {
        Self::setup_with(test, &[]).await
    }

    /// `setup` with extra `serve` flags (the opt-in capabilities of the specs beyond v5.4).
    async fn setup_with(test: &str, extra: &[&str]) -> Option<Sanity> {
        if !root_or_skip(test) {
            return None;
        }
        // csi-sanity's volumes are 10 GiB and thin, and a spec may hold five of them at once
        // while others run beside it; they never hold more than a few MiB of data. With the
        // default ratio of 1.0 the pool would promise only what the disk has free, so the suite
        // would fail on a machine with less than ~60 GiB free (as CI did) for reasons that
        // have nothing to do with the specs. Overcommit as thin-provisioning operators do.
        let mut args = vec!["--overcommit-ratio", "1000"];
        args.extend_from_slice(extra);
        let d = Driver::start_with(&args).await;
        // createMountTargetLocation: os.Mkdir, which fails if the directory already exists.
        let target = d.path("csi-mount");
        let staging = d.path("csi-staging");
        std::fs::create_dir(&target).expect("create target directory");
        std::fs::create_dir(&staging).expect("create staging directory");
        Some(Sanity {
            c: d.controller().await,
            n: d.node().await,
            i: d.identity().await,
            target_path: target.to_string_lossy().into_owned(),
            staging_path: staging.to_string_lossy().into_owned(),
            managed: Vec::new(),
            node_client: true,
            d,
        })
    }

    /// `sc.TargetPath + "/target"`, where every spec publishes.
    fn target(&self) -> String {
        format!("{}/target", self.target_path)
    }

    /// `Resources.Cleanup`, `TestContext.Teardown`, then the harness's own check that no
    /// mount or loop device of this test is left.
    async fn finish(mut self) {
        let mut errors = self.cleanup().await;
        // Teardown's os.Remove errors are ignored by csi-sanity, but its paths are the same for
        // every spec: a directory the driver left non-empty or mounted makes the next spec's
        // Setup (os.Mkdir) fail. So they must come off cleanly here.
        for dir in [&self.target_path, &self.staging_path] {
            if let Err(e) = std::fs::remove_dir(dir) {
                errors.push(format!("Teardown could not remove {dir}: {e}"));
            }
        }
        assert!(errors.is_empty(), "resource cleanup failed: {errors:#?}");
        self.d.assert_clean();
    }

    /// csi-sanity's `Skip(reason)`: nothing more of the spec runs, the cleanup still does.
    async fn skip(self, reason: &str) {
        eprintln!("SKIP (as csi-sanity would): {reason}");
        self.finish().await;
    }

    async fn cleanup(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let not_found_is_fine = |what: &str, r: Result<(), Status>, errors: &mut Vec<String>| {
            if let Err(s) = r {
                if s.code() != Code::NotFound {
                    errors.push(format!("{what} failed: {s:?}"));
                }
            }
        };
        while let Some(m) = self.managed.pop() {
            match m {
                Managed::Volume { id, node_id } => {
                    if self.node_client {
                        let r = self.node_unpublish(&id, &self.target()).await;
                        not_found_is_fine(&format!("NodeUnpublishVolume {id}"), r, &mut errors);
                        if self.node_cap(NodeCap::StageUnstageVolume).await {
                            let r = self.node_unstage(&id).await;
                            not_found_is_fine(&format!("NodeUnstageVolume {id}"), r, &mut errors);
                        }
                    }
                    if let Some(node_id) = node_id {
                        let r = self
                            .c
                            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                                volume_id: id.clone(),
                                node_id,
                                ..Default::default()
                            })
                            .await;
                        if let Err(s) = r {
                            errors.push(format!("ControllerUnpublishVolume {id} failed: {s:?}"));
                        }
                    }
                    if let Err(s) = self.c.delete_volume(delete_volume_req(&id)).await {
                        errors.push(format!("DeleteVolume {id} failed: {s:?}"));
                    }
                }
                Managed::Snapshot(id) => {
                    if let Err(s) = self.c.delete_snapshot(delete_snapshot_req(&id)).await {
                        errors.push(format!("DeleteSnapshot {id} failed: {s:?}"));
                    }
                }
            }
        }
        errors
    }

    fn unregister(&mut self, id: &str) {
        let pos = self.managed.iter().position(|m| match m {
            Managed::Volume { id: v, .. } => v == id,
            Managed::Snapshot(s) => s == id,
        });
        if let Some(pos) = pos {
            self.managed.remove(pos);
        }
    }

    // --- capabilities (isControllerCapabilitySupported and friends) ---

    async fn controller_cap(&mut self, t: CtrlCap) -> bool {
        controller_cap_types(&mut self.c)
            .await
            .contains(&(t as i32))
    }

    async fn node_cap(&mut self, t: NodeCap) -> bool {
        node_cap_types(&mut self.n).await.contains(&(t as i32))
    }

    async fn plugin_service(&mut self, t: service::Type) -> bool {
        let caps = self
            .i
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner()
            .capabilities;
        caps.iter().any(|c| {
            matches!(&c.r#type, Some(plugin_capability::Type::Service(s)) if s.r#type == t as i32)
        })
    }

    // --- the Resources wrappers: creations are registered for cleanup ---

    async fn create_volume(
        &mut self,
        req: CreateVolumeRequest,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = self.c.create_volume(req).await;
        if let Ok(rsp) = &r {
            if let Some(v) = rsp
                .get_ref()
                .volume
                .as_ref()
                .filter(|v| !v.volume_id.is_empty())
            {
                self.managed.push(Managed::Volume {
                    id: v.volume_id.clone(),
                    node_id: None,
                });
            }
        }
        r
    }

    /// `MustCreateVolume`.
    async fn must_create_volume(&mut self, req: CreateVolumeRequest) -> Volume {
        let rsp = self
            .create_volume(req)
            .await
            .expect("volume create failed")
            .into_inner();
        let vol = rsp.volume.expect("volume in response is nil");
        assert!(
            !vol.volume_id.is_empty(),
            "volume ID in response is missing"
        );
        vol
    }

    async fn delete_volume(&mut self, id: &str) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = self.c.delete_volume(delete_volume_req(id)).await;
        if r.is_ok() {
            self.unregister(id);
        }
        r
    }

    async fn controller_publish(
        &mut self,
        req: ControllerPublishVolumeRequest,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let (volume_id, node_id) = (req.volume_id.clone(), req.node_id.clone());
        let r = self.c.controller_publish_volume(req).await;
        if r.is_ok() && !volume_id.is_empty() && !node_id.is_empty() {
            self.managed.push(Managed::Volume {
                id: volume_id,
                node_id: Some(node_id),
            });
        }
        r
    }

    /// `MustControllerPublishVolume`.
    async fn must_controller_publish(
        &mut self,
        req: ControllerPublishVolumeRequest,
    ) -> ControllerPublishVolumeResponse {
        self.controller_publish(req)
            .await
            .expect("controller publish volume failed")
            .into_inner()
    }

    async fn create_snapshot(
        &mut self,
        req: CreateSnapshotRequest,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = self.c.create_snapshot(req).await;
        if let Ok(rsp) = &r {
            if let Some(s) = rsp
                .get_ref()
                .snapshot
                .as_ref()
                .filter(|s| !s.snapshot_id.is_empty())
            {
                self.managed.push(Managed::Snapshot(s.snapshot_id.clone()));
            }
        }
        r
    }

    /// `MustCreateSnapshot`.
    async fn must_create_snapshot(&mut self, req: CreateSnapshotRequest) -> Snapshot {
        let rsp = self
            .create_snapshot(req)
            .await
            .expect("create snapshot failed")
            .into_inner();
        verify_snapshot_info(rsp.snapshot.as_ref());
        rsp.snapshot.unwrap()
    }

    /// `MustCreateSnapshotFromVolumeRequest`.
    async fn must_create_snapshot_from_volume_request(
        &mut self,
        req: CreateVolumeRequest,
        snapshot_name: &str,
    ) -> (Snapshot, Volume) {
        let vol = self.must_create_volume(req).await;
        let snap = self
            .must_create_snapshot(make_create_snapshot_req(snapshot_name, &vol.volume_id))
            .await;
        (snap, vol)
    }

    async fn delete_snapshot(
        &mut self,
        id: &str,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = self.c.delete_snapshot(delete_snapshot_req(id)).await;
        if r.is_ok() && !id.is_empty() {
            self.unregister(id);
        }
        r
    }

    async fn list_snapshots(&mut self, req: ListSnapshotsRequest) -> ListSnapshotsResponse {
        self.c
            .list_snapshots(req)
            .await
            .expect("ListSnapshots")
            .into_inner()
    }

    async fn list_volumes(&mut self) -> Vec<list_volumes_response::Entry> {
        self.c
            .list_volumes(ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner()
            .entries
    }

    // --- Node helpers (node.go's closures over the suite's paths) ---

    async fn node_info(&mut self) -> NodeGetInfoResponse {
        let ni = self
            .n
            .node_get_info(NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner();
        assert!(!ni.node_id.is_empty(), "node ID is empty");
        ni
    }

    /// `createVolumeWithCapability`.
    async fn create_volume_with_capability(&mut self, name: &str, cap: VolumeCapability) -> Volume {
        let mut req = make_create_volume_req(name);
        req.volume_capabilities = vec![cap];
        self.must_create_volume(req).await
    }

    /// `controllerPublishVolumeWithCapability`: only when PUBLISH_UNPUBLISH_VOLUME is offered.
    async fn controller_publish_with_capability(
        &mut self,
        vol: &Volume,
        node_id: &str,
        cap: VolumeCapability,
    ) -> Option<ControllerPublishVolumeResponse> {
        if !self.plugin_service(service::Type::ControllerService).await
            || !self.controller_cap(CtrlCap::PublishUnpublishVolume).await
        {
            return None;
        }
        let req = ControllerPublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: node_id.into(),
            volume_capability: Some(cap),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        };
        Some(self.must_controller_publish(req).await)
    }

    /// `nodeStageVolumeWithCapability`: only when STAGE_UNSTAGE_VOLUME is offered.
    async fn node_stage_with_capability(
        &mut self,
        vol: &Volume,
        conpub: Option<&ControllerPublishVolumeResponse>,
        cap: VolumeCapability,
    ) {
        if !self.node_cap(NodeCap::StageUnstageVolume).await {
            return;
        }
        self.n
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                volume_capability: Some(cap),
                staging_target_path: self.staging_path.clone(),
                volume_context: vol.volume_context.clone(),
                publish_context: conpub
                    .map(|c| c.publish_context.clone())
                    .unwrap_or_default(),
                ..Default::default()
            })
            .await
            .expect("NodeStageVolume");
    }

    /// The NodePublishVolumeRequest of `nodePublishVolumeWithCapability`, at `target`.
    async fn node_publish_req(
        &mut self,
        vol: &Volume,
        conpub: Option<&ControllerPublishVolumeResponse>,
        cap: VolumeCapability,
        target: String,
    ) -> NodePublishVolumeRequest {
        let staging_target_path = if self.node_cap(NodeCap::StageUnstageVolume).await {
            self.staging_path.clone()
        } else {
            String::new()
        };
        NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: target,
            staging_target_path,
            volume_capability: Some(cap),
            volume_context: vol.volume_context.clone(),
            publish_context: conpub
                .map(|c| c.publish_context.clone())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    /// `nodePublishVolumeWithCapability`: publish at `TargetPath/target`.
    async fn node_publish_with_capability(
        &mut self,
        vol: &Volume,
        conpub: Option<&ControllerPublishVolumeResponse>,
        cap: VolumeCapability,
    ) {
        let target = self.target();
        let req = self.node_publish_req(vol, conpub, cap, target).await;
        self.n
            .node_publish_volume(req)
            .await
            .expect("NodePublishVolume");
    }

    /// node.go's usual prologue: a default volume, controller-published if that exists,
    /// staged and published with the default capability.
    async fn create_stage_publish(&mut self, name: &str) -> Volume {
        let vol = self.create_volume_with_capability(name, snw()).await;
        let nid = self.node_info().await;
        let conpub = self
            .controller_publish_with_capability(&vol, &nid.node_id, snw())
            .await;
        self.node_stage_with_capability(&vol, conpub.as_ref(), snw())
            .await;
        self.node_publish_with_capability(&vol, conpub.as_ref(), snw())
            .await;
        vol
    }

    async fn node_unpublish(&mut self, id: &str, target: &str) -> Result<(), Status> {
        self.n
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.into(),
            })
            .await
            .map(|_| ())
    }

    async fn node_unstage(&mut self, id: &str) -> Result<(), Status> {
        self.n
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: self.staging_path.clone(),
            })
            .await
            .map(|_| ())
    }

    /// `runControllerTest` (node.go): the whole node lifecycle, each call `count` times.
    async fn run_controller_test(&mut self, count: usize) {
        let name = unique_string(&format!("sanity-node-full-{count}"));
        let ni = self.node_info().await;
        let mut req = make_create_volume_req(&name);
        req.accessibility_requirements =
            ni.accessible_topology.clone().map(|t| TopologyRequirement {
                requisite: vec![t],
                preferred: vec![],
            });
        let vol = self.must_create_volume(req).await;
        let conpub = if self.controller_cap(CtrlCap::PublishUnpublishVolume).await {
            let mut req = make_controller_publish_volume_req(&vol.volume_id, &ni.node_id);
            req.volume_context = vol.volume_context.clone();
            Some(self.must_controller_publish(req).await)
        } else {
            None
        };
        if self.node_cap(NodeCap::StageUnstageVolume).await {
            for _ in 0..count {
                self.node_stage_with_capability(&vol, conpub.as_ref(), snw())
                    .await;
            }
        }
        for _ in 0..count {
            self.node_publish_with_capability(&vol, conpub.as_ref(), snw())
                .await;
        }
        if self.node_cap(NodeCap::GetVolumeStats).await {
            let stats = self
                .n
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: vol.volume_id.clone(),
                    volume_path: self.target(),
                    ..Default::default()
                })
                .await
                .expect("NodeGetVolumeStats")
                .into_inner();
            assert!(!stats.usage.is_empty(), "usage is nil");
        }
    }

    /// `VolumeLifecycle` (controller.go): create, then ControllerPublish `count` times.
    async fn volume_lifecycle(&mut self, count: usize) {
        let ni = self.node_info().await;
        let name = unique_string(&format!("sanity-controller-publish-{count}"));
        let mut req = volume_req(&name, None);
        req.accessibility_requirements =
            ni.accessible_topology.clone().map(|t| TopologyRequirement {
                requisite: vec![t],
                preferred: vec![],
            });
        let vol = self.must_create_volume(req).await;
        for _ in 0..count {
            let mut req = make_controller_publish_volume_req(&vol.volume_id, &ni.node_id);
            req.volume_context = vol.volume_context.clone();
            self.must_controller_publish(req).await;
        }
    }
}

fn delete_volume_req(id: &str) -> DeleteVolumeRequest {
    DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    }
}

fn delete_snapshot_req(id: &str) -> DeleteSnapshotRequest {
    DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    }
}

async fn controller_cap_types(c: &mut ControllerClient<Channel>) -> Vec<i32> {
    let caps = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .expect("ControllerGetCapabilities")
        .into_inner()
        .capabilities;
    caps.iter()
        .map(|cap| match &cap.r#type {
            Some(controller_service_capability::Type::Rpc(r)) => r.r#type,
            None => panic!("capability without rpc: {cap:?}"),
        })
        .collect()
}

async fn node_cap_types(n: &mut NodeClient<Channel>) -> Vec<i32> {
    let caps = n
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .expect("NodeGetCapabilities")
        .into_inner()
        .capabilities;
    caps.iter()
        .map(|cap| match &cap.r#type {
            Some(node_service_capability::Type::Rpc(r)) => r.r#type,
            None => panic!("capability without rpc: {cap:?}"),
        })
        .collect()
}

/// Start a spec: set up, or end the test when it must skip for lack of root.
macro_rules! sanity {
    ($name:expr) => {
        match Sanity::setup($name).await {
            Some(s) => s,
            None => return,
        }
    };
    ($name:expr, $extra:expr) => {
        match Sanity::setup_with($name, $extra).await {
            Some(s) => s,
            None => return,
        }
    };
}

/// The specs below csi-test's v5.4 release (volume health, CSI v1.13) need the capabilities
/// loopvol advertises only on request.
const OPT_IN: &[&str] = &["--advertise-capabilities", "volume-health,get-snapshot"];

/// A Describe's `BeforeEach(... Skip(...))` on a controller capability.
macro_rules! require_controller_cap {
    ($s:ident, $cap:expr, $why:expr) => {
        if !$s.controller_cap($cap).await {
            return $s.skip($why).await;
        }
    };
}

/// The same for a node capability.
macro_rules! require_node_cap {
    ($s:ident, $cap:expr, $why:expr) => {
        if !$s.node_cap($cap).await {
            return $s.skip($why).await;
        }
    };
}

// =============================================================================================
// Identity Service

/// csi-sanity: "Identity Service GetPluginCapabilities should return appropriate capabilities"
#[tokio::test(flavor = "multi_thread")]
async fn identity_get_plugin_capabilities_should_return_appropriate_capabilities() {
    let mut s = sanity!("identity_get_plugin_capabilities");
    let caps =
        s.i.get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner()
            .capabilities;
    for cap in &caps {
        match &cap.r#type {
            Some(plugin_capability::Type::Service(svc)) => assert!(
                [
                    service::Type::ControllerService as i32,
                    service::Type::VolumeAccessibilityConstraints as i32,
                    service::Type::GroupControllerService as i32,
                    service::Type::SnapshotMetadataService as i32,
                ]
                .contains(&svc.r#type),
                "Unknown service: {svc:?}"
            ),
            Some(plugin_capability::Type::VolumeExpansion(e)) => assert!(
                [
                    volume_expansion::Type::Online as i32,
                    volume_expansion::Type::Offline as i32,
                ]
                .contains(&e.r#type),
                "Unknown volume expansion mode: {e:?}"
            ),
            None => panic!("Unknown capability: {cap:?}"),
        }
    }
    s.finish().await;
}

/// csi-sanity: "Identity Service Probe should return appropriate information"
#[tokio::test(flavor = "multi_thread")]
async fn identity_probe_should_return_appropriate_information() {
    let mut s = sanity!("identity_probe");
    let r = s.i.probe(ProbeRequest {}).await;
    // csi-sanity checks for no error first, so FAILED_PRECONDITION fails the spec too.
    r.expect("Probe");
    s.finish().await;
}

/// The plugin name must match `^[a-zA-Z][A-Za-z0-9-\\.\\_]{0,61}[a-zA-Z]$` (Go raw string: the
/// class also admits a backslash).
fn valid_plugin_name(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_alphanumeric() || b"-.\\_".contains(c);
    (2..=63).contains(&b.len())
        && b[0].is_ascii_alphabetic()
        && b[b.len() - 1].is_ascii_alphabetic()
        && b[1..b.len() - 1].iter().all(inner)
}

/// csi-sanity: "Identity Service GetPluginInfo should return appropriate information"
#[tokio::test(flavor = "multi_thread")]
async fn identity_get_plugin_info_should_return_appropriate_information() {
    let mut s = sanity!("identity_get_plugin_info");
    let info =
        s.i.get_plugin_info(GetPluginInfoRequest {})
            .await
            .expect("GetPluginInfo")
            .into_inner();
    assert!(!info.name.is_empty());
    assert!(info.name.len() <= 63);
    assert!(valid_plugin_name(&info.name), "bad name {:?}", info.name);
    s.finish().await;
}

// =============================================================================================
// Controller Service [Controller Server]

/// The capability types the ControllerGetCapabilities spec knows: exactly csi-test v5.4.0's
/// switch (pkg/sanity/controller.go), the newest release. GET_SNAPSHOT (spec v1.12) and the
/// v1.13 health values are not in it, so a driver advertising them fails this spec there.
const KNOWN_CONTROLLER_CAPS: &[i32] = &[
    CtrlCap::CreateDeleteVolume as i32,
    CtrlCap::PublishUnpublishVolume as i32,
    CtrlCap::ListVolumes as i32,
    CtrlCap::GetCapacity as i32,
    CtrlCap::CreateDeleteSnapshot as i32,
    CtrlCap::ListSnapshots as i32,
    CtrlCap::PublishReadonly as i32,
    CtrlCap::CloneVolume as i32,
    CtrlCap::ExpandVolume as i32,
    CtrlCap::ModifyVolume as i32,
    CtrlCap::ListVolumesPublishedNodes as i32,
    CtrlCap::GetVolume as i32,
    DEPRECATED_CONTROLLER_VOLUME_CONDITION,
    CtrlCap::SingleNodeMultiWriter as i32,
];

/// csi-sanity: "Controller Service [Controller Server] ControllerGetCapabilities should return
/// appropriate capabilities"
#[tokio::test(flavor = "multi_thread")]
async fn controller_get_capabilities_should_return_appropriate_capabilities() {
    let mut s = sanity!("controller_get_capabilities");
    for t in controller_cap_types(&mut s.c).await {
        assert!(
            KNOWN_CONTROLLER_CAPS.contains(&t),
            "Unknown capability: {:?}",
            CtrlCap::try_from(t)
        );
    }
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] GetCapacity should return capacity (no
/// optional values added)"
#[tokio::test(flavor = "multi_thread")]
async fn get_capacity_should_return_capacity_no_optional_values_added() {
    let mut s = sanity!("get_capacity");
    require_controller_cap!(s, CtrlCap::GetCapacity, "GetCapacity not supported");
    s.c.get_capacity(GetCapacityRequest::default())
        .await
        .expect("GetCapacity");
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ListVolumes should return appropriate
/// values (no optional values added)"
#[tokio::test(flavor = "multi_thread")]
async fn list_volumes_should_return_appropriate_values_no_optional_values_added() {
    let mut s = sanity!("list_volumes_appropriate_values");
    require_controller_cap!(s, CtrlCap::ListVolumes, "ListVolumes not supported");
    for e in s.list_volumes().await {
        let v = e.volume.expect("volume is nil");
        assert!(!v.volume_id.is_empty());
    }
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ListVolumes should fail when an invalid
/// starting_token is passed"
#[tokio::test(flavor = "multi_thread")]
async fn list_volumes_should_fail_when_an_invalid_starting_token_is_passed() {
    let mut s = sanity!("list_volumes_invalid_token");
    require_controller_cap!(s, CtrlCap::ListVolumes, "ListVolumes not supported");
    let r =
        s.c.list_volumes(ListVolumesRequest {
            starting_token: "invalid-token".into(),
            ..Default::default()
        })
        .await;
    expect_error_code(r, Code::Aborted);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ListVolumes check the presence of new
/// volumes and absence of deleted ones in the volume list"
#[tokio::test(flavor = "multi_thread")]
async fn list_volumes_check_the_presence_of_new_volumes_and_absence_of_deleted_ones() {
    let mut s = sanity!("list_volumes_presence");
    require_controller_cap!(s, CtrlCap::ListVolumes, "ListVolumes not supported");
    let total = s.list_volumes().await.len();
    let vol = s.must_create_volume(volume_req("sanity", None)).await;
    assert_eq!(s.list_volumes().await.len(), total + 1);
    s.delete_volume(&vol.volume_id).await.expect("DeleteVolume");
    assert_eq!(s.list_volumes().await.len(), total);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should fail when no name is
/// provided"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_fail_when_no_name_is_provided() {
    let mut s = sanity!("create_volume_no_name");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    let r = s.create_volume(CreateVolumeRequest::default()).await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should fail when no volume
/// capabilities are provided"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_fail_when_no_volume_capabilities_are_provided() {
    let mut s = sanity!("create_volume_no_caps");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    let req = CreateVolumeRequest {
        name: unique_string("sanity-controller-create-no-volume-capabilities"),
        ..Default::default()
    };
    expect_error_code(s.create_volume(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should return appropriate
/// values SingleNodeWriter NoCapacity" (despite its title it sends TestVolumeSize)
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_return_appropriate_values_single_node_writer_no_capacity() {
    let mut s = sanity!("create_volume_no_capacity");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    let name = unique_string("sanity-controller-create-single-no-capacity");
    s.must_create_volume(volume_req(&name, required(TEST_VOLUME_SIZE)))
        .await;
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should return appropriate
/// values SingleNodeWriter WithCapacity 1Gi"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_return_appropriate_values_single_node_writer_with_capacity() {
    let mut s = sanity!("create_volume_with_capacity");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    let name = unique_string("sanity-controller-create-single-with-capacity");
    let r = s
        .create_volume(volume_req(&name, required(TEST_VOLUME_SIZE)))
        .await;
    if let Err(e) = &r {
        if matches!(e.code(), Code::OutOfRange | Code::Unimplemented) {
            return s.skip("Required bytes not supported").await;
        }
    }
    let vol = r
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    assert!(!vol.volume_id.is_empty());
    assert!(vol.capacity_bytes == 0 || vol.capacity_bytes >= TEST_VOLUME_SIZE);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should not fail when
/// requesting to create a volume with already existing name and same capacity"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_not_fail_with_already_existing_name_and_same_capacity() {
    let mut s = sanity!("create_volume_twice_same");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    let name = unique_string("sanity-controller-create-twice");
    let vol1 = s
        .must_create_volume(volume_req(&name, required(TEST_VOLUME_SIZE)))
        .await;
    assert!(vol1.capacity_bytes == 0 || vol1.capacity_bytes >= TEST_VOLUME_SIZE);
    let vol2 = s
        .must_create_volume(volume_req(&name, required(TEST_VOLUME_SIZE)))
        .await;
    assert!(vol2.capacity_bytes == 0 || vol2.capacity_bytes >= TEST_VOLUME_SIZE);
    assert_eq!(vol1.volume_id, vol2.volume_id);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should fail when requesting
/// to create a volume with already existing name and different capacity"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_fail_with_already_existing_name_and_different_capacity() {
    let mut s = sanity!("create_volume_twice_different");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    let name = unique_string("sanity-controller-create-twice-different");
    s.must_create_volume(volume_req(&name, exactly(TEST_VOLUME_SIZE)))
        .await;
    let r = s
        .create_volume(volume_req(&name, exactly(2 * TEST_VOLUME_SIZE)))
        .await;
    expect_error_code(r, Code::AlreadyExists);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should not fail when
/// creating volume with maximum-length name"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_not_fail_when_creating_volume_with_maximum_length_name() {
    let mut s = sanity!("create_volume_maxlen");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    let name = unique_string_with_length("sanity-controller-create-maxlen", MAX_NAME_LENGTH);
    let vol = s
        .must_create_volume(volume_req(&name, required(TEST_VOLUME_SIZE)))
        .await;
    assert!(vol.capacity_bytes == 0 || vol.capacity_bytes >= TEST_VOLUME_SIZE);
    s.finish().await;
}

fn from_snapshot(id: &str) -> Option<VolumeContentSource> {
    Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: id.into(),
        })),
    })
}

fn from_volume(id: &str) -> Option<VolumeContentSource> {
    Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: id.into(),
        })),
    })
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should create volume from
/// an existing source snapshot"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_create_volume_from_an_existing_source_snapshot() {
    let mut s = sanity!("create_volume_from_snapshot");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    require_controller_cap!(s, CtrlCap::CreateDeleteSnapshot, "Snapshot not supported");
    let vol1 = s
        .must_create_volume(make_create_volume_req(&unique_string(
            "sanity-controller-source-vol",
        )))
        .await;
    let snap_req = make_create_snapshot_req(
        &unique_string("sanity-controller-snap-from-vol"),
        &vol1.volume_id,
    );
    // csi-sanity polls every 5 s until ready_to_use; bounded here.
    let mut snap = s.must_create_snapshot(snap_req.clone()).await;
    for _ in 0..24 {
        if snap.ready_to_use {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        snap = s.must_create_snapshot(snap_req.clone()).await;
    }
    assert!(snap.ready_to_use, "snapshot never became ready to use");
    let mut req = make_create_volume_req(&unique_string("sanity-controller-vol-from-snap"));
    req.volume_content_source = from_snapshot(&snap.snapshot_id);
    let vol = s
        .create_volume(req)
        .await
        .expect("CreateVolume")
        .into_inner();
    assert!(vol.volume.expect("volume").content_source.is_some());
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should fail when the volume
/// source snapshot is not found"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_fail_when_the_volume_source_snapshot_is_not_found() {
    let mut s = sanity!("create_volume_snapshot_not_found");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    require_controller_cap!(s, CtrlCap::CreateDeleteSnapshot, "Snapshot not supported");
    let mut req = make_create_volume_req(&unique_string("sanity-controller-vol-from-snap"));
    req.volume_content_source = from_snapshot("non-existing-snapshot-id");
    expect_error_code(s.create_volume(req).await, Code::NotFound);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should create volume from
/// an existing source volume"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_create_volume_from_an_existing_source_volume() {
    let mut s = sanity!("create_volume_from_volume");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    require_controller_cap!(s, CtrlCap::CloneVolume, "Volume Cloning not supported");
    let vol1 = s
        .must_create_volume(make_create_volume_req(&unique_string(
            "sanity-controller-source-vol",
        )))
        .await;
    let mut req = make_create_volume_req(&unique_string("sanity-controller-vol-from-vol"));
    req.volume_content_source = from_volume(&vol1.volume_id);
    s.create_volume(req).await.expect("CreateVolume");
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should fail when the volume
/// source volume is not found"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_fail_when_the_volume_source_volume_is_not_found() {
    let mut s = sanity!("create_volume_source_volume_not_found");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    require_controller_cap!(s, CtrlCap::CloneVolume, "Volume Cloning not supported");
    let mut req = make_create_volume_req(&unique_string("sanity-controller-vol-from-snap"));
    req.volume_content_source = from_volume(&unique_valid_volume_id());
    expect_error_code(s.create_volume(req).await, Code::NotFound);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should create volume with a
/// volume attribute class"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_create_volume_with_a_volume_attribute_class() {
    let mut s = sanity!("create_volume_with_vac");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    require_controller_cap!(s, CtrlCap::ModifyVolume, "Modify volume not supported");
    let mut req = make_create_volume_req(&unique_string(
        "sanity-controller-vol-with-mutable-parameters",
    ));
    req.mutable_parameters = test_volume_mutable_parameters();
    s.create_volume(req).await.expect("CreateVolume");
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] CreateVolume should not create volume
/// with an invalid volume attribute class"
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_should_not_create_volume_with_an_invalid_volume_attribute_class() {
    let mut s = sanity!("create_volume_with_invalid_vac");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "CreateVolume not supported");
    require_controller_cap!(s, CtrlCap::ModifyVolume, "Modify Volume not supported");
    let mut req = make_create_volume_req(&unique_string(
        "sanity-controller-vol-with-mutable-parameters",
    ));
    req.mutable_parameters = fake_mutable_parameters();
    expect_error_code(s.create_volume(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] DeleteVolume should fail when no volume
/// id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn delete_volume_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("delete_volume_no_id");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "DeleteVolume not supported");
    expect_error_code(s.delete_volume("").await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] DeleteVolume should succeed when an
/// invalid volume id is used"
#[tokio::test(flavor = "multi_thread")]
async fn delete_volume_should_succeed_when_an_invalid_volume_id_is_used() {
    let mut s = sanity!("delete_volume_invalid_id");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "DeleteVolume not supported");
    s.delete_volume(INVALID_VOLUME_ID)
        .await
        .expect("DeleteVolume");
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] DeleteVolume should return appropriate
/// values (no optional values added)"
#[tokio::test(flavor = "multi_thread")]
async fn delete_volume_should_return_appropriate_values_no_optional_values_added() {
    let mut s = sanity!("delete_volume_appropriate");
    require_controller_cap!(s, CtrlCap::CreateDeleteVolume, "DeleteVolume not supported");
    let name = unique_string("sanity-controller-create-appropriate");
    let vol = s
        .must_create_volume(volume_req(&name, required(TEST_VOLUME_SIZE)))
        .await;
    s.delete_volume(&vol.volume_id).await.expect("DeleteVolume");
    s.finish().await;
}

fn validate_req(volume_id: &str, caps: Vec<VolumeCapability>) -> ValidateVolumeCapabilitiesRequest {
    ValidateVolumeCapabilitiesRequest {
        volume_id: volume_id.into(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

/// csi-sanity: "Controller Service [Controller Server] ValidateVolumeCapabilities should fail
/// when no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn validate_volume_capabilities_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("validate_no_id");
    let r =
        s.c.validate_volume_capabilities(validate_req("", vec![]))
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ValidateVolumeCapabilities should fail
/// when no volume capabilities are provided"
#[tokio::test(flavor = "multi_thread")]
async fn validate_volume_capabilities_should_fail_when_no_volume_capabilities_are_provided() {
    let mut s = sanity!("validate_no_caps");
    let name = unique_string("sanity-controller-validate-nocaps");
    let vol = s
        .must_create_volume(volume_req(&name, required(TEST_VOLUME_SIZE)))
        .await;
    let r =
        s.c.validate_volume_capabilities(validate_req(&vol.volume_id, vec![]))
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ValidateVolumeCapabilities should return
/// appropriate values (no optional values added)"
#[tokio::test(flavor = "multi_thread")]
async fn validate_volume_capabilities_should_return_appropriate_values() {
    let mut s = sanity!("validate_appropriate");
    let name = unique_string("sanity-controller-validate");
    let vol = s
        .must_create_volume(volume_req(&name, required(TEST_VOLUME_SIZE)))
        .await;
    let rsp =
        s.c.validate_volume_capabilities(validate_req(&vol.volume_id, vec![snw()]))
            .await
            .expect("ValidateVolumeCapabilities")
            .into_inner();
    if let Some(confirmed) = rsp.confirmed {
        assert!(!confirmed.volume_capabilities.is_empty());
    }
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ValidateVolumeCapabilities should fail
/// when the requested volume does not exist"
#[tokio::test(flavor = "multi_thread")]
async fn validate_volume_capabilities_should_fail_when_the_requested_volume_does_not_exist() {
    let mut s = sanity!("validate_not_found");
    let r =
        s.c.validate_volume_capabilities(validate_req(&unique_valid_volume_id(), vec![snw()]))
            .await;
    expect_error_code(r, Code::NotFound);
    s.finish().await;
}

const NO_CONTROLLER_PUBLISH: &str = "ControllerPublishVolume not supported";

/// csi-sanity: "Controller Service [Controller Server] ControllerPublishVolume should fail when
/// no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn controller_publish_volume_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("controller_publish_no_id");
    require_controller_cap!(s, CtrlCap::PublishUnpublishVolume, NO_CONTROLLER_PUBLISH);
    let r = s
        .controller_publish(ControllerPublishVolumeRequest::default())
        .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ControllerPublishVolume should fail when
/// no node id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn controller_publish_volume_should_fail_when_no_node_id_is_provided() {
    let mut s = sanity!("controller_publish_no_node");
    require_controller_cap!(s, CtrlCap::PublishUnpublishVolume, NO_CONTROLLER_PUBLISH);
    let req = ControllerPublishVolumeRequest {
        volume_id: unique_valid_volume_id(),
        ..Default::default()
    };
    expect_error_code(s.controller_publish(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ControllerPublishVolume should fail when
/// no volume capability is provided"
#[tokio::test(flavor = "multi_thread")]
async fn controller_publish_volume_should_fail_when_no_volume_capability_is_provided() {
    let mut s = sanity!("controller_publish_no_cap");
    require_controller_cap!(s, CtrlCap::PublishUnpublishVolume, NO_CONTROLLER_PUBLISH);
    let req = ControllerPublishVolumeRequest {
        volume_id: unique_valid_volume_id(),
        node_id: unique_valid_node_id(),
        ..Default::default()
    };
    expect_error_code(s.controller_publish(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ControllerPublishVolume should fail when
/// publishing more volumes than the node max attach limit"
#[tokio::test(flavor = "multi_thread")]
async fn controller_publish_volume_should_fail_beyond_the_node_max_attach_limit() {
    let mut s = sanity!("controller_publish_attach_limit");
    require_controller_cap!(s, CtrlCap::PublishUnpublishVolume, NO_CONTROLLER_PUBLISH);
    if !TEST_NODE_VOLUME_ATTACH_LIMIT {
        return s.skip("testnodevolumeattachlimit not enabled").await;
    }
    let ni = s.node_info().await;
    if ni.max_volumes_per_node <= 0 {
        return s.skip("No MaxVolumesPerNode").await;
    }
    for i in 0..ni.max_volumes_per_node {
        let name = unique_string(&format!("sanity-max-attach-limit-vol-{i}"));
        let vol = s.must_create_volume(make_create_volume_req(&name)).await;
        s.must_controller_publish(make_controller_publish_volume_req(
            &vol.volume_id,
            &ni.node_id,
        ))
        .await;
    }
    let name = unique_string("sanity-max-attach-limit-vol+1");
    let vol = s.must_create_volume(make_create_volume_req(&name)).await;
    let r = s
        .controller_publish(make_controller_publish_volume_req(
            &vol.volume_id,
            &ni.node_id,
        ))
        .await;
    assert!(r.is_err(), "publish beyond the attach limit succeeded");
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ControllerPublishVolume should fail when
/// the volume does not exist"
#[tokio::test(flavor = "multi_thread")]
async fn controller_publish_volume_should_fail_when_the_volume_does_not_exist() {
    let mut s = sanity!("controller_publish_volume_not_found");
    require_controller_cap!(s, CtrlCap::PublishUnpublishVolume, NO_CONTROLLER_PUBLISH);
    let req =
        make_controller_publish_volume_req(&unique_valid_volume_id(), &unique_valid_node_id());
    expect_error_code(s.controller_publish(req).await, Code::NotFound);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ControllerPublishVolume should fail when
/// the node does not exist"
#[tokio::test(flavor = "multi_thread")]
async fn controller_publish_volume_should_fail_when_the_node_does_not_exist() {
    let mut s = sanity!("controller_publish_node_not_found");
    require_controller_cap!(s, CtrlCap::PublishUnpublishVolume, NO_CONTROLLER_PUBLISH);
    let name = unique_string("sanity-controller-wrong-node");
    let vol = s.must_create_volume(volume_req(&name, None)).await;
    let req = make_controller_publish_volume_req(&vol.volume_id, &unique_valid_node_id());
    expect_error_code(s.controller_publish(req).await, Code::NotFound);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ControllerPublishVolume should fail when
/// the volume is already published but is incompatible"
#[tokio::test(flavor = "multi_thread")]
async fn controller_publish_volume_should_fail_when_already_published_but_incompatible() {
    let mut s = sanity!("controller_publish_incompatible");
    require_controller_cap!(s, CtrlCap::PublishUnpublishVolume, NO_CONTROLLER_PUBLISH);
    require_controller_cap!(
        s,
        CtrlCap::PublishReadonly,
        "ControllerPublishVolume.readonly field not supported"
    );
    let name = unique_string("sanity-controller-published-incompatible");
    let vol = s.must_create_volume(volume_req(&name, None)).await;
    let ni = s.node_info().await;
    let mut req = make_controller_publish_volume_req(&vol.volume_id, &ni.node_id);
    s.must_controller_publish(req.clone()).await;
    req.readonly = true;
    expect_error_code(s.controller_publish(req).await, Code::AlreadyExists);
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] volume lifecycle should work"
#[tokio::test(flavor = "multi_thread")]
async fn volume_lifecycle_should_work() {
    let mut s = sanity!("volume_lifecycle");
    require_controller_cap!(
        s,
        CtrlCap::PublishUnpublishVolume,
        "Controller Publish, UnpublishVolume not supported"
    );
    s.volume_lifecycle(1).await;
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] volume lifecycle should be idempotent"
#[tokio::test(flavor = "multi_thread")]
async fn volume_lifecycle_should_be_idempotent() {
    let mut s = sanity!("volume_lifecycle_idempotent");
    require_controller_cap!(
        s,
        CtrlCap::PublishUnpublishVolume,
        "Controller Publish, UnpublishVolume not supported"
    );
    s.volume_lifecycle(IDEMPOTENT_COUNT).await;
    s.finish().await;
}

/// csi-sanity: "Controller Service [Controller Server] ControllerUnpublishVolume should fail
/// when no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn controller_unpublish_volume_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("controller_unpublish_no_id");
    require_controller_cap!(
        s,
        CtrlCap::PublishUnpublishVolume,
        "ControllerUnpublishVolume not supported"
    );
    let r =
        s.c.controller_unpublish_volume(ControllerUnpublishVolumeRequest::default())
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

// =============================================================================================
// ListSnapshots [Controller Server]

const NO_LIST_SNAPSHOTS: &str = "ListSnapshots not supported";

/// csi-sanity: "ListSnapshots [Controller Server] should return appropriate values (no optional
/// values added)"
#[tokio::test(flavor = "multi_thread")]
async fn list_snapshots_should_return_appropriate_values_no_optional_values_added() {
    let mut s = sanity!("list_snapshots_appropriate");
    require_controller_cap!(s, CtrlCap::ListSnapshots, NO_LIST_SNAPSHOTS);
    let list = s.list_snapshots(ListSnapshotsRequest::default()).await;
    for e in &list.entries {
        verify_snapshot_info(e.snapshot.as_ref());
    }
    s.finish().await;
}

/// Three snapshots of three volumes, the middle one being the one a filter must find:
/// `<prefix>-1` unrelated, `target`, `<prefix>-2` unrelated.
async fn three_snapshots(s: &mut Sanity, tag: &str) -> Snapshot {
    let mut target = None;
    for which in ["unrelated-{}-1", "target-{}", "unrelated-{}-2"] {
        let which = which.replace("{}", tag);
        let vol = make_create_volume_req(&unique_string(&format!("listSnapshots-volume-{which}")));
        let name = unique_string(&format!("listSnapshots-snapshot-{which}"));
        let (snap, _) = s.must_create_snapshot_from_volume_request(vol, &name).await;
        if which.starts_with("target") {
            target = Some(snap);
        }
    }
    target.unwrap()
}

/// csi-sanity: "ListSnapshots [Controller Server] should return snapshots that match the
/// specified snapshot id"
#[tokio::test(flavor = "multi_thread")]
async fn list_snapshots_should_return_snapshots_that_match_the_specified_snapshot_id() {
    let mut s = sanity!("list_snapshots_by_id");
    require_controller_cap!(s, CtrlCap::ListSnapshots, NO_LIST_SNAPSHOTS);
    let target = three_snapshots(&mut s, "s").await;
    let list = s
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: target.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(list.entries.len(), 1, "{list:?}");
    let found = list.entries[0].snapshot.as_ref();
    verify_snapshot_info(found);
    assert_eq!(found.unwrap().snapshot_id, target.snapshot_id);
    s.finish().await;
}

/// csi-sanity: "ListSnapshots [Controller Server] should return empty when the specified
/// snapshot id does not exist"
#[tokio::test(flavor = "multi_thread")]
async fn list_snapshots_should_return_empty_when_the_specified_snapshot_id_does_not_exist() {
    let mut s = sanity!("list_snapshots_unknown_id");
    require_controller_cap!(s, CtrlCap::ListSnapshots, NO_LIST_SNAPSHOTS);
    let list = s
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: "none-exist-id".into(),
            ..Default::default()
        })
        .await;
    assert!(list.entries.is_empty(), "{list:?}");
    s.finish().await;
}

/// csi-sanity: "ListSnapshots [Controller Server] should return snapshots that match the
/// specified source volume id"
#[tokio::test(flavor = "multi_thread")]
async fn list_snapshots_should_return_snapshots_that_match_the_specified_source_volume_id() {
    let mut s = sanity!("list_snapshots_by_source");
    require_controller_cap!(s, CtrlCap::ListSnapshots, NO_LIST_SNAPSHOTS);
    let target = three_snapshots(&mut s, "v").await;
    let list = s
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: target.source_volume_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(list.entries.len(), 1, "{list:?}");
    let found = list.entries[0].snapshot.as_ref();
    verify_snapshot_info(found);
    assert_eq!(found.unwrap().source_volume_id, target.source_volume_id);
    s.finish().await;
}

/// csi-sanity: "ListSnapshots [Controller Server] should return empty when the specified source
/// volume id does not exist"
#[tokio::test(flavor = "multi_thread")]
async fn list_snapshots_should_return_empty_when_the_specified_source_volume_id_does_not_exist() {
    let mut s = sanity!("list_snapshots_unknown_source");
    require_controller_cap!(s, CtrlCap::ListSnapshots, NO_LIST_SNAPSHOTS);
    let list = s
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: unique_valid_volume_id(),
            ..Default::default()
        })
        .await;
    assert!(list.entries.is_empty(), "{list:?}");
    s.finish().await;
}

/// csi-sanity: "ListSnapshots [Controller Server] check the presence of new snapshots in the
/// snapshot list"
#[tokio::test(flavor = "multi_thread")]
async fn list_snapshots_check_the_presence_of_new_snapshots_in_the_snapshot_list() {
    let mut s = sanity!("list_snapshots_presence");
    require_controller_cap!(s, CtrlCap::ListSnapshots, NO_LIST_SNAPSHOTS);
    let all = ListSnapshotsRequest::default();
    let total = s.list_snapshots(all.clone()).await.entries.len();
    let vol = make_create_volume_req(&unique_string("listSnapshots-volume-3"));
    let (snap, _) = s
        .must_create_snapshot_from_volume_request(vol, &unique_string("listSnapshots-snapshot-3"))
        .await;
    assert_eq!(s.list_snapshots(all.clone()).await.entries.len(), total + 1);
    s.delete_snapshot(&snap.snapshot_id)
        .await
        .expect("DeleteSnapshot");
    assert_eq!(s.list_snapshots(all).await.entries.len(), total);
    s.finish().await;
}

/// csi-sanity: "ListSnapshots [Controller Server] should return next token when a limited
/// number of entries are requested"
#[tokio::test(flavor = "multi_thread")]
async fn list_snapshots_should_return_next_token_when_a_limited_number_of_entries_are_requested() {
    let mut s = sanity!("list_snapshots_paging");
    require_controller_cap!(s, CtrlCap::ListSnapshots, NO_LIST_SNAPSHOTS);
    let (min_snapshot_count, max_entries) = (5, 2);
    let initial = s
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .entries
        .len();
    let mut total = initial;
    if initial < min_snapshot_count {
        for i in 1..=min_snapshot_count - initial {
            let vol = make_create_volume_req(&unique_string(&format!("volume{i}")));
            let (snap, _) = s
                .must_create_snapshot_from_volume_request(
                    vol,
                    &unique_string(&format!("snapshot{i}")),
                )
                .await;
            verify_snapshot_info(Some(&snap));
        }
        total = min_snapshot_count;
    }
    let page = s
        .list_snapshots(ListSnapshotsRequest {
            max_entries,
            ..Default::default()
        })
        .await;
    assert_eq!(page.entries.len(), max_entries as usize);
    let rest = s
        .list_snapshots(ListSnapshotsRequest {
            starting_token: page.next_token,
            ..Default::default()
        })
        .await;
    assert_eq!(rest.entries.len(), total - max_entries as usize);
    s.finish().await;
}

// =============================================================================================
// DeleteSnapshot [Controller Server]

const NO_SNAPSHOTS: &str = "CreateSnapshot/DeleteSnapshot not supported";

/// csi-sanity: "DeleteSnapshot [Controller Server] should fail when no snapshot id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn delete_snapshot_should_fail_when_no_snapshot_id_is_provided() {
    let mut s = sanity!("delete_snapshot_no_id");
    require_controller_cap!(s, CtrlCap::CreateDeleteSnapshot, NO_SNAPSHOTS);
    expect_error_code(s.delete_snapshot("").await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "DeleteSnapshot [Controller Server] should succeed when an invalid snapshot id is
/// used"
#[tokio::test(flavor = "multi_thread")]
async fn delete_snapshot_should_succeed_when_an_invalid_snapshot_id_is_used() {
    let mut s = sanity!("delete_snapshot_invalid_id");
    require_controller_cap!(s, CtrlCap::CreateDeleteSnapshot, NO_SNAPSHOTS);
    s.delete_snapshot("reallyfakesnapshotid")
        .await
        .expect("DeleteSnapshot");
    s.finish().await;
}

/// csi-sanity: "DeleteSnapshot [Controller Server] should return appropriate values (no
/// optional values added)" (the delete itself happens in the cleanup)
#[tokio::test(flavor = "multi_thread")]
async fn delete_snapshot_should_return_appropriate_values_no_optional_values_added() {
    let mut s = sanity!("delete_snapshot_appropriate");
    require_controller_cap!(s, CtrlCap::CreateDeleteSnapshot, NO_SNAPSHOTS);
    let vol = make_create_volume_req(&unique_string("DeleteSnapshot-volume-1"));
    let vol = s
        .create_volume(vol)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    let name = unique_string("DeleteSnapshot-snapshot-1");
    s.must_create_snapshot(make_create_snapshot_req(&name, &vol.volume_id))
        .await;
    s.finish().await;
}

// =============================================================================================
// CreateSnapshot [Controller Server]

/// csi-sanity: "CreateSnapshot [Controller Server] should fail when no name is provided"
#[tokio::test(flavor = "multi_thread")]
async fn create_snapshot_should_fail_when_no_name_is_provided() {
    let mut s = sanity!("create_snapshot_no_name");
    require_controller_cap!(s, CtrlCap::CreateDeleteSnapshot, NO_SNAPSHOTS);
    let r = s
        .create_snapshot(make_create_snapshot_req("", "testId"))
        .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "CreateSnapshot [Controller Server] should fail when no source volume id is
/// provided"
#[tokio::test(flavor = "multi_thread")]
async fn create_snapshot_should_fail_when_no_source_volume_id_is_provided() {
    let mut s = sanity!("create_snapshot_no_source");
    require_controller_cap!(s, CtrlCap::CreateDeleteSnapshot, NO_SNAPSHOTS);
    let r = s
        .create_snapshot(make_create_snapshot_req("name", ""))
        .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "CreateSnapshot [Controller Server] should succeed when requesting to create a
/// snapshot with already existing name and same source volume ID"
#[tokio::test(flavor = "multi_thread")]
async fn create_snapshot_should_succeed_with_already_existing_name_and_same_source_volume_id() {
    let mut s = sanity!("create_snapshot_twice_same");
    require_controller_cap!(s, CtrlCap::CreateDeleteSnapshot, NO_SNAPSHOTS);
    let vol = s
        .must_create_volume(make_create_volume_req(&unique_string(
            "CreateSnapshot-volume-1",
        )))
        .await;
    let req = make_create_snapshot_req(&unique_string("CreateSnapshot-snapshot-1"), &vol.volume_id);
    s.must_create_snapshot(req.clone()).await;
    s.must_create_snapshot(req).await;
    s.finish().await;
}

/// csi-sanity: "CreateSnapshot [Controller Server] should fail when requesting to create a
/// snapshot with already existing name and different source volume ID"
#[tokio::test(flavor = "multi_thread")]
async fn create_snapshot_should_fail_with_already_existing_name_and_different_source_volume_id() {
    let mut s = sanity!("create_snapshot_twice_different");
    require_controller_cap!(s, CtrlCap::CreateDeleteSnapshot, NO_SNAPSHOTS);
    let name = unique_string("CreateSnapshot-snapshot-2");
    let vol = make_create_volume_req(&unique_string("CreateSnapshot-volume-2"));
    s.must_create_snapshot_from_volume_request(vol, &name).await;
    let vol2 = s
        .must_create_volume(make_create_volume_req(&unique_string(
            "CreateSnapshot-volume-3",
        )))
        .await;
    let r = s
        .create_snapshot(make_create_snapshot_req(&name, &vol2.volume_id))
        .await;
    expect_error_code(r, Code::AlreadyExists);
    s.finish().await;
}

/// csi-sanity: "CreateSnapshot [Controller Server] should succeed when creating snapshot with
/// maximum-length name"
#[tokio::test(flavor = "multi_thread")]
async fn create_snapshot_should_succeed_when_creating_snapshot_with_maximum_length_name() {
    let mut s = sanity!("create_snapshot_maxlen");
    require_controller_cap!(s, CtrlCap::CreateDeleteSnapshot, NO_SNAPSHOTS);
    let vol = s
        .must_create_volume(make_create_volume_req(&unique_string(
            "CreateSnapshot-volume-maxlen-name",
        )))
        .await;
    let name = unique_string_with_length("CreateSnapshot-snapshot-maxlen", MAX_NAME_LENGTH);
    let req = make_create_snapshot_req(&name, &vol.volume_id);
    s.must_create_snapshot(req.clone()).await;
    s.must_create_snapshot(req).await;
    s.finish().await;
}

// =============================================================================================
// ExpandVolume [Controller Server] (its Resources has no NodeClient)

/// csi-sanity: "ExpandVolume [Controller Server] should fail if no volume id is given"
#[tokio::test(flavor = "multi_thread")]
async fn expand_volume_should_fail_if_no_volume_id_is_given() {
    let mut s = sanity!("expand_volume_no_id");
    s.node_client = false;
    require_controller_cap!(
        s,
        CtrlCap::ExpandVolume,
        "ControllerExpandVolume not supported"
    );
    let r =
        s.c.controller_expand_volume(make_expand_volume_req(""))
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "ExpandVolume [Controller Server] should fail if no capacity range is given"
/// (csi-sanity leaves the volume ID empty here too)
#[tokio::test(flavor = "multi_thread")]
async fn expand_volume_should_fail_if_no_capacity_range_is_given() {
    let mut s = sanity!("expand_volume_no_range");
    s.node_client = false;
    require_controller_cap!(
        s,
        CtrlCap::ExpandVolume,
        "ControllerExpandVolume not supported"
    );
    let r =
        s.c.controller_expand_volume(ControllerExpandVolumeRequest::default())
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "ExpandVolume [Controller Server] should work"
#[tokio::test(flavor = "multi_thread")]
async fn expand_volume_should_work() {
    let mut s = sanity!("expand_volume_work");
    s.node_client = false;
    require_controller_cap!(
        s,
        CtrlCap::ExpandVolume,
        "ControllerExpandVolume not supported"
    );
    let name = unique_string("sanity-expand-volume");
    let vol = s
        .must_create_volume(volume_req(&name, required(TEST_VOLUME_SIZE)))
        .await;
    let rsp =
        s.c.controller_expand_volume(make_expand_volume_req(&vol.volume_id))
            .await
            .expect("ControllerExpandVolume")
            .into_inner();
    assert_eq!(rsp.capacity_bytes, TEST_VOLUME_EXPAND_SIZE);
    s.finish().await;
}

// =============================================================================================
// ModifyVolume [Controller Server] (its Resources has no NodeClient)

const NO_MODIFY: &str = "ControllerModifyVolume not supported";

/// csi-sanity: "ModifyVolume [Controller Server] should fail if no volume id is given"
#[tokio::test(flavor = "multi_thread")]
async fn modify_volume_should_fail_if_no_volume_id_is_given() {
    let mut s = sanity!("modify_volume_no_id");
    s.node_client = false;
    require_controller_cap!(s, CtrlCap::ModifyVolume, NO_MODIFY);
    let r =
        s.c.controller_modify_volume(make_modify_volume_req(""))
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "ModifyVolume [Controller Server] should fail if volume does not exist"
#[tokio::test(flavor = "multi_thread")]
async fn modify_volume_should_fail_if_volume_does_not_exist() {
    let mut s = sanity!("modify_volume_not_found");
    s.node_client = false;
    require_controller_cap!(s, CtrlCap::ModifyVolume, NO_MODIFY);
    let r =
        s.c.controller_modify_volume(make_modify_volume_req("non-existing-volume-id"))
            .await;
    expect_error_code(r, Code::NotFound);
    s.finish().await;
}

/// The ModifyVolume specs' subject: a default volume, optionally created with the (empty)
/// TestVolumeMutableParameters.
async fn modify_subject(s: &mut Sanity) -> Volume {
    let req = make_create_volume_req(&unique_string("sanity-modify-volume"));
    s.must_create_volume(req).await
}

/// The volume of the "created with a volume attribute class" specs.
async fn modify_subject_with_vac(s: &mut Sanity) -> Volume {
    let mut req = make_create_volume_req(&unique_string("sanity-modify-volume-with-vac"));
    req.mutable_parameters = test_volume_mutable_parameters();
    s.must_create_volume(req).await
}

/// csi-sanity: "ModifyVolume [Controller Server] should fail if specified mutable parameters are
/// not supported by the volume"
#[tokio::test(flavor = "multi_thread")]
async fn modify_volume_should_fail_if_specified_mutable_parameters_are_not_supported() {
    let mut s = sanity!("modify_volume_bad_params");
    s.node_client = false;
    require_controller_cap!(s, CtrlCap::ModifyVolume, NO_MODIFY);
    let vol = modify_subject(&mut s).await;
    let mut req = make_modify_volume_req(&vol.volume_id);
    req.mutable_parameters = fake_mutable_parameters();
    let r = s.c.controller_modify_volume(req).await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "ModifyVolume [Controller Server] should modify a volume created without a
/// volume attribute class"
#[tokio::test(flavor = "multi_thread")]
async fn modify_volume_should_modify_a_volume_created_without_a_volume_attribute_class() {
    let mut s = sanity!("modify_volume_without_vac");
    s.node_client = false;
    require_controller_cap!(s, CtrlCap::ModifyVolume, NO_MODIFY);
    let vol = modify_subject(&mut s).await;
    s.c.controller_modify_volume(make_modify_volume_req(&vol.volume_id))
        .await
        .expect("ControllerModifyVolume");
    s.finish().await;
}

/// csi-sanity: "ModifyVolume [Controller Server] should modify a volume created with a volume
/// attribute class"
#[tokio::test(flavor = "multi_thread")]
async fn modify_volume_should_modify_a_volume_created_with_a_volume_attribute_class() {
    let mut s = sanity!("modify_volume_with_vac");
    s.node_client = false;
    require_controller_cap!(s, CtrlCap::ModifyVolume, NO_MODIFY);
    let vol = modify_subject_with_vac(&mut s).await;
    s.c.controller_modify_volume(make_modify_volume_req(&vol.volume_id))
        .await
        .expect("ControllerModifyVolume");
    s.finish().await;
}

/// csi-sanity: "ModifyVolume [Controller Server] should fail to modify a volume created with a
/// volume attribute class if new mutable parameters are not supported by volume"
#[tokio::test(flavor = "multi_thread")]
async fn modify_volume_should_fail_to_modify_with_unsupported_new_mutable_parameters() {
    let mut s = sanity!("modify_volume_vac_bad_params");
    s.node_client = false;
    require_controller_cap!(s, CtrlCap::ModifyVolume, NO_MODIFY);
    let vol = modify_subject_with_vac(&mut s).await;
    let mut req = make_modify_volume_req(&vol.volume_id);
    req.mutable_parameters = fake_mutable_parameters();
    let r = s.c.controller_modify_volume(req).await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

// =============================================================================================
// Node Service

/// csi-sanity: "Node Service NodeGetCapabilities should return appropriate capabilities"
#[tokio::test(flavor = "multi_thread")]
async fn node_get_capabilities_should_return_appropriate_capabilities() {
    let mut s = sanity!("node_get_capabilities");
    let known = [
        NodeCap::Unknown as i32,
        NodeCap::StageUnstageVolume as i32,
        NodeCap::GetVolumeStats as i32,
        NodeCap::ExpandVolume as i32,
        NodeCap::SingleNodeMultiWriter as i32,
        NodeCap::VolumeMountGroup as i32,
        DEPRECATED_NODE_VOLUME_CONDITION,
    ];
    for t in node_cap_types(&mut s.n).await {
        assert!(known.contains(&t), "Unknown capability: {t}");
    }
    s.finish().await;
}

/// csi-sanity: "Node Service NodeGetInfo should return appropriate values"
#[tokio::test(flavor = "multi_thread")]
async fn node_get_info_should_return_appropriate_values() {
    let mut s = sanity!("node_get_info");
    let constrained = s
        .plugin_service(service::Type::VolumeAccessibilityConstraints)
        .await;
    let ni = s.node_info().await;
    assert!(ni.max_volumes_per_node >= 0);
    if constrained {
        assert!(ni.accessible_topology.is_some());
    }
    s.finish().await;
}

/// csi-sanity: "Node Service NodePublishVolume should fail when no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_publish_volume_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("node_publish_no_id");
    let r =
        s.n.node_publish_volume(NodePublishVolumeRequest::default())
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodePublishVolume should fail when no target path is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_publish_volume_should_fail_when_no_target_path_is_provided() {
    let mut s = sanity!("node_publish_no_target");
    let req = NodePublishVolumeRequest {
        volume_id: unique_valid_volume_id(),
        ..Default::default()
    };
    expect_error_code(s.n.node_publish_volume(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodePublishVolume should fail when no volume capability is
/// provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_publish_volume_should_fail_when_no_volume_capability_is_provided() {
    let mut s = sanity!("node_publish_no_cap");
    let req = NodePublishVolumeRequest {
        volume_id: unique_valid_volume_id(),
        target_path: s.target(),
        ..Default::default()
    };
    expect_error_code(s.n.node_publish_volume(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodePublishVolume with single node multi writer capability should
/// fail when volume with single node single writer access mode is already mounted at a
/// different target path"
/// (beyond v5.4: on csi-test's master, unreleased v5.5)
#[tokio::test(flavor = "multi_thread")]
async fn node_publish_volume_should_fail_when_single_writer_volume_is_mounted_elsewhere() {
    let mut s = sanity!("node_publish_single_writer");
    require_node_cap!(
        s,
        NodeCap::SingleNodeMultiWriter,
        "Service does not have single node multi writer capability"
    );
    let name = unique_string("sanity-node-publish-single-node-single-writer");
    let cap = test_cap(Mode::SingleNodeSingleWriter);
    let vol = s.create_volume_with_capability(&name, cap.clone()).await;
    let nid = s.node_info().await;
    let conpub = s
        .controller_publish_with_capability(&vol, &nid.node_id, cap.clone())
        .await;
    s.node_stage_with_capability(&vol, conpub.as_ref(), cap.clone())
        .await;
    s.node_publish_with_capability(&vol, conpub.as_ref(), cap.clone())
        .await;
    let other = format!("{}/other_target", s.target_path);
    let req = s.node_publish_req(&vol, conpub.as_ref(), cap, other).await;
    let r = s.n.node_publish_volume(req).await;
    expect_error_code(r, Code::FailedPrecondition);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeUnpublishVolume should fail when no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_unpublish_volume_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("node_unpublish_no_id");
    expect_error_code(
        s.node_unpublish("", "").await.map(Response::new),
        Code::InvalidArgument,
    );
    s.finish().await;
}

/// csi-sanity: "Node Service NodeUnpublishVolume should fail when no target path is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_unpublish_volume_should_fail_when_no_target_path_is_provided() {
    let mut s = sanity!("node_unpublish_no_target");
    let r = s.node_unpublish(&unique_valid_volume_id(), "").await;
    expect_error_code(r.map(Response::new), Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeUnpublishVolume should remove target path"
#[tokio::test(flavor = "multi_thread")]
async fn node_unpublish_volume_should_remove_target_path() {
    let mut s = sanity!("node_unpublish_removes_target");
    let vol = s
        .create_stage_publish(&unique_string("sanity-node-unpublish-volume"))
        .await;
    let target = s.target();
    assert!(
        std::path::Path::new(&target).exists(),
        "path {target} should have been created by CSI driver"
    );
    s.node_unpublish(&vol.volume_id, &target)
        .await
        .expect("NodeUnpublishVolume");
    assert!(
        !std::path::Path::new(&target).exists(),
        "path {target} should have been removed by the CSI driver during NodeUnpublishVolume"
    );
    s.finish().await;
}

fn stage_req(
    volume_id: String,
    staging: String,
    cap: Option<VolumeCapability>,
) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id,
        staging_target_path: staging,
        volume_capability: cap,
        publish_context: HashMap::from([("device".into(), "/dev/mock".into())]),
        ..Default::default()
    }
}

/// csi-sanity: "Node Service NodeStageVolume should fail when no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_stage_volume_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("node_stage_no_id");
    require_node_cap!(
        s,
        NodeCap::StageUnstageVolume,
        "NodeStageVolume not supported"
    );
    let req = stage_req(String::new(), s.staging_path.clone(), Some(snw()));
    expect_error_code(s.n.node_stage_volume(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeStageVolume should fail when no staging target path is
/// provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_stage_volume_should_fail_when_no_staging_target_path_is_provided() {
    let mut s = sanity!("node_stage_no_path");
    require_node_cap!(
        s,
        NodeCap::StageUnstageVolume,
        "NodeStageVolume not supported"
    );
    let req = stage_req(unique_valid_volume_id(), String::new(), Some(snw()));
    expect_error_code(s.n.node_stage_volume(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeStageVolume should fail when no volume capability is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_stage_volume_should_fail_when_no_volume_capability_is_provided() {
    let mut s = sanity!("node_stage_no_cap");
    require_node_cap!(
        s,
        NodeCap::StageUnstageVolume,
        "NodeStageVolume not supported"
    );
    let vol = s
        .must_create_volume(make_create_volume_req(&unique_string(
            "sanity-node-stage-nocaps",
        )))
        .await;
    let req = stage_req(vol.volume_id, s.staging_path.clone(), None);
    expect_error_code(s.n.node_stage_volume(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeUnstageVolume should fail when no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_unstage_volume_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("node_unstage_no_id");
    require_node_cap!(
        s,
        NodeCap::StageUnstageVolume,
        "NodeUnstageVolume not supported"
    );
    expect_error_code(
        s.node_unstage("").await.map(Response::new),
        Code::InvalidArgument,
    );
    s.finish().await;
}

/// csi-sanity: "Node Service NodeUnstageVolume should fail when no staging target path is
/// provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_unstage_volume_should_fail_when_no_staging_target_path_is_provided() {
    let mut s = sanity!("node_unstage_no_path");
    require_node_cap!(
        s,
        NodeCap::StageUnstageVolume,
        "NodeUnstageVolume not supported"
    );
    let r =
        s.n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: unique_valid_volume_id(),
            staging_target_path: String::new(),
        })
        .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

fn stats_req(volume_id: String, volume_path: &str) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id,
        volume_path: volume_path.into(),
        ..Default::default()
    }
}

/// csi-sanity: "Node Service NodeGetVolumeStats should fail when no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_get_volume_stats_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("node_stats_no_id");
    require_node_cap!(s, NodeCap::GetVolumeStats, "NodeGetVolume not supported");
    let r =
        s.n.node_get_volume_stats(stats_req(String::new(), "some/path"))
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeGetVolumeStats should fail when no volume path is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_get_volume_stats_should_fail_when_no_volume_path_is_provided() {
    let mut s = sanity!("node_stats_no_path");
    require_node_cap!(s, NodeCap::GetVolumeStats, "NodeGetVolume not supported");
    let r =
        s.n.node_get_volume_stats(stats_req(unique_valid_volume_id(), ""))
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeGetVolumeStats should fail when volume is not found"
#[tokio::test(flavor = "multi_thread")]
async fn node_get_volume_stats_should_fail_when_volume_is_not_found() {
    let mut s = sanity!("node_stats_not_found");
    require_node_cap!(s, NodeCap::GetVolumeStats, "NodeGetVolume not supported");
    let r =
        s.n.node_get_volume_stats(stats_req(unique_valid_volume_id(), "some/path"))
            .await;
    expect_error_code(r, Code::NotFound);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeGetVolumeStats should fail when volume does not exist on the
/// specified path"
#[tokio::test(flavor = "multi_thread")]
async fn node_get_volume_stats_should_fail_when_volume_does_not_exist_on_the_specified_path() {
    let mut s = sanity!("node_stats_wrong_path");
    require_node_cap!(s, NodeCap::GetVolumeStats, "NodeGetVolume not supported");
    let vol = s
        .create_stage_publish(&unique_string("sanity-node-get-volume-stats"))
        .await;
    let r =
        s.n.node_get_volume_stats(stats_req(vol.volume_id, "some/path"))
            .await;
    expect_error_code(r, Code::NotFound);
    s.finish().await;
}

const NO_NODE_EXPAND: &str = "NodeExpandVolume not supported";

/// csi-sanity: "Node Service NodeExpandVolume should fail when no volume id is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_expand_volume_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("node_expand_no_id");
    require_node_cap!(s, NodeCap::ExpandVolume, NO_NODE_EXPAND);
    let req = NodeExpandVolumeRequest {
        volume_path: s.target_path.clone(),
        volume_capability: Some(snw()),
        ..Default::default()
    };
    expect_error_code(s.n.node_expand_volume(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeExpandVolume should fail when no volume path is provided"
#[tokio::test(flavor = "multi_thread")]
async fn node_expand_volume_should_fail_when_no_volume_path_is_provided() {
    let mut s = sanity!("node_expand_no_path");
    require_node_cap!(s, NodeCap::ExpandVolume, NO_NODE_EXPAND);
    let vol = s
        .create_volume_with_capability(&unique_string("sanity-node-expand-volume-valid-id"), snw())
        .await;
    let req = NodeExpandVolumeRequest {
        volume_id: vol.volume_id,
        volume_capability: Some(snw()),
        ..Default::default()
    };
    expect_error_code(s.n.node_expand_volume(req).await, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeExpandVolume should fail when volume is not found"
#[tokio::test(flavor = "multi_thread")]
async fn node_expand_volume_should_fail_when_volume_is_not_found() {
    let mut s = sanity!("node_expand_not_found");
    require_node_cap!(s, NodeCap::ExpandVolume, NO_NODE_EXPAND);
    let req = NodeExpandVolumeRequest {
        volume_id: unique_valid_volume_id(),
        volume_path: "some/path".into(),
        ..Default::default()
    };
    expect_error_code(s.n.node_expand_volume(req).await, Code::NotFound);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeExpandVolume should work if node-expand is called after
/// node-publish"
#[tokio::test(flavor = "multi_thread")]
async fn node_expand_volume_should_work_if_node_expand_is_called_after_node_publish() {
    let mut s = sanity!("node_expand_after_publish");
    require_node_cap!(s, NodeCap::ExpandVolume, NO_NODE_EXPAND);
    let name = unique_string("sanity-node-expand-volume");
    let vol = s.create_volume_with_capability(&name, snw()).await;
    if s.plugin_service(service::Type::ControllerService).await
        && s.controller_cap(CtrlCap::ExpandVolume).await
    {
        let rsp =
            s.c.controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                capacity_range: required(TEST_VOLUME_EXPAND_SIZE),
                ..Default::default()
            })
            .await
            .expect("ControllerExpandVolume")
            .into_inner();
        assert_eq!(rsp.capacity_bytes, TEST_VOLUME_EXPAND_SIZE);
    }
    let nid = s.node_info().await;
    let conpub = s
        .controller_publish_with_capability(&vol, &nid.node_id, snw())
        .await;
    s.node_stage_with_capability(&vol, conpub.as_ref(), snw())
        .await;
    s.node_publish_with_capability(&vol, conpub.as_ref(), snw())
        .await;
    let req = NodeExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        volume_path: s.target(),
        capacity_range: required(TEST_VOLUME_EXPAND_SIZE),
        ..Default::default()
    };
    s.n.node_expand_volume(req)
        .await
        .expect("while expanding volume on node");
    s.finish().await;
}

/// csi-sanity: "Node Service NodeGetVolumeHealth should fail when no volume id is provided"
/// (beyond v5.4: loopvol's own spec for a v1.13 RPC)
#[tokio::test(flavor = "multi_thread")]
async fn node_get_volume_health_should_fail_when_no_volume_id_is_provided() {
    let mut s = sanity!("node_health_no_id", OPT_IN);
    require_node_cap!(
        s,
        NodeCap::GetVolumeHealth,
        "NodeGetVolumeHealth not supported"
    );
    let r =
        s.n.node_get_volume_health(NodeGetVolumeHealthRequest::default())
            .await;
    expect_error_code(r, Code::InvalidArgument);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeGetVolumeHealth should return health for a valid volume"
/// (beyond v5.4: loopvol's own spec for a v1.13 RPC)
#[tokio::test(flavor = "multi_thread")]
async fn node_get_volume_health_should_return_health_for_a_valid_volume() {
    let mut s = sanity!("node_health_valid", OPT_IN);
    require_node_cap!(
        s,
        NodeCap::GetVolumeHealth,
        "NodeGetVolumeHealth not supported"
    );
    let vol = s
        .create_stage_publish(&unique_string("sanity-node-get-volume-health"))
        .await;
    let rsp =
        s.n.node_get_volume_health(NodeGetVolumeHealthRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("NodeGetVolumeHealth")
        .into_inner();
    let health = rsp.volume_health.expect("volume health is nil");
    assert_eq!(health.volume_id, vol.volume_id);
    s.finish().await;
}

/// csi-sanity: "Node Service NodeGetStorageHealth should return appropriate response"
/// (beyond v5.4: loopvol's own spec for a v1.13 RPC)
#[tokio::test(flavor = "multi_thread")]
async fn node_get_storage_health_should_return_appropriate_response() {
    let mut s = sanity!("node_storage_health", OPT_IN);
    require_node_cap!(
        s,
        NodeCap::GetStorageHealth,
        "NodeGetStorageHealth not supported"
    );
    s.n.node_get_storage_health(NodeGetStorageHealthRequest::default())
        .await
        .expect("NodeGetStorageHealth");
    s.finish().await;
}

/// csi-sanity: "Node Service should work"
#[tokio::test(flavor = "multi_thread")]
async fn node_service_should_work() {
    let mut s = sanity!("node_should_work");
    if !s.plugin_service(service::Type::ControllerService).await {
        return s
            .skip("Controller Service not provided: CreateVolume not supported")
            .await;
    }
    s.run_controller_test(1).await;
    s.finish().await;
}

/// csi-sanity: "Node Service should be idempotent"
#[tokio::test(flavor = "multi_thread")]
async fn node_service_should_be_idempotent() {
    let mut s = sanity!("node_should_be_idempotent");
    if !s.plugin_service(service::Type::ControllerService).await {
        return s
            .skip("Controller Service not provided: CreateVolume not supported")
            .await;
    }
    s.run_controller_test(IDEMPOTENT_COUNT).await;
    s.finish().await;
}
