//! Helpers for restore and clone across nodes (tests/transfer.rs), written against clients
//! and paths only, so other harnesses (network namespaces, fault rounds, benchmarks) reuse
//! them whatever starts the processes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::*;
use tonic::transport::Channel;
use tonic::Code;

use super::*;

/// `req` with the topology csi-provisioner sends: `preferred` then `requisite` node names.
pub fn with_topology(
    mut req: CreateVolumeRequest,
    preferred: &[&str],
    requisite: &[&str],
) -> CreateVolumeRequest {
    let t = |ns: &[&str]| {
        ns.iter()
            .map(|n| loopvol::edge::controller::topology(n))
            .collect()
    };
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: t(requisite),
        preferred: t(preferred),
    });
    req
}

pub fn from_snapshot(mut req: CreateVolumeRequest, snapshot_id: &str) -> CreateVolumeRequest {
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.to_string(),
            },
        )),
    });
    req
}

pub fn from_volume(mut req: CreateVolumeRequest, volume_id: &str) -> CreateVolumeRequest {
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: volume_id.to_string(),
            },
        )),
    });
    req
}

/// CreateVolume as csi-provisioner drives it: retried with the same request while it answers
/// ABORTED (a copy in progress). The volume, and the ABORTED messages seen on the way; any
/// other error is returned as it came.
pub async fn create_until_ready(
    c: &mut ControllerClient<Channel>,
    req: &CreateVolumeRequest,
    within: Duration,
) -> Result<(Volume, Vec<String>), tonic::Status> {
    let until = Instant::now() + within;
    let mut aborted = Vec::new();
    loop {
        match c.create_volume(req.clone()).await {
            Ok(r) => return Ok((r.into_inner().volume.unwrap(), aborted)),
            Err(s) if s.code() == Code::Aborted && Instant::now() < until => {
                aborted.push(s.message().to_string());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// Make `image` an ext4 filesystem holding a few files of pattern data (mkfs.ext4 -d: a real
/// filesystem, no loop device or mount needed).
pub fn fill_ext4(image: &Path, seed: u64) {
    let root = tempfile::tempdir().unwrap();
    for i in 0..4u64 {
        std::fs::write(
            root.path().join(format!("f{i}")),
            pattern(((i + 1) * 300_000) as usize, seed + i),
        )
        .unwrap();
    }
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-F", "-q", "-d"])
        .arg(root.path())
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.ext4: {out:?}");
}

/// Make `image` a filesystem of type `fs` (`ext4`, `xfs`, `btrfs`): ext4 and btrfs with files
/// of pattern data in it, xfs empty (its mkfs cannot populate from a directory here).
pub fn make_fs(image: &Path, fs: &str, seed: u64) {
    if fs == "ext4" {
        return fill_ext4(image, seed);
    }
    let root = tempfile::tempdir().unwrap();
    for i in 0..3u64 {
        std::fs::write(
            root.path().join(format!("f{i}")),
            pattern(((i + 1) * 500_000) as usize, seed + i),
        )
        .unwrap();
    }
    let mut cmd = std::process::Command::new(format!("mkfs.{fs}"));
    match fs {
        "xfs" => cmd.args(["-f", "-q"]),
        "btrfs" => cmd.args(["-f", "-q", "--rootdir"]).arg(root.path()),
        other => panic!("no filesystem {other}"),
    };
    let out = cmd.arg(image).output().unwrap();
    assert!(out.status.success(), "mkfs.{fs}: {out:?}");
}

/// Write `pieces` pieces of `piece` bytes of pattern data spread over `image`.
pub fn write_spread(image: &Path, pieces: u64, piece: usize, seed: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    let len = f.metadata().unwrap().len();
    let stride = len / pieces;
    for i in 0..pieces {
        f.write_all_at(&pattern(piece, seed + i), i * stride)
            .unwrap();
    }
    f.sync_all().unwrap();
    pieces * piece as u64
}

/// Bytes a file takes on disk.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// What a transfer left in a pool besides volumes: temp images and transfer records.
pub fn leftovers(pool: &Path) -> Vec<PathBuf> {
    ["tmp", "transfers"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(pool.join(d))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.path())
        .collect()
}

/// Fail, naming them, if `pool` holds any temp image or transfer record.
#[track_caller]
pub fn assert_no_leftovers(pool: &Path) {
    let left = leftovers(pool);
    assert!(left.is_empty(), "{}: {left:?}", pool.display());
}

/// The `bytes_received` of the "transfer finished" log line for `volume_id` in `log`.
pub fn bytes_received_in_log(log: &Path, volume_id: &str) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rfind(|l| l.contains("transfer finished") && l.contains(volume_id))?;
    let at = line.find("bytes_received")? + "bytes_received".len();
    let digits: String = line[at..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// One sample of `/metrics` served on `addr` (`--metrics-address`): the value of the series
/// `name` (no labels), if present.
pub fn metric(addr: &str, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A free TCP port on `ip` (for a process to bind next).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The volume ID an ABORTED "copying: …" message names.
pub fn volume_in_message(msg: &str) -> Option<String> {
    let at = msg.find("volume vol-")? + "volume ".len();
    Some(msg[at..].split([' ', ')']).next()?.to_string())
}

/// What a peer of the pool API reads from `Transfer/Read` of `source_id` on `cl`'s node `node`
/// (1..=3), asking for the chunk digests `digests` (none: a sink from before digests were
/// negotiated): the header, then each chunk's offset, data and digest, checked to end in a
/// trailer.
pub async fn pool_api_read(
    cl: &super::cluster::Cluster,
    node: u8,
    source_id: &str,
    digests: &[&str],
) -> (
    loopvol::transfer_api::Header,
    Vec<loopvol::transfer_api::Chunk>,
) {
    use loopvol::transfer_api::read_response::Frame;
    let url = format!(
        "https://127.0.0.{}:{}",
        node + 1,
        cl.ports[node as usize - 1]
    );
    let ch = pool_api_channel(&cl.dir.path().join("certs"), url).await;
    let mut stream = loopvol::transfer_api::transfer_client::TransferClient::new(ch)
        .max_decoding_message_size(8 << 20)
        .read(loopvol::transfer_api::ReadRequest {
            source_id: source_id.to_string(),
            transfer_id: "00000000000000aa".into(),
            digests: digests.iter().map(|d| d.to_string()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut header = None;
    let mut chunks = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        match m.frame.unwrap() {
            Frame::Header(h) => header = Some(h),
            Frame::Chunk(c) => chunks.push(c),
            Frame::Trailer(t) => {
                assert_eq!(t.chunks as usize, chunks.len());
                return (header.expect("a header first"), chunks);
            }
        }
    }
    panic!("the stream ended without a trailer");
}
