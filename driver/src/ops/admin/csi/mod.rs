//! `loopvol csi --endpoint unix:///... <rpc>`: a small CSI client, so a person can drive the
//! whole two-phase flow (create → stage → publish → ... → delete) by hand, the way kubelet and
//! the sidecars do. Results print as JSON with the meaningful fields of each response; errors
//! print as `CODE: message` on stderr with exit status 1.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::csi::controller_client::ControllerClient;
use crate::csi::identity_client::IdentityClient;
use crate::csi::node_client::NodeClient;
use crate::csi::volume_capability::{
    access_mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use crate::csi::*;
use crate::shared::units::parse_size;

#[derive(Debug, clap::Args)]
pub struct CsiArgs {
    /// The driver's socket.
    #[arg(
        long,
        default_value = "unix:///run/loopvol/csi.sock",
        env = "CSI_ENDPOINT"
    )]
    pub endpoint: String,
    #[command(subcommand)]
    pub rpc: Rpc,
}

#[derive(Debug, clap::Subcommand)]
pub enum Rpc {
    /// CreateVolume: a blank volume, a clone (--from-volume) or a restore (--from-snapshot).
    CreateVolume {
        /// The request name; the same name again returns the same volume.
        #[arg(long)]
        name: String,
        /// A Kubernetes quantity, e.g. 1Gi, 1.5Gi, 512Mi, 10G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        cap: CapArgs,
        /// A StorageClass parameter, `key=value` (repeatable), e.g. `allocation=thick`.
        #[arg(long = "param", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        /// Restore this snapshot's content into the new volume.
        #[arg(long, value_name = "SNAPSHOT_ID", conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume's content into the new volume.
        #[arg(long, value_name = "VOLUME_ID")]
        from_volume: Option<String>,
    },
    /// DeleteVolume.
    DeleteVolume {
        /// The volume ID.
        id: String,
    },
    /// NodeStageVolume: attach, make the filesystem if blank, mount at the staging path.
    Stage {
        /// The volume ID.
        id: String,
        /// An existing directory to mount the volume on (block volumes: a file is made there).
        #[arg(long)]
        staging_path: PathBuf,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodePublishVolume: bind the staged volume onto the target path.
    Publish {
        /// The volume ID.
        id: String,
        /// Where the volume was staged.
        #[arg(long)]
        staging_path: PathBuf,
        /// Where to make the volume appear (created if missing).
        #[arg(long)]
        target_path: PathBuf,
        /// Publish read-only.
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodeUnpublishVolume.
    Unpublish {
        /// The volume ID.
        id: String,
        /// The path it was published at.
        #[arg(long)]
        target_path: PathBuf,
    },
    /// NodeUnstageVolume.
    Unstage {
        /// The volume ID.
        id: String,
        /// The path it was staged at.
        #[arg(long)]
        staging_path: PathBuf,
    },
    /// NodeGetVolumeStats of a staged or published path.
    Stats {
        /// The volume ID.
        id: String,
        /// Its staging or publish path.
        #[arg(long)]
        path: PathBuf,
    },
    /// CreateSnapshot.
    Snapshot {
        /// The request name; the same name again returns the same snapshot.
        #[arg(long)]
        name: String,
        /// The source volume's ID.
        #[arg(long)]
        source: String,
    },
    /// DeleteSnapshot.
    DeleteSnapshot {
        /// The snapshot ID.
        id: String,
    },
    /// ListVolumes (every page).
    ListVolumes,
    /// ListSnapshots (every page), optionally of one volume or one snapshot ID.
    ListSnapshots {
        /// Only snapshots of this volume.
        #[arg(long)]
        source: Option<String>,
        /// Only this snapshot.
        #[arg(long)]
        id: Option<String>,
    },
    /// GetCapacity: what a volume of these parameters could still get.
    GetCapacity {
        #[command(flatten)]
        cap: CapArgs,
        /// A StorageClass parameter, `key=value` (repeatable), e.g. `allocation=thick`.
        #[arg(long = "param", value_parser = parse_kv)]
        params: Vec<(String, String)>,
    },
    /// ControllerExpandVolume, then NodeExpandVolume on --path when given.
    Expand {
        /// The volume ID.
        id: String,
        /// The new size, a Kubernetes quantity.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Where the volume is staged or published, to grow its filesystem too.
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Plugin info, capabilities, readiness and node info.
    Info,
}

/// The volume capability of a request.
#[derive(Debug, Clone, clap::Args)]
pub struct CapArgs {
    /// Filesystem of a mount volume (ext4, xfs, btrfs); empty lets the driver choose.
    #[arg(long)]
    fs_type: Option<String>,
    /// Raw block access instead of a filesystem.
    #[arg(long, conflicts_with = "fs_type")]
    block: bool,
    /// The access mode the workload asks for.
    #[arg(long, value_enum, default_value_t = Access::Writer)]
    access_mode: Access,
    /// A mount option (repeatable), e.g. noatime.
    #[arg(long = "mount-flag")]
    mount_flags: Vec<String>,
}

/// The single-node access modes (the only ones loopvol volumes support).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Access {
    #[value(name = "single-node-writer")]
    Writer,
    #[value(name = "single-node-reader-only")]
    ReaderOnly,
    #[value(name = "single-node-single-writer")]
    SingleWriter,
    #[value(name = "single-node-multi-writer")]
    MultiWriter,
}

impl CapArgs {
    fn capability(&self) -> VolumeCapability {
        let mode = match self.access_mode {
            Access::Writer => access_mode::Mode::SingleNodeWriter,
            Access::ReaderOnly => access_mode::Mode::SingleNodeReaderOnly,
            Access::SingleWriter => access_mode::Mode::SingleNodeSingleWriter,
            Access::MultiWriter => access_mode::Mode::SingleNodeMultiWriter,
        };
        let access_type = if self.block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: self.fs_type.clone().unwrap_or_default(),
                mount_flags: self.mount_flags.clone(),
                volume_mount_group: String::new(),
            })
        };
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access_type),
        }
    }
}

/// Say when the volume is larger than asked (a filesystem's minimum size, block alignment),
/// instead of leaving the person to notice.
pub fn note_rounding(requested: u64, got: u64) {
    if got > requested {
        eprintln!(
            "note: asked for {} ({requested} bytes), the volume is {} ({got} bytes): the \
             driver's minimum size or alignment applies",
            crate::shared::units::bytes(requested),
            crate::shared::units::bytes(got)
        );
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// Run one RPC, print its result; returns the exit status.
pub fn main(args: CsiArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("INTERNAL: cannot start a runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(args)) {
        Ok(v) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&v).expect("JSON values serialise")
            );
            0
        }
        Err(s) => {
            eprintln!("{}: {}", crate::metrics::code_name(s.code()), s.message());
            1
        }
    }
}

struct Clients {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

async fn connect(endpoint: &str) -> Result<Clients, Status> {
    let path = crate::shared::socket_path(endpoint)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let channel = tonic::transport::Endpoint::from_shared(format!("unix://{}", path.display()))
        .map_err(|e| Status::invalid_argument(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to {endpoint}: {e}")))?;
    Ok(Clients {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    })
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

async fn run(args: CsiArgs) -> Result<Value, Status> {
    let mut c = connect(&args.endpoint).await?;
    match args.rpc {
        Rpc::CreateVolume {
            name,
            size,
            cap,
            params,
            from_snapshot,
            from_volume,
        } => {
            use volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(snapshot_id), _) => Some(Type::Snapshot(SnapshotSource { snapshot_id })),
                (None, Some(volume_id)) => Some(Type::Volume(VolumeSource { volume_id })),
                (None, None) => None,
            };
            let r = c
                .controller
                .create_volume(CreateVolumeRequest {
                    name,
                    capacity_range: Some(CapacityRange {
                        required_bytes: i64::try_from(size)
                            .map_err(|_| Status::out_of_range("--size is too large"))?,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![cap.capability()],
                    parameters: params.into_iter().collect(),
                    volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let v = r
                .volume
                .ok_or_else(|| Status::internal("CreateVolume answered no volume"))?;
            note_rounding(size, v.capacity_bytes.max(0) as u64);
            Ok(volume_json(&v))
        }
        Rpc::DeleteVolume { id } => {
            c.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: id.clone(),
                    secrets: HashMap::new(),
                })
                .await?;
            Ok(json!({ "deleted": id }))
        }
        Rpc::Stage {
            id,
            staging_path,
            cap,
        } => {
            c.node
                .node_stage_volume(NodeStageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: path_str(&staging_path),
                    volume_capability: Some(cap.capability()),
                    ..Default::default()
                })
                .await?;
            Ok(json!({ "staged": id, "staging_path": staging_path }))
        }
        Rpc::Publish {
            id,
            staging_path,
            target_path,
            readonly,
            cap,
        } => {
            c.node
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: path_str(&staging_path),
                    target_path: path_str(&target_path),
                    volume_capability: Some(cap.capability()),
                    readonly,
                    ..Default::default()
                })
                .await?;
            Ok(json!({ "published": id, "target_path": target_path, "readonly": readonly }))
        }
        Rpc::Unpublish { id, target_path } => {
            c.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: path_str(&target_path),
                })
                .await?;
            Ok(json!({ "unpublished": id, "target_path": target_path }))
        }
        Rpc::Unstage { id, staging_path } => {
            c.node
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: path_str(&staging_path),
                })
                .await?;
            Ok(json!({ "unstaged": id, "staging_path": staging_path }))
        }
        Rpc::Stats { id, path } => {
            let r = c
                .node
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: path_str(&path),
                    staging_target_path: String::new(),
                })
                .await?
                .into_inner();
            let usage: Vec<Value> = r
                .usage
                .iter()
                .map(|u| {
                    json!({
                        "unit": unit_name(u.unit),
                        "total": u.total,
                        "used": u.used,
                        "available": u.available,
                    })
                })
                .collect();
            Ok(json!({ "volume_id": id, "path": path, "usage": usage }))
        }
        Rpc::Snapshot { name, source } => {
            let r = c
                .controller
                .create_snapshot(CreateSnapshotRequest {
                    source_volume_id: source,
                    name,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let s = r
                .snapshot
                .ok_or_else(|| Status::internal("CreateSnapshot answered no snapshot"))?;
            Ok(snapshot_json(&s))
        }
        Rpc::DeleteSnapshot { id } => {
            c.controller
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    secrets: HashMap::new(),
                })
                .await?;
            Ok(json!({ "deleted": id }))
        }
        Rpc::ListVolumes => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let r = c
                    .controller
                    .list_volumes(ListVolumesRequest {
                        max_entries: 0,
                        starting_token: token,
                    })
                    .await?
                    .into_inner();
                all.extend(
                    r.entries
                        .iter()
                        .filter_map(|e| e.volume.as_ref())
                        .map(volume_json),
                );
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            Ok(Value::Array(all))
        }
        Rpc::Expand { id, size, path } => {
            let r = c
                .controller
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: i64::try_from(size)
                            .map_err(|_| Status::out_of_range("--size is too large"))?,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut out = json!({
                "volume_id": id,
                "capacity_bytes": r.capacity_bytes,
                "node_expansion_required": r.node_expansion_required,
            });
            if let Some(p) = path.filter(|_| r.node_expansion_required) {
                // The controller half is done and not undone: say so, or a person retries the
                // whole expansion believing nothing happened.
                let n = c
                    .node
                    .node_expand_volume(NodeExpandVolumeRequest {
                        volume_id: id.clone(),
                        volume_path: path_str(&p),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| {
                        Status::new(
                            s.code(),
                            format!(
                                "ControllerExpandVolume succeeded (the volume is now {} bytes), \
                                 but NodeExpandVolume on {} failed: {}; the filesystem keeps its \
                                 old size until NodeExpandVolume succeeds (rerun this command, \
                                 or restage the volume)",
                                r.capacity_bytes,
                                p.display(),
                                s.message()
                            ),
                        )
                    })?
                    .into_inner();
                out["node_capacity_bytes"] = json!(n.capacity_bytes);
            }
            Ok(out)
        }
        Rpc::ListSnapshots { source, id } => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let r = c
                    .controller
                    .list_snapshots(ListSnapshotsRequest {
                        max_entries: 0,
                        starting_token: token,
                        source_volume_id: source.clone().unwrap_or_default(),
                        snapshot_id: id.clone().unwrap_or_default(),
                        secrets: HashMap::new(),
                    })
                    .await?
                    .into_inner();
                all.extend(
                    r.entries
                        .iter()
                        .filter_map(|e| e.snapshot.as_ref())
                        .map(snapshot_json),
                );
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            Ok(Value::Array(all))
        }
        Rpc::GetCapacity { cap, params } => {
            let r = c
                .controller
                .get_capacity(GetCapacityRequest {
                    volume_capabilities: vec![cap.capability()],
                    parameters: params.into_iter().collect(),
                    accessible_topology: None,
                })
                .await?
                .into_inner();
            Ok(json!({
                "available_capacity": r.available_capacity,
                "available": crate::shared::units::bytes(r.available_capacity.max(0) as u64),
                "maximum_volume_size": r.maximum_volume_size,
                "minimum_volume_size": r.minimum_volume_size,
            }))
        }
        Rpc::Info => info(&mut c).await,
    }
}

mod info;
#[allow(unused_imports)]
pub use info::*;
