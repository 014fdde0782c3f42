//! loopvol's own cross-node restore over the network the floor runs on (issue 24): two node
//! plugins, each in its network namespace of the floor's LAN, with pools of their own in the
//! workspace, and a router in a third namespace reaching them over mTLS with the certificates
//! the floor used. A block volume on `src` holding the payload's bytes is snapshotted and
//! restored onto `dst` as csi-provisioner asks with strict topology (requisite = preferred =
//! [dst]); CreateVolume is retried on ABORTED as the sidecar does, and the wall time runs from
//! the first call to the OK. Bytes on the wire are the kernel's count on dst's interface.
//!
//! The pod IO figures: fio 4 KiB random reads on an ext4 volume staged on `src` (the source's
//! node), with no copy, with back-to-back copies and no cap on dst, and with the cap on.
//! The cap is enforced by the receiving node, so only `dst` is restarted between the two.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
use loopvol::csi::*;
use provisioner::{Allocation, FsType};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::crossnode::{moved, netns, Moved};
use crate::csi_ops::{Csi, MountPaths};
use crate::driver::Launch;
use crate::plan::{Plan, MIB};

const POOL_PORT: u16 = 7443;

/// The cap the pod-IO comparison runs with: low enough that, on a small machine whose
/// uncapped copy is a few hundred MiB/s, the difference shows (the default is 256Mi).
pub const CAP: &str = "64Mi";

/// The pod's IO while copies run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PodIo {
    pub condition: String,
    pub iops: f64,
    pub p99_us: f64,
    /// What the copies moved during fio's window, MiB/s (none without copies).
    pub copy_mib_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Restore {
    /// CreateVolume → OK of a restore of `bytes` of data, no cap.
    pub moved: Moved,
    /// The target's "transfer finished" log line: its own rate.
    pub log_rate_mib_s: f64,
    pub allocated_bytes: u64,
    pub bytes_received: u64,
    /// Counted by dst's interface during the restore: payload, gRPC, TLS, TCP/IP, Ethernet.
    pub wire_bytes: u64,
    pub cap: String,
    pub pod_io: Vec<PodIo>,
    /// CPU seconds (user + system) the source and the target node plugins spent on the
    /// restore: where the time goes when the disk is not the limit.
    #[serde(default)]
    pub cpu_s: [f64; 2],
}

/// user + system CPU seconds of `pid` so far (/proc/PID/stat, clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

struct NodeProc {
    argv: Vec<OsString>,
    log: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
}

impl NodeProc {
    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let _ = std::fs::remove_file(&self.socket);
        self.child = Some(
            Command::new(&self.argv[0])
                .args(&self.argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("start loopvol")?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = Csi::connect(&self.socket).await {
                if c.probe().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{} did not come up", self.socket.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

fn topology(node: &str) -> TopologyRequirement {
    let t = loopvol::edge::controller::topology(node);
    TopologyRequirement {
        requisite: vec![t.clone()],
        preferred: vec![t],
    }
}

fn block(name: &str, bytes: u64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }],
        ..Default::default()
    }
}

/// The restore request csi-provisioner sends for a pod bound to `node`.
fn restore_req(name: &str, bytes: u64, snapshot: &str, node: &str) -> CreateVolumeRequest {
    let mut r = block(name, bytes);
    r.accessibility_requirements = Some(topology(node));
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    r
}

/// CreateVolume retried on ABORTED (a copy in progress), as the sidecar does.
async fn create_until_ready(
    c: &mut ControllerClient<Channel>,
    req: &CreateVolumeRequest,
) -> anyhow::Result<String> {
    let until = Instant::now() + Duration::from_secs(600);
    loop {
        match c.create_volume(req.clone()).await {
            Ok(r) => return Ok(r.into_inner().volume.context("no volume")?.volume_id),
            Err(s) if s.code() == tonic::Code::Aborted && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => bail!("CreateVolume {}: {s}", req.name),
        }
    }
}

/// `key=VALUE` of the last "transfer finished" line naming `volume_id`.
fn log_field(log: &Path, volume_id: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rfind(|l| l.contains("transfer finished") && l.contains(volume_id))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .trim_start_matches('"')
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

fn image(pool: &Path, volume_id: &str) -> anyhow::Result<PathBuf> {
    let hex = provisioner::VolumeId::parse(provisioner::ids::Kind::Volume, volume_id)
        .with_context(|| format!("not a volume ID: {volume_id}"))?
        .hex;
    Ok(pool.join("volumes").join(format!("{hex}.img")))
}

/// See the module's doc. `lan` has members `src`, `dst` and `r`; `certs` is `loopvol certs`'
/// output; `payload` holds `plan.crossnode_bytes` incompressible bytes.
pub async fn measure(
    plan: &Plan,
    dir: &Path,
    launch: &Launch,
    lan: &netns::Lan,
    certs: &Path,
    payload: &Path,
) -> anyhow::Result<Restore> {
    let cert = |f: &str| os(certs.join(f));
    let node_argv = |name: &str, cap: &str| -> anyhow::Result<(Vec<OsString>, PathBuf, PathBuf)> {
        let m = lan.member(name);
        let (pool, kubelet) = (dir.join(name).join("pool"), dir.join(name).join("kubelet"));
        std::fs::create_dir_all(&pool)?;
        std::fs::create_dir_all(&kubelet)?;
        let socket = dir.join(format!("{name}.sock"));
        let mut argv = vec![
            os("nsenter"),
            os(format!("--net={}", m.ns_path().display())),
            os("--"),
            os(&launch.bin),
        ];
        argv.extend(
            [
                "serve",
                "--mode",
                "node",
                "--node-id",
                name,
                "--log-level",
                "info",
                "--transfer-rate-limit",
                cap,
            ]
            .map(os),
        );
        argv.extend([
            os("--endpoint"),
            os(format!("unix://{}", socket.display())),
            os("--pool-dir"),
            os(&pool),
            os("--kubelet-dir"),
            os(&kubelet),
            os("--pool-listen"),
            os(format!("{}:{POOL_PORT}", m.ip)),
            os("--tls-cert"),
            cert("server.crt"),
            os("--tls-key"),
            cert("server.key"),
            os("--tls-ca"),
            cert("ca.crt"),
        ]);
        argv.extend(launch.extra_args.iter().map(os));
        Ok((argv, socket, pool))
    };
    let start = |name: &str, cap: &str| -> anyhow::Result<NodeProc> {
        let (argv, socket, _) = node_argv(name, cap)?;
        Ok(NodeProc {
            argv,
            log: dir.join(format!("{name}.log")),
            socket,
            child: None,
        })
    };
    let mut src = start("src", "0")?;
    src.spawn().await?;
    let mut dst = start("dst", "0")?;
    dst.spawn().await?;
    let (src_pool, dst_pool) = (dir.join("src/pool"), dir.join("dst/pool"));
    let endpoints = ["src", "dst"]
        .map(|n| format!("{n}=https://{}:{POOL_PORT}", lan.member(n).ip))
        .join(",");
    let rsock = dir.join("router.sock");
    let mut router = NodeProc {
        argv: vec![
            os("nsenter"),
            os(format!("--net={}", lan.member("r").ns_path().display())),
            os("--"),
            os(&launch.bin),
            os("serve"),
            os("--mode"),
            os("controller"),
            os("--node-id"),
            os("router"),
            os("--endpoint"),
            os(format!("unix://{}", rsock.display())),
            os("--node-endpoints"),
            os(endpoints),
            os("--tls-cert"),
            cert("client.crt"),
            os("--tls-key"),
            cert("client.key"),
            os("--tls-ca"),
            cert("ca.crt"),
        ],
        log: dir.join("router.log"),
        socket: rsock.clone(),
        child: None,
    };
    router.spawn().await?;
    let ch = Endpoint::from_shared(format!("unix://{}", rsock.display()))?
        .connect()
        .await?;
    let mut r = ControllerClient::new(ch);

    // The data: the payload's bytes in a block volume on src, and its snapshot.
    let bytes = plan.crossnode_bytes;
    let mut req = block("data", bytes);
    req.accessibility_requirements = Some(topology("src"));
    let data = r
        .create_volume(req)
        .await?
        .into_inner()
        .volume
        .context("no volume")?
        .volume_id;
    let img = image(&src_pool, &data)?;
    std::io::copy(
        &mut std::fs::File::open(payload)?,
        &mut std::fs::OpenOptions::new().write(true).open(&img)?,
    )?;
    std::fs::File::open(&img)?.sync_all()?;
    let allocated_bytes = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&img)?) * 512;
    let snap = r
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: data.clone(),
            name: "data-snap".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .snapshot
        .context("no snapshot")?
        .snapshot_id;

    // The restore, uncapped, timed from the first CreateVolume to the OK; ROUNDS of them,
    // the median kept with its own CPU and wire figures.
    let mut rounds = Vec::new();
    for round in 0..crate::crossnode::ROUNDS {
        let t = timed_restore(
            &mut r,
            [&src, &dst],
            lan,
            &dst_pool,
            payload,
            &snap,
            bytes,
            round,
        );
        rounds.push(t.await?);
    }
    let Timed {
        moved: restore_moved,
        cpu_s,
        wire_bytes,
        log_rate_mib_s,
        bytes_received,
    } = crate::crossnode::median_by(rounds, |t| &mut t.moved);
    // Pod IO on src: an ext4 volume staged there, fio 4k random reads.
    let src_csi = Csi::connect(&src.socket).await?;
    let mut pod = block("pod", 512 * MIB);
    pod.volume_capabilities = vec![crate::csi_ops::mount_capability(FsType::Ext4)];
    pod.accessibility_requirements = Some(topology("src"));
    pod.parameters = HashMap::from([(
        "allocation".to_string(),
        Allocation::Thin.as_str().to_string(),
    )]);
    let pod = r
        .create_volume(pod)
        .await?
        .into_inner()
        .volume
        .context("no volume")?
        .volume_id;
    let paths = MountPaths::prepare(&dir.join("src/kubelet"), "pod")?;
    src_csi.stage(&pod, &paths.staging, FsType::Ext4).await?;
    let outcome = pod_io(
        plan,
        &mut r,
        &mut dst,
        lan.member("dst"),
        &snap,
        &paths.staging,
        bytes,
    )
    .await;
    let unstaged = src_csi.unstage(&pod, &paths.staging).await;
    let pod_io = outcome?;
    unstaged?;
    src.stop();
    dst.stop();
    router.stop();
    Ok(Restore {
        moved: restore_moved,
        log_rate_mib_s,
        allocated_bytes,
        bytes_received,
        wire_bytes,
        cap: CAP.into(),
        pod_io,
        cpu_s,
    })
}

/// One timed restore's figures.
struct Timed {
    moved: Moved,
    cpu_s: [f64; 2],
    wire_bytes: u64,
    log_rate_mib_s: f64,
    bytes_received: u64,
}

/// Restore `snap` onto dst as round `round`, check its bytes against the payload, delete it.
#[allow(clippy::too_many_arguments)]
async fn timed_restore(
    r: &mut ControllerClient<Channel>,
    [src, dst]: [&NodeProc; 2],
    lan: &crate::crossnode::netns::Lan,
    dst_pool: &Path,
    payload: &Path,
    snap: &str,
    bytes: u64,
    round: usize,
) -> anyhow::Result<Timed> {
    let rx = lan.member("dst").rx_bytes();
    let cpu = [cpu_seconds(src.pid()), cpu_seconds(dst.pid())];
    let started = Instant::now();
    let req = restore_req(&format!("restore-{round}"), bytes, snap, "dst");
    let restored = create_until_ready(r, &req).await?;
    let took = started.elapsed();
    let wire_bytes = lan.member("dst").rx_bytes() - rx;
    let cpu_s = [
        cpu_seconds(src.pid()) - cpu[0],
        cpu_seconds(dst.pid()) - cpu[1],
    ];
    let log_rate_mib_s = log_field(&dst.log, &restored, "rate_mib_s").unwrap_or(0.0);
    let bytes_received = log_field(&dst.log, &restored, "bytes_received").unwrap_or(0.0) as u64;
    if std::fs::read(payload)? != std::fs::read(image(dst_pool, &restored)?)?[..bytes as usize] {
        bail!("the restored volume differs from the payload");
    }
    r.delete_volume(DeleteVolumeRequest {
        volume_id: restored,
        ..Default::default()
    })
    .await?;
    Ok(Timed {
        moved: moved("loopvol cross-node restore, no cap", bytes, took),
        cpu_s,
        wire_bytes,
        log_rate_mib_s,
        bytes_received,
    })
}

/// The volume an ABORTED "copying: … (volume vol-…@node from …)" message names.
fn volume_in_message(msg: &str) -> Option<String> {
    let at = msg.find("volume vol-")? + "volume ".len();
    Some(msg[at..].split([' ', ')']).next()?.to_string())
}

/// Delete the volume `req` names, whether it is complete or still being filled (which
/// cancels its copy).
async fn discard(
    r: &mut ControllerClient<Channel>,
    req: &CreateVolumeRequest,
) -> anyhow::Result<()> {
    let id = match r.create_volume(req.clone()).await {
        Ok(v) => v.into_inner().volume.context("no volume")?.volume_id,
        Err(s) => volume_in_message(s.message()).with_context(|| format!("{}: {s}", req.name))?,
    };
    r.delete_volume(DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    })
    .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn pod_io(
    plan: &Plan,
    r: &mut ControllerClient<Channel>,
    dst: &mut NodeProc,
    dst_member: &netns::Member,
    snap: &str,
    staging: &Path,
    bytes: u64,
) -> anyhow::Result<Vec<PodIo>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let engine = crate::fio::engine();
    let size_mib = 256;
    crate::fio::lay_out(staging, engine, size_mib)?;
    let job = crate::fio::JOBS[2];
    let runtime_s = if plan.crossnode_bytes < 512 * MIB {
        3
    } else {
        8
    };
    let fio = |staging: PathBuf| {
        tokio::task::spawn_blocking(move || {
            crate::fio::run(&job, &staging, engine, size_mib, runtime_s)
        })
    };
    let mut out = Vec::new();
    let f = fio(staging.to_path_buf()).await??;
    out.push(PodIo {
        condition: "no copy".into(),
        iops: f.iops,
        p99_us: f.clat_p99_us,
        copy_mib_s: None,
    });
    for cap in ["0", CAP] {
        if cap != "0" {
            // The cap is the receiving node's: restart dst with it.
            dst.stop();
            let at = dst
                .argv
                .iter()
                .position(|a| a == "--transfer-rate-limit")
                .context("no cap flag")?;
            dst.argv[at + 1] = os(cap);
            dst.spawn().await?;
        }
        // Copies back to back for as long as fio runs; what they move is counted on dst's
        // interface over the same window.
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (mut rc, snap2, stop2) = (r.clone(), snap.to_string(), stop.clone());
        let copier = tokio::spawn(async move {
            let mut k = 0;
            loop {
                let req = restore_req(&format!("busy-{cap}-{k}"), bytes, &snap2, "dst");
                let stopped = async {
                    while !stop2.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                };
                tokio::select! {
                    v = create_until_ready(&mut rc, &req) => { v?; }
                    _ = stopped => return anyhow::Ok(req),
                }
                discard(&mut rc, &req).await?;
                k += 1;
            }
        });
        let rx = dst_member.rx_bytes();
        let started = Instant::now();
        let f = fio(staging.to_path_buf()).await;
        let (wire, took) = (dst_member.rx_bytes() - rx, started.elapsed());
        stop.store(true, Ordering::Relaxed);
        let last = copier.await??;
        discard(r, &last).await?;
        let f = f??;
        out.push(PodIo {
            condition: if cap == "0" {
                "copies running, no cap".into()
            } else {
                format!("copies running, cap {cap}/s")
            },
            iops: f.iops,
            p99_us: f.clat_p99_us,
            copy_mib_s: Some(wire as f64 / MIB as f64 / took.as_secs_f64()),
        });
    }
    Ok(out)
}
