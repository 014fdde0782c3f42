//! `loopvol csi --endpoint unix:///... <rpc>`: a small CSI client, so a person can drive the
//! whole two-phase flow (create → stage → publish → ... → delete) by hand, the way kubelet and
//! the sidecars do. Results print as JSON with the meaningful fields of each response; errors
//! print as `CODE: message` on stderr with exit status 1.
//!
//! One module per job: volumes (controller), node (stage/publish), snapshots, group snapshots,
//! health; `info` and the shared JSON shapes live in info.rs.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::csi::controller_client::ControllerClient;
use crate::csi::group_controller_client::GroupControllerClient;
use crate::csi::identity_client::IdentityClient;
use crate::csi::node_client::NodeClient;
use crate::csi::volume_capability::{
    access_mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use crate::csi::*;
use crate::shared::units::parse_size;

mod group;
mod health;
mod info;
mod node;
mod snapshot;
mod volume;

use info::*;

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
    #[command(flatten)]
    Volume(volume::VolumeRpc),
    #[command(flatten)]
    Node(node::NodeRpc),
    #[command(flatten)]
    Snapshot(snapshot::SnapshotRpc),
    #[command(flatten)]
    Group(group::GroupRpc),
    #[command(flatten)]
    Health(health::HealthRpc),
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
    group: GroupControllerClient<Channel>,
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
        group: GroupControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    })
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A size flag as the `i64` the CSI messages carry (parse_size already refused anything above
/// i64::MAX; this only converts).
fn size_i64(size: u64) -> Result<i64, Status> {
    i64::try_from(size).map_err(|_| Status::out_of_range("--size is too large"))
}

/// The lookup before a delete. The delete RPCs are idempotent (deleting what does not exist
/// succeeds, as the sidecars need), but a person deleting by hand means something that exists:
/// like `kubectl delete` of a missing object, the CLI then says NOT_FOUND and exits 1, having
/// sent no delete. The lookup and the delete are two calls: when something else deletes the
/// object between them, the delete still succeeds and the object is gone, which is what the
/// output says. A driver that cannot look up (UNIMPLEMENTED) is asked to delete anyway.
fn found_before_delete<T>(lookup: Result<tonic::Response<T>, Status>) -> Result<(), Status> {
    match lookup {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::Unimplemented => Ok(()),
        Err(s) if s.code() == Code::NotFound => Err(Status::not_found(format!(
            "{}; nothing deleted",
            s.message()
        ))),
        Err(s) => Err(s),
    }
}

async fn run(args: CsiArgs) -> Result<Value, Status> {
    let mut c = connect(&args.endpoint).await?;
    match args.rpc {
        Rpc::Volume(rpc) => volume::run(&mut c, rpc).await,
        Rpc::Node(rpc) => node::run(&mut c, rpc).await,
        Rpc::Snapshot(rpc) => snapshot::run(&mut c, rpc).await,
        Rpc::Group(rpc) => group::run(&mut c, rpc).await,
        Rpc::Health(rpc) => health::run(&mut c, rpc).await,
        Rpc::Info => info(&mut c).await,
    }
}
