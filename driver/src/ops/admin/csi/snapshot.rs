//! Controller RPCs on snapshots: create, get, list, delete.

use super::*;

#[derive(Debug, clap::Subcommand)]
pub enum SnapshotRpc {
    /// CreateSnapshot.
    Snapshot {
        /// The request name; the same name again returns the same snapshot.
        #[arg(long)]
        name: String,
        /// The source volume's ID.
        #[arg(long)]
        source: String,
    },
    /// GetSnapshot: one snapshot by ID.
    GetSnapshot {
        /// The snapshot ID.
        id: String,
    },
    /// DeleteSnapshot.
    DeleteSnapshot {
        /// The snapshot ID.
        id: String,
    },
    /// ListSnapshots (every page), optionally of one volume or one snapshot ID.
    ListSnapshots {
        /// Only snapshots of this volume.
        #[arg(long)]
        source: Option<String>,
        /// Only this snapshot.
        #[arg(long)]
        id: Option<String>,
    },
}

pub(super) async fn run(c: &mut Clients, rpc: SnapshotRpc) -> Result<Value, Status> {
    match rpc {
        SnapshotRpc::Snapshot { name, source } => {
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
        SnapshotRpc::GetSnapshot { id } => {
            let r = c
                .controller
                .get_snapshot(GetSnapshotRequest {
                    snapshot_id: id,
                    secrets: HashMap::new(),
                })
                .await?
                .into_inner();
            let s = r
                .snapshot
                .ok_or_else(|| Status::internal("GetSnapshot answered no snapshot"))?;
            Ok(snapshot_json(&s))
        }
        SnapshotRpc::DeleteSnapshot { id } => {
            found_before_delete(
                c.controller
                    .get_snapshot(GetSnapshotRequest {
                        snapshot_id: id.clone(),
                        secrets: HashMap::new(),
                    })
                    .await,
            )?;
            c.controller
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    secrets: HashMap::new(),
                })
                .await?;
            Ok(json!({ "deleted": id }))
        }
        SnapshotRpc::ListSnapshots { source, id } => {
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
    }
}
