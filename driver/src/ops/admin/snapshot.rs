//! `loopvol snapshot allocated SNAP` and `loopvol snapshot diff BASE TARGET`: what a full and an
//! incremental backup of a snapshot would read, asked of a running driver (or router) through
//! the same SnapshotMetadata RPCs a backup tool uses.

use serde_json::json;
use tonic::transport::Channel;
use tonic::Status;

use crate::csi::snapshot_metadata_client::SnapshotMetadataClient;
use crate::csi::*;
use crate::ops::admin::Output;
use crate::shared::units;

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// The driver's (or router's) socket.
    #[arg(
        long,
        global = true,
        default_value = "unix:///run/loopvol/csi.sock",
        env = "CSI_ENDPOINT"
    )]
    pub endpoint: String,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t)]
    pub output: Output,
    /// Start at this byte offset (resume an interrupted listing).
    #[arg(long, global = true, default_value_t = 0)]
    pub starting_offset: i64,
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// The ranges of SNAP that hold data: what a full backup reads.
    Allocated {
        /// The snapshot ID.
        snapshot_id: String,
    },
    /// The ranges where TARGET may differ from BASE: what an incremental backup reads.
    Diff {
        /// The older snapshot, already backed up.
        base_snapshot_id: String,
        /// The newer snapshot of the same volume.
        target_snapshot_id: String,
    },
}

/// Run the command and print its ranges; returns the exit status.
pub fn main(args: SnapshotArgs) -> i32 {
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
    match rt.block_on(run(&args)) {
        Ok((capacity, ranges)) => {
            print(&args, capacity, &ranges);
            0
        }
        Err(s) => {
            eprintln!("{}: {}", crate::metrics::code_name(s.code()), s.message());
            1
        }
    }
}

async fn client(endpoint: &str) -> Result<SnapshotMetadataClient<Channel>, Status> {
    let path = crate::shared::socket_path(endpoint)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let channel = tonic::transport::Endpoint::from_shared(format!("unix://{}", path.display()))
        .map_err(|e| Status::invalid_argument(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to {endpoint}: {e}")))?;
    Ok(SnapshotMetadataClient::new(channel))
}

/// The capacity and every range of the stream.
async fn run(args: &SnapshotArgs) -> Result<(i64, Vec<BlockMetadata>), Status> {
    let mut c = client(&args.endpoint).await?;
    let (mut capacity, mut ranges) = (0, Vec::new());
    match &args.command {
        SnapshotCommand::Allocated { snapshot_id } => {
            let mut s = c
                .get_metadata_allocated(GetMetadataAllocatedRequest {
                    snapshot_id: snapshot_id.clone(),
                    starting_offset: args.starting_offset,
                    ..Default::default()
                })
                .await?
                .into_inner();
            while let Some(m) = s.message().await? {
                capacity = m.volume_capacity_bytes;
                ranges.extend(m.block_metadata);
            }
        }
        SnapshotCommand::Diff {
            base_snapshot_id,
            target_snapshot_id,
        } => {
            let mut s = c
                .get_metadata_delta(GetMetadataDeltaRequest {
                    base_snapshot_id: base_snapshot_id.clone(),
                    target_snapshot_id: target_snapshot_id.clone(),
                    starting_offset: args.starting_offset,
                    ..Default::default()
                })
                .await?
                .into_inner();
            while let Some(m) = s.message().await? {
                capacity = m.volume_capacity_bytes;
                ranges.extend(m.block_metadata);
            }
        }
    }
    Ok((capacity, ranges))
}

fn print(args: &SnapshotArgs, capacity: i64, ranges: &[BlockMetadata]) {
    let total: i64 = ranges.iter().map(|r| r.size_bytes).sum();
    let pct = if capacity > 0 {
        total as f64 * 100.0 / capacity as f64
    } else {
        0.0
    };
    match args.output {
        Output::Json => {
            let doc = json!({
                "volume_capacity_bytes": capacity,
                "block_metadata_type": "VARIABLE_LENGTH",
                "total_bytes": total,
                "ranges": ranges.iter().map(|r| json!({
                    "byte_offset": r.byte_offset,
                    "size_bytes": r.size_bytes,
                })).collect::<Vec<_>>(),
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&doc).expect("JSON values serialise")
            );
        }
        Output::Table => {
            println!("{:>20}  {:>20}  {:>10}", "OFFSET", "LENGTH", "SIZE");
            for r in ranges {
                println!(
                    "{:>20}  {:>20}  {:>10}",
                    r.byte_offset,
                    r.size_bytes,
                    units::bytes(r.size_bytes as u64)
                );
            }
            let what = match args.command {
                SnapshotCommand::Allocated { .. } => "a full backup reads",
                SnapshotCommand::Diff { .. } => "an incremental backup reads",
            };
            println!(
                "{} ranges, {} of {} ({pct:.2} %): what {what}",
                ranges.len(),
                units::bytes(total as u64),
                units::bytes(capacity as u64)
            );
        }
    }
}
