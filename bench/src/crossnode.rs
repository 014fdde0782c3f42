//! Cross-node data movement: the raw floor of the path a cross-node restore takes (issue 24).
//! Two network namespaces on one private bridge — the same network the multi-node tests build,
//! from the same code (tests/common/netns.rs) — and the same N bytes of a file sent from one to
//! the other by
//! - a trivial mTLS sender and receiver on loopvol's TLS stack (rustls with the ring provider,
//!   what tonic's `tls-ring` runs), with the node and router certificates `loopvol certs`
//!   writes, the receiver requiring the client certificate as the pool API does;
//! - `cat FILE | socat -u STDIN TCP:…` into `socat -u TCP-LISTEN:… STDOUT`: plain TCP.
//!
//! The file is read from the page cache (written just before), the receiver counts and drops
//! the bytes: the figures are the network path's, not a disk's. loopvol's own restore over
//! the same network is measured beside them ([`measure_cross_node_restore`]).

#[path = "../../tests/common/netns.rs"]
#[allow(dead_code)]
pub(crate) mod netns;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

use crate::driver::Launch;
use crate::plan::{Plan, MIB};
use crate::workspace::Workspace;

const PORT: u16 = 7444;
const PIECE: usize = 1 << 20;
/// The O_DIRECT floor's write size: loopvol's transfer chunk.
const DIRECT_BLOCK: usize = 4 << 20;

/// Each floor and the restore are measured this many times, interleaved, and their medians
/// compared: one run of each differed by up to 30 % between runs on this shared machine.
pub const ROUNDS: usize = 3;

/// One way of moving the bytes, measured: the median of its rounds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Moved {
    pub method: String,
    pub bytes: u64,
    pub seconds: f64,
    pub mib_per_s: f64,
    /// MiB/s of every round, in order (empty in runs recorded before rounds).
    #[serde(default)]
    pub samples: Vec<f64>,
}

/// The median of `rounds` of the same method (an odd count, so a measured round).
pub(crate) fn median(rounds: Vec<Moved>) -> Moved {
    median_by(rounds, |m| m)
}

/// The round whose [`Moved`] (`moved` of it) has the median rate, that `Moved` given every
/// round's rate as its samples.
pub(crate) fn median_by<T>(mut rounds: Vec<T>, moved: impl Fn(&mut T) -> &mut Moved) -> T {
    let samples: Vec<f64> = rounds.iter_mut().map(|r| moved(r).mib_per_s).collect();
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by(|&a, &b| samples[a].total_cmp(&samples[b]));
    let mut m = rounds.swap_remove(order[order.len() / 2]);
    moved(&mut m).samples = samples;
    m
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CrossNode {
    pub bytes: u64,
    pub floors: Vec<Moved>,
    /// A floor that could not run here, and why.
    pub missing: Vec<String>,
    /// loopvol's cross-node restore of a volume holding `bytes` of data (issue 24); `None`
    /// in runs recorded before it existed.
    pub restore: Option<crate::crossnode_restore::Restore>,
}

pub async fn run(plan: &Plan, ws: &Workspace, launch: &Launch) -> anyhow::Result<CrossNode> {
    let dir = ws.subdir("crossnode")?;
    let lan = netns::Lan::new(&["src", "dst", "r"]).map_err(anyhow::Error::msg)?;
    let (src, dst) = (lan.member("src"), lan.member("dst"));
    let certs = dir.join("certs");
    crate::tools::run(
        &launch.bin.to_string_lossy(),
        ["certs".as_ref(), "--out".as_ref(), certs.as_os_str()],
    )?;
    let payload = dir.join("payload");
    write_payload(&payload, plan.crossnode_bytes)?;
    let mut out = CrossNode {
        bytes: plan.crossnode_bytes,
        ..Default::default()
    };
    // The restore also writes what it receives: the same floor into a file on the disk the
    // pools are on, synced at the end, says what that costs on this machine, both through the
    // page cache and past it as loopvol's sink writes.
    let sink = dir.join("received");
    let socat = Command::new("socat").arg("-V").output().is_ok();
    if !socat {
        out.missing
            .push("cat | socat: socat is not installed (scripts/deps.sh installs it)".into());
    }
    let mut rounds: Vec<Vec<Moved>> = Vec::new();
    for _ in 0..ROUNDS {
        let mut this = Vec::new();
        for s in [Sink::Drop, Sink::Buffered(&sink), Sink::Direct(&sink)] {
            this.push(tls_floor(src, dst, &certs, &payload, s)?);
            if !matches!(s, Sink::Drop) {
                std::fs::remove_file(&sink)?;
            }
        }
        if socat {
            this.push(socat_floor(src, dst, &payload)?);
        }
        rounds.push(this);
    }
    for i in 0..rounds[0].len() {
        out.floors
            .push(median(rounds.iter().map(|r| r[i].clone()).collect()));
    }
    // A failed restore keeps the floors: it is said in the section instead.
    match measure_cross_node_restore(plan, &dir, launch, &lan, &certs, &payload).await {
        Ok(r) => out.restore = Some(r),
        Err(e) => out
            .missing
            .push(format!("loopvol cross-node restore: {e:#}")),
    }
    std::fs::remove_file(&payload)?;
    Ok(out)
}

/// loopvol's own cross-node restore over the same network: two node plugins in namespaces
/// of the floor's LAN, a volume with `plan.crossnode_bytes` of the payload's bytes on one,
/// restored from its snapshot onto the other (crossnode_restore.rs).
async fn measure_cross_node_restore(
    plan: &Plan,
    dir: &Path,
    launch: &Launch,
    lan: &netns::Lan,
    certs: &Path,
    payload: &Path,
) -> anyhow::Result<crate::crossnode_restore::Restore> {
    crate::crossnode_restore::measure(plan, dir, launch, lan, certs, payload).await
}

/// Incompressible bytes (xorshift), so no layer can shrink them.
fn write_payload(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; PIECE];
    let mut left = bytes;
    while left > 0 {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(PIECE as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.into_inner()?.sync_all()?;
    Ok(())
}

pub(crate) fn moved(method: &str, bytes: u64, took: Duration) -> Moved {
    let seconds = took.as_secs_f64();
    Moved {
        method: method.into(),
        bytes,
        seconds,
        mib_per_s: bytes as f64 / MIB as f64 / seconds,
        samples: Vec::new(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the mTLS floor's receiver does with the bytes.
#[derive(Clone, Copy)]
enum Sink<'a> {
    /// Counts and drops them: the network path alone.
    Drop,
    /// Writes them into the file through the page cache and fsyncs it before the clock stops
    /// (what `socat … > file; sync` does).
    Buffered(&'a Path),
    /// Writes them into the file with `O_DIRECT` from an aligned 4 MiB buffer, as loopvol's
    /// sink does (what `dd oflag=direct` does), and fsyncs it.
    Direct(&'a Path),
}

/// The mTLS floor; with a file sink, the receiver writes what it gets into it (the disk's
/// part of the path a restore takes).
fn tls_floor(
    src: &netns::Member,
    dst: &netns::Member,
    certs: &Path,
    payload: &Path,
    sink: Sink,
) -> anyhow::Result<Moved> {
    let pem_certs = |f: &str| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        Ok(CertificateDer::pem_file_iter(certs.join(f))?.collect::<Result<_, _>>()?)
    };
    let key = |f: &str| PrivateKeyDer::from_pem_file(certs.join(f));
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs("ca.crt")? {
        roots.add(c)?;
    }
    let roots = Arc::new(roots);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()?;
    let server = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(pem_certs("server.crt")?, key("server.key")?)?,
    );
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(pem_certs("client.crt")?, key("client.key")?)?,
    );
    let addr = (dst.ip, PORT);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (mut out, direct) = match sink {
        Sink::Drop => (None, false),
        Sink::Buffered(p) => (Some(std::fs::File::create(p)?), false),
        Sink::Direct(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(p)?;
            (Some(f), true)
        }
    };
    let method = match sink {
        Sink::Drop => "mTLS (rustls, ring), 1 MiB writes",
        Sink::Buffered(_) => "mTLS (rustls, ring), 1 MiB writes, received into a file + fsync",
        Sink::Direct(_) => {
            "mTLS (rustls, ring), 1 MiB writes, received into a file with O_DIRECT + fsync"
        }
    };
    let receiver = dst.spawn_in(move || -> anyhow::Result<_> {
        let listener = TcpListener::bind(addr)?;
        let _ = ready_tx.send(());
        let (tcp, _) = listener.accept()?;
        let conn = rustls::ServerConnection::new(server)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut buf = vec![0u8; PIECE];
        let mut got = 0u64;
        // O_DIRECT: whole aligned 4 MiB blocks out of an aligned window of `staged`.
        let mut staged = vec![0u8; DIRECT_BLOCK + 4096];
        let at = staged.as_ptr().align_offset(4096);
        let mut fill = 0usize;
        loop {
            match tls.read(&mut buf) {
                Ok(0) => break,
                Ok(n) if direct => {
                    let mut left = &buf[..n];
                    while !left.is_empty() {
                        let take = left.len().min(DIRECT_BLOCK - fill);
                        staged[at + fill..at + fill + take].copy_from_slice(&left[..take]);
                        (fill, left) = (fill + take, &left[take..]);
                        if fill == DIRECT_BLOCK {
                            let f = out.as_mut().expect("a direct sink has a file");
                            f.write_all(&staged[at..at + fill])?;
                            fill = 0;
                        }
                    }
                    got += n as u64
                }
                Ok(n) => {
                    if let Some(f) = out.as_mut() {
                        f.write_all(&buf[..n])?;
                    }
                    got += n as u64
                }
                Err(e) => return Err(e.into()),
            }
        }
        if fill > 0 {
            anyhow::bail!("the O_DIRECT floor needs a payload of whole 4 MiB blocks");
        }
        if let Some(f) = out {
            f.sync_all()?;
        }
        Ok((got, Instant::now()))
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the TLS receiver did not listen")?;
    let bytes = std::fs::metadata(payload)?.len();
    let payload = payload.to_path_buf();
    let started = Instant::now();
    let sender = src.spawn_in(move || -> anyhow::Result<_> {
        let tcp = TcpStream::connect(addr)?;
        let name = ServerName::try_from("loopvol-node")?;
        let conn = rustls::ClientConnection::new(client, name)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut file = std::fs::File::open(&payload)?;
        let mut buf = vec![0u8; PIECE];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            tls.write_all(&buf[..n])?;
        }
        tls.conn.send_close_notify();
        tls.flush()?;
        // Half-close and wait for the receiver to close: closing with the server's session
        // tickets unread would reset the connection under the receiver's last reads.
        tls.sock.shutdown(std::net::Shutdown::Write)?;
        let mut rest = [0u8; 4096];
        while matches!(tls.sock.read(&mut rest), Ok(n) if n > 0) {}
        Ok(())
    });
    let sent = sender.join().expect("TLS sender thread");
    let received = receiver.join().expect("TLS receiver thread");
    let (got, done) = match (sent, received) {
        (Ok(()), Ok(r)) => r,
        (s, r) => bail!("mTLS floor: sender {:?}, receiver {:?}", s.err(), r.err()),
    };
    if got != bytes {
        bail!("mTLS floor: {got} of {bytes} bytes arrived");
    }
    Ok(moved(method, got, done - started))
}

fn socat_floor(src: &netns::Member, dst: &netns::Member, payload: &Path) -> anyhow::Result<Moved> {
    let bytes = std::fs::metadata(payload)?.len();
    let mut receiver = dst
        .command("socat")
        .args([
            "-u",
            &format!("TCP-LISTEN:{PORT},bind={}", dst.ip),
            "STDOUT",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("start socat (receiver)")?;
    let mut received = receiver.stdout.take().unwrap();
    let counter = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; PIECE];
        let mut got = 0u64;
        loop {
            match received.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n as u64,
            }
        }
    });
    // Listening once its namespace's TCP table says so.
    let tcp = std::path::PathBuf::from(format!("/proc/{}/net/tcp", receiver.id()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !netns::tcp_listeners(&tcp).contains(&(dst.ip, PORT)) {
        if Instant::now() > deadline {
            let _ = receiver.kill();
            let _ = receiver.wait();
            bail!("socat did not listen on {}:{PORT}", dst.ip);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let mut cat = src
        .command("cat")
        .arg(payload)
        .stdout(Stdio::piped())
        .spawn()
        .context("start cat")?;
    let sender = src
        .command("socat")
        .args(["-u", "STDIN", &format!("TCP:{}:{PORT}", dst.ip)])
        .stdin(Stdio::from(cat.stdout.take().unwrap()))
        .status()
        .context("run socat (sender)")?;
    let got = counter.join().expect("socat counter thread")?;
    let took = started.elapsed();
    let _ = cat.wait();
    let _ = receiver.wait();
    if !sender.success() || got != bytes {
        bail!("cat | socat: {got} of {bytes} bytes arrived (sender {sender})");
    }
    Ok(moved("cat | socat (TCP, no TLS)", got, took))
}

/// The section of benchmarks.md.
pub fn render(md: &mut String, c: &CrossNode) {
    use std::fmt::Write as _;
    md.push_str("## Cross-node transfer\n\n");
    let _ = writeln!(
        md,
        "The same {} MiB of incompressible data (a file in the page cache) sent between two \
         network namespaces joined by veth pairs to a bridge, the network the multi-node tests \
         run on: the raw floor of a cross-node restore (issue 24).\n",
        c.bytes / MIB
    );
    let _ = writeln!(
        md,
        "Every method ran {ROUNDS} times, interleaved in one run; the table shows each one's \
         median and its rounds.\n"
    );
    md.push_str("| method | MiB | seconds | MiB/s | rounds (MiB/s) |\n|---|---:|---:|---:|---|\n");
    let rounds = |m: &Moved| {
        m.samples
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for m in &c.floors {
        let _ = writeln!(
            md,
            "| floor: {} | {} | {:.2} | {:.0} | {} |",
            m.method.replace('|', "\\|"),
            m.bytes / MIB,
            m.seconds,
            m.mib_per_s,
            rounds(m)
        );
    }
    match &c.restore {
        Some(r) => {
            let m = &r.moved;
            let _ = writeln!(
                md,
                "| loopvol cross-node restore (CreateVolume → OK, no cap) | {} | {:.2} | {:.0} | {} |",
                m.bytes / MIB,
                m.seconds,
                m.mib_per_s,
                rounds(m)
            );
            render_restore(md, c, r);
        }
        None => md.push_str("| loopvol cross-node restore | – | – | not measured | |\n"),
    }
    for m in &c.missing {
        let _ = writeln!(md, "\nNot measured: {m}.");
    }
    md.push('\n');
}

/// The restore's ratios to the floor and to the allocated bytes, and the source pod's IO.
fn render_restore(md: &mut String, c: &CrossNode, r: &crate::crossnode_restore::Restore) {
    use std::fmt::Write as _;
    let mib = |b: u64| b as f64 / MIB as f64;
    md.push_str(
        "\nThe restore: a raw block volume on one node holding these bytes, its snapshot \
         restored onto a node in the other namespace (topology as csi-provisioner sends it with \
         strict topology), CreateVolume retried on ABORTED every 50 ms as the sidecar does, \
         the node plugins and the router are the benchmarked loopvol binary, `--transfer-rate-limit 0`.\n\n",
    );
    let floor = |wants: &dyn Fn(&str) -> bool| {
        c.floors
            .iter()
            .find(|f| f.method.starts_with("mTLS") && wants(&f.method))
    };
    let ratio = |f: &Moved| r.moved.mib_per_s / f.mib_per_s;
    let written = [
        floor(&|m| m.contains("fsync") && !m.contains("O_DIRECT")),
        floor(&|m| m.contains("O_DIRECT")),
    ];
    if let [Some(buffered), Some(direct)] = written {
        let _ = writeln!(
            md,
            "- throughput against the floor of the same path (issue 24's target: at least \
             0.7×), the trivial mTLS program that also writes what it receives to the \
             target's disk and syncs it, as a restore must before the volume exists: {:.2}× \
             the one writing through the page cache, {:.2}× the one writing with O_DIRECT",
            ratio(buffered),
            ratio(direct)
        );
    }
    if let Some(tls) = floor(&|m| !m.contains("fsync")) {
        let _ = writeln!(
            md,
            "- {:.2}× the mTLS floor that drops what it receives (the network alone, no disk); \
             the target's log line says {:.0} MiB/s for the copy itself",
            ratio(tls),
            r.log_rate_mib_s
        );
    }
    let _ = writeln!(
        md,
        "- CPU: the source node plugin spent {:.2} s (user + system), the target {:.2} s, in \
         {:.2} s of wall time",
        r.cpu_s[0], r.cpu_s[1], r.moved.seconds
    );
    let _ = writeln!(
        md,
        "- bytes: {:.1} MiB allocated in the source, {:.1} MiB of chunk data received, {:.1} MiB \
         on the target's interface (every header of every layer): {:.3}× the allocated bytes \
         (target: at most 1.1×)\n",
        mib(r.allocated_bytes),
        mib(r.bytes_received),
        mib(r.wire_bytes),
        r.wire_bytes as f64 / r.allocated_bytes.max(1) as f64
    );
    let _ = writeln!(
        md,
        "The pods' IO on the source node while copies run back to back: fio 4 KiB random reads \
         (direct, queue depth 32) on an ext4 volume staged there, with no copy, copies with no \
         cap, and copies with the receiving node capped at {}/s (the default is 256Mi; the \
         lower value makes the cap's effect visible at this machine's rates).\n",
        r.cap
    );
    md.push_str("| source node | IOPS | p99 µs | copy MiB/s on the wire |\n|---|---:|---:|---:|\n");
    for p in &r.pod_io {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {} |",
            p.condition,
            p.iops,
            p.p99_us,
            p.copy_mib_s.map_or("–".into(), |v| format!("{v:.0}"))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The median round is kept whole, with every round's rate in run order.
    #[test]
    fn the_median_round_keeps_its_figures_and_all_samples() {
        let round = |s: u64| (s, moved("m", MIB, Duration::from_secs(s)));
        let (secs, m) = median_by(vec![round(1), round(4), round(2)], |r| &mut r.1);
        assert_eq!(secs, 2);
        assert_eq!(m.samples, vec![1.0, 0.25, 0.5]);
        assert_eq!(median(vec![m.clone()]).mib_per_s, 0.5);
    }

    #[test]
    fn the_restore_row_says_not_measured_until_there_is_a_figure() {
        let mut c = CrossNode {
            bytes: 64 * MIB,
            floors: vec![moved("cat | socat", 64 * MIB, Duration::from_millis(500))],
            ..Default::default()
        };
        let mut md = String::new();
        render(&mut md, &c);
        assert!(md.contains("| loopvol cross-node restore | – | – | not measured |"));
        // A method's own `|` does not split its table cell.
        assert!(
            md.contains("| floor: cat \\| socat | 64 | 0.50 | 128 |"),
            "{md}"
        );
        c.restore = Some(crate::crossnode_restore::Restore {
            moved: moved("restore", 64 * MIB, Duration::from_secs(1)),
            allocated_bytes: 64 * MIB,
            wire_bytes: 66 * MIB,
            pod_io: vec![crate::crossnode_restore::PodIo {
                condition: "no copy".into(),
                iops: 1000.0,
                p99_us: 250.0,
                copy_mib_s: None,
            }],
            ..Default::default()
        });
        md.clear();
        render(&mut md, &c);
        assert!(
            md.contains(
                "| loopvol cross-node restore (CreateVolume → OK, no cap) | 64 | 1.00 | 64 |"
            ),
            "{md}"
        );
        assert!(md.contains("1.031× the allocated bytes"), "{md}");
        assert!(md.contains("| no copy | 1000 | 250 | – |"), "{md}");
        assert!(!md.contains("not measured"));
    }
}
