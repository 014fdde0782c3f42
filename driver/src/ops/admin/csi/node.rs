//! Node RPCs: stage, publish, unpublish, unstage, and usage figures.

use super::*;

#[derive(Debug, clap::Subcommand)]
pub enum NodeRpc {
    /// NodeStageVolume: attach, make the filesystem if blank, mount at the staging path.
    Stage {
        /// The volume ID.
        id: String,
        /// An existing directory: a mount volume's filesystem is mounted on it; for a block
        /// volume nothing is made there (the device is attached, and publish binds it onto a
        /// file at --target-path).
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
        /// Where to make the volume appear, created if missing: a directory, or for a block
        /// volume a file the device is bound onto.
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
}

pub(super) async fn run(c: &mut Clients, rpc: NodeRpc) -> Result<Value, Status> {
    match rpc {
        NodeRpc::Stage {
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
        NodeRpc::Publish {
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
        NodeRpc::Unpublish { id, target_path } => {
            c.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: path_str(&target_path),
                })
                .await?;
            Ok(json!({ "unpublished": id, "target_path": target_path }))
        }
        NodeRpc::Unstage { id, staging_path } => {
            c.node
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: path_str(&staging_path),
                })
                .await?;
            Ok(json!({ "unstaged": id, "staging_path": staging_path }))
        }
        NodeRpc::Stats { id, path } => {
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
    }
}
