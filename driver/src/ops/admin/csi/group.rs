//! GroupController RPCs: snapshots of several volumes at one instant.

use super::*;

// The variants name the commands (`create-group-snapshot`...), so they share a postfix.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, clap::Subcommand)]
pub enum GroupRpc {
    /// CreateVolumeGroupSnapshot: snapshot several volumes of one node at one instant.
    CreateGroupSnapshot {
        /// The request name; the same name again returns the same group snapshot.
        #[arg(long)]
        name: String,
        /// A volume ID to include (repeatable).
        #[arg(long = "source", value_name = "VOLUME_ID", required = true)]
        sources: Vec<String>,
    },
    /// GetVolumeGroupSnapshot: one group snapshot and its members.
    GetGroupSnapshot {
        /// The group snapshot ID.
        id: String,
    },
    /// DeleteVolumeGroupSnapshot: the group and every member snapshot.
    DeleteGroupSnapshot {
        /// The group snapshot ID.
        id: String,
    },
}

fn group_json(g: &VolumeGroupSnapshot) -> Value {
    json!({
        "group_snapshot_id": g.group_snapshot_id,
        "ready_to_use": g.ready_to_use,
        "creation_time": g.creation_time.as_ref()
            .map(|t| super::super::output::rfc3339(t.seconds.max(0) as u64)),
        "snapshots": g.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
    })
}

pub(super) async fn run(c: &mut Clients, rpc: GroupRpc) -> Result<Value, Status> {
    match rpc {
        GroupRpc::CreateGroupSnapshot { name, sources } => {
            let r = c
                .group
                .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
                    name,
                    source_volume_ids: sources,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let g = r.group_snapshot.ok_or_else(|| {
                Status::internal("CreateVolumeGroupSnapshot answered no group snapshot")
            })?;
            Ok(group_json(&g))
        }
        GroupRpc::GetGroupSnapshot { id } => {
            let g = get(c, &id).await?;
            Ok(group_json(&g))
        }
        GroupRpc::DeleteGroupSnapshot { id } => {
            found_before_delete(
                c.group
                    .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
                        group_snapshot_id: id.clone(),
                        ..Default::default()
                    })
                    .await,
            )?;
            c.group
                .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await?;
            Ok(json!({ "deleted": id }))
        }
    }
}

async fn get(c: &mut Clients, id: &str) -> Result<VolumeGroupSnapshot, Status> {
    c.group
        .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: id.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .group_snapshot
        .ok_or_else(|| Status::internal("GetVolumeGroupSnapshot answered no group snapshot"))
}
