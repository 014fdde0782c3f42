//! Health RPCs: what the controller and the node know to be wrong with a volume, and the
//! node's view of its storage backend.

use super::*;

// The variants name the commands (`create-group-snapshot`...), so they share a postfix.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, clap::Subcommand)]
pub enum HealthRpc {
    /// ControllerGetVolumeHealth: what is known to be wrong with one volume (empty: nothing).
    VolumeHealth {
        /// The volume ID.
        id: String,
    },
    /// ControllerListVolumeHealth (every page): only the volumes with something to report.
    ListVolumeHealth,
    /// NodeGetVolumeHealth: one volume as this node sees it (attached, mounted, writable).
    NodeVolumeHealth {
        /// The volume ID.
        id: String,
        /// Where the volume is published.
        #[arg(long)]
        target_path: Option<PathBuf>,
        /// Where the volume is staged.
        #[arg(long)]
        staging_path: Option<PathBuf>,
    },
    /// NodeGetStorageHealth: the pool's backing storage as this node sees it.
    StorageHealth,
}

fn health_json(h: &VolumeHealth) -> Value {
    json!({
        "volume_id": h.volume_id,
        "healthy": h.health_statuses.is_empty(),
        "health_statuses": h.health_statuses.iter().map(|e| json!({
            "status": VolumeHealthErrorType::try_from(e.status)
                .map(|t| t.as_str_name())
                .unwrap_or("UNKNOWN_VOLUME_HEALTH_TYPE"),
            "reason": e.reason,
            "message": e.message,
        })).collect::<Vec<_>>(),
    })
}

fn of(h: Option<VolumeHealth>, rpc: &str) -> Result<Value, Status> {
    h.as_ref()
        .map(health_json)
        .ok_or_else(|| Status::internal(format!("{rpc} answered no volume health")))
}

pub(super) async fn run(c: &mut Clients, rpc: HealthRpc) -> Result<Value, Status> {
    match rpc {
        HealthRpc::VolumeHealth { id } => {
            let r = c
                .controller
                .controller_get_volume_health(ControllerGetVolumeHealthRequest {
                    volume_id: id,
                    secrets: HashMap::new(),
                })
                .await?
                .into_inner();
            of(r.volume_health, "ControllerGetVolumeHealth")
        }
        HealthRpc::ListVolumeHealth => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let r = c
                    .controller
                    .controller_list_volume_health(ControllerListVolumeHealthRequest {
                        max_entries: 0,
                        starting_token: token,
                        secrets: HashMap::new(),
                    })
                    .await?
                    .into_inner();
                all.extend(r.entries.iter().map(health_json));
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            Ok(Value::Array(all))
        }
        HealthRpc::NodeVolumeHealth {
            id,
            target_path,
            staging_path,
        } => {
            let r = c
                .node
                .node_get_volume_health(NodeGetVolumeHealthRequest {
                    volume_id: id,
                    volume_publish_path: target_path.as_deref().map(path_str).unwrap_or_default(),
                    staging_target_path: staging_path.as_deref().map(path_str).unwrap_or_default(),
                })
                .await?
                .into_inner();
            of(r.volume_health, "NodeGetVolumeHealth")
        }
        HealthRpc::StorageHealth => {
            let r = c
                .node
                .node_get_storage_health(NodeGetStorageHealthRequest {
                    secrets: HashMap::new(),
                })
                .await?
                .into_inner();
            Ok(json!({
                "healthy": r.backend_health.is_empty(),
                "backend_health": r.backend_health.iter().map(|b| json!({
                    "status": StorageHealthErrorType::try_from(b.status)
                        .map(|t| t.as_str_name())
                        .unwrap_or("UNKNOWN_STORAGE_HEALTH_ERROR_TYPE"),
                    "reason": b.reason,
                    "message": b.message,
                })).collect::<Vec<_>>(),
            }))
        }
    }
}
