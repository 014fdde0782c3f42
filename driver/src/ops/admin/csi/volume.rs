//! Controller RPCs on volumes: create (blank, clone, restore), get, list, expand, modify,
//! delete, and GetCapacity.

use super::*;

#[derive(Debug, clap::Subcommand)]
pub enum VolumeRpc {
    /// CreateVolume: a blank volume, a clone (--from-volume) or a restore (--from-snapshot).
    CreateVolume {
        /// The request name; the same name again returns the same volume.
        #[arg(long)]
        name: String,
        /// A Kubernetes quantity, e.g. 1Gi, 1.5Gi, 512Mi, 10G. Optional for a clone or a
        /// restore, which are then as large as their source.
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true,
              required_unless_present_any = ["from_snapshot", "from_volume"])]
        size: Option<u64>,
        #[command(flatten)]
        cap: CapArgs,
        /// A StorageClass parameter, `key=value` (repeatable), e.g. `allocation=thick`.
        #[arg(long = "param", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        /// A VolumeAttributesClass parameter, `key=value` (repeatable): an IO limit
        /// (readIOPS, writeIOPS, readBPS, writeBPS).
        #[arg(long = "mutable-param", value_parser = parse_kv)]
        mutable_params: Vec<(String, String)>,
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
    /// ControllerGetVolume: one volume's size, context and topology.
    GetVolume {
        /// The volume ID.
        id: String,
    },
    /// ListVolumes (every page).
    ListVolumes,
    /// ControllerExpandVolume, then NodeExpandVolume on --path when given.
    Expand {
        /// The volume ID.
        id: String,
        /// The new size, a Kubernetes quantity.
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        size: u64,
        /// Where the volume is staged or published, to grow its filesystem too.
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// ControllerModifyVolume: change a volume's IO limits, as a VolumeAttributesClass does.
    ///
    /// Only the keys given change; `0` or `unlimited` removes a limit. Pods using the volume
    /// on this node get the new limits at once.
    ModifyVolume {
        /// The volume ID.
        id: String,
        /// A mutable parameter, `key=value` (repeatable): readIOPS, writeIOPS (operations per
        /// second), readBPS, writeBPS (a quantity of bytes per second, e.g. 10Mi).
        #[arg(long = "param", value_parser = parse_kv, required = true)]
        params: Vec<(String, String)>,
    },
    /// GetCapacity: what a volume of these parameters could still get.
    GetCapacity {
        #[command(flatten)]
        cap: CapArgs,
        /// A StorageClass parameter, `key=value` (repeatable), e.g. `allocation=thick`.
        #[arg(long = "param", value_parser = parse_kv)]
        params: Vec<(String, String)>,
    },
}

pub(super) async fn run(c: &mut Clients, rpc: VolumeRpc) -> Result<Value, Status> {
    match rpc {
        VolumeRpc::CreateVolume {
            name,
            size,
            cap,
            params,
            mutable_params,
            from_snapshot,
            from_volume,
        } => {
            use volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(snapshot_id), _) => Some(Type::Snapshot(SnapshotSource { snapshot_id })),
                (None, Some(volume_id)) => Some(Type::Volume(VolumeSource { volume_id })),
                (None, None) => None,
            };
            // No size with a source: send no capacity range, and the driver makes the copy
            // exactly as large as its source.
            let capacity_range = match size {
                Some(size) => Some(CapacityRange {
                    required_bytes: size_i64(size)?,
                    limit_bytes: 0,
                }),
                None => None,
            };
            let r = c
                .controller
                .create_volume(CreateVolumeRequest {
                    name,
                    capacity_range,
                    volume_capabilities: vec![cap.capability()],
                    parameters: params.into_iter().collect(),
                    mutable_parameters: mutable_params.into_iter().collect(),
                    volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let v = r
                .volume
                .ok_or_else(|| Status::internal("CreateVolume answered no volume"))?;
            if let Some(size) = size {
                note_rounding(size, v.capacity_bytes.max(0) as u64);
            }
            Ok(volume_json(&v))
        }
        VolumeRpc::DeleteVolume { id } => {
            found_before_delete(
                c.controller
                    .controller_get_volume(ControllerGetVolumeRequest {
                        volume_id: id.clone(),
                    })
                    .await,
            )?;
            c.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: id.clone(),
                    secrets: HashMap::new(),
                })
                .await?;
            Ok(json!({ "deleted": id }))
        }
        VolumeRpc::GetVolume { id } => {
            let r = c
                .controller
                .controller_get_volume(ControllerGetVolumeRequest { volume_id: id })
                .await?
                .into_inner();
            let v = r
                .volume
                .ok_or_else(|| Status::internal("ControllerGetVolume answered no volume"))?;
            let mut out = volume_json(&v);
            out["published_node_ids"] = json!(r.status.map(|s| s.published_node_ids));
            Ok(out)
        }
        VolumeRpc::ListVolumes => {
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
        VolumeRpc::Expand { id, size, path } => expand(c, id, size, path).await,
        VolumeRpc::ModifyVolume { id, params } => {
            let mutable_parameters: HashMap<String, String> = params.into_iter().collect();
            c.controller
                .controller_modify_volume(ControllerModifyVolumeRequest {
                    volume_id: id.clone(),
                    secrets: HashMap::new(),
                    mutable_parameters: mutable_parameters.clone(),
                })
                .await?;
            Ok(json!({ "modified": id, "mutable_parameters": mutable_parameters }))
        }
        VolumeRpc::GetCapacity { cap, params } => {
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
    }
}

async fn expand(
    c: &mut Clients,
    id: String,
    size: u64,
    path: Option<PathBuf>,
) -> Result<Value, Status> {
    let r = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: size_i64(size)?,
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
