//! The CSI calls the benchmark makes, shaped the way the Kubernetes sidecars and kubelet make
//! them: one HTTP/2 connection shared by every worker, CreateVolume with a capacity range and a
//! mount capability, NodeStage on a staging dir kubelet created, NodePublish on a target whose
//! parent kubelet created.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::identity_client::IdentityClient;
use loopvol::csi::node_client::NodeClient;
use loopvol::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
use loopvol::csi::*;
use provisioner::{Allocation, FsType};
use tonic::transport::{Channel, Endpoint};

/// Clients over one channel; cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct Csi {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

pub fn mount_capability(fs: FsType) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.as_str().to_string(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Csi {
    pub async fn connect(socket: &Path) -> anyhow::Result<Csi> {
        let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))?
            .connect()
            .await
            .with_context(|| format!("connect to {}", socket.display()))?;
        Ok(Csi {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }

    pub async fn probe(&self) -> anyhow::Result<()> {
        let ready = self
            .identity
            .clone()
            .probe(ProbeRequest {})
            .await
            .context("Probe")?
            .into_inner()
            .ready;
        anyhow::ensure!(ready != Some(false), "Probe answered not ready");
        Ok(())
    }

    /// NodeGetCapabilities: a call the driver answers from memory, i.e. the cost of a gRPC
    /// round trip over the socket alone.
    pub async fn node_capabilities(&self) -> anyhow::Result<()> {
        self.node
            .clone()
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .context("NodeGetCapabilities")?;
        Ok(())
    }

    /// CreateVolume of exactly `bytes`; returns the volume ID.
    pub async fn create(
        &self,
        name: &str,
        bytes: u64,
        fs: FsType,
        allocation: Allocation,
    ) -> anyhow::Result<String> {
        let params = HashMap::from([("allocation".to_string(), allocation.as_str().to_string())]);
        self.create_with(name, bytes, fs, params).await
    }

    /// [`Csi::create`] with these StorageClass parameters.
    pub async fn create_with(
        &self,
        name: &str,
        bytes: u64,
        fs: FsType,
        parameters: HashMap<String, String>,
    ) -> anyhow::Result<String> {
        let req = CreateVolumeRequest {
            name: name.to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability(fs)],
            parameters,
            ..Default::default()
        };
        let vol = self
            .controller
            .clone()
            .create_volume(req)
            .await
            .with_context(|| format!("CreateVolume {name}"))?
            .into_inner()
            .volume
            .context("CreateVolume returned no volume")?;
        Ok(vol.volume_id)
    }

    /// ControllerModifyVolume with these mutable parameters.
    pub async fn modify(&self, id: &str, params: &[(String, String)]) -> anyhow::Result<()> {
        self.controller
            .clone()
            .controller_modify_volume(ControllerModifyVolumeRequest {
                volume_id: id.to_string(),
                mutable_parameters: params.iter().cloned().collect(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("ControllerModifyVolume {id}"))?;
        Ok(())
    }

    pub async fn delete(&self, id: &str) -> anyhow::Result<()> {
        self.controller
            .clone()
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("DeleteVolume {id}"))?;
        Ok(())
    }

    pub async fn stage(&self, id: &str, staging: &Path, fs: FsType) -> anyhow::Result<()> {
        self.stage_with(id, staging, fs, HashMap::new()).await
    }

    /// [`Csi::stage`] with the node-stage Secret's entries (an encrypted volume's key).
    pub async fn stage_with(
        &self,
        id: &str,
        staging: &Path,
        fs: FsType,
        secrets: HashMap<String, String>,
    ) -> anyhow::Result<()> {
        self.node
            .clone()
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.to_string(),
                staging_target_path: path_str(staging),
                volume_capability: Some(mount_capability(fs)),
                secrets,
                ..Default::default()
            })
            .await
            .with_context(|| format!("NodeStageVolume {id}"))?;
        Ok(())
    }

    pub async fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        fs: FsType,
    ) -> anyhow::Result<()> {
        self.node
            .clone()
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.to_string(),
                staging_target_path: path_str(staging),
                target_path: path_str(target),
                volume_capability: Some(mount_capability(fs)),
                ..Default::default()
            })
            .await
            .with_context(|| format!("NodePublishVolume {id}"))?;
        Ok(())
    }

    pub async fn unpublish(&self, id: &str, target: &Path) -> anyhow::Result<()> {
        self.node
            .clone()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.to_string(),
                target_path: path_str(target),
            })
            .await
            .with_context(|| format!("NodeUnpublishVolume {id}"))?;
        Ok(())
    }

    pub async fn unstage(&self, id: &str, staging: &Path) -> anyhow::Result<()> {
        self.node
            .clone()
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.to_string(),
                staging_target_path: path_str(staging),
            })
            .await
            .with_context(|| format!("NodeUnstageVolume {id}"))?;
        Ok(())
    }
}

/// Where kubelet would stage and publish volume `tag` inside `root`; like kubelet, the
/// staging dir and the target's parent are created before the calls (not timed).
#[derive(Debug, Clone)]
pub struct MountPaths {
    pub staging: std::path::PathBuf,
    pub target: std::path::PathBuf,
}

impl MountPaths {
    pub fn prepare(root: &Path, tag: &str) -> anyhow::Result<MountPaths> {
        let staging = root.join("staging").join(tag).join("globalmount");
        let pod = root.join("pods").join(tag);
        std::fs::create_dir_all(&staging)?;
        std::fs::create_dir_all(&pod)?;
        Ok(MountPaths {
            staging,
            target: pod.join("mount"),
        })
    }
}
