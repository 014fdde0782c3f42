//! loopvol's benchmark harness. Starts the release `loopvol serve --mode all` on a private
//! socket and pool, drives it over CSI the way csi-provisioner and kubelet do, measures the
//! same kernel work done directly (the floor) in the same run, and writes benchmarks.json and
//! benchmarks.md: into target/bench, or with --record into docs/ (the recorded full run).

mod attach;
mod crossnode;
mod crossnode_restore;
mod csi_ops;
mod datapath;
mod driver;
mod encryption;
mod fio;
mod floor;
mod footprint;
mod iolimits;
mod load;
mod machine;
mod plan;
mod provisioning;
mod report;
mod results;
mod scale;
mod stats;
mod tools;
mod workspace;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;

use crate::csi_ops::Csi;
use crate::driver::{Driver, Launch};
use crate::plan::Plan;
use crate::results::{Footprint, Meta, Results};
use crate::workspace::Workspace;

const SECTIONS: [&str; 7] = [
    "provisioning",
    "attach",
    "datapath",
    "encryption",
    "scale",
    "iolimits",
    "crossnode",
];

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Benchmark loopvol against the bare kernel steps"
)]
struct Args {
    /// Smaller batches and 50 volumes at scale: a smoke run of every section.
    #[arg(long)]
    quick: bool,
    /// Where benchmarks.json and benchmarks.md are written (default: target/bench, a scratch
    /// dir, so that no run overwrites the recorded one by accident).
    #[arg(long, default_value_os_t = default_out_dir(), conflicts_with = "record")]
    out_dir: PathBuf,
    /// Write docs/benchmarks.json and docs/benchmarks.md: replace the recorded full run. Not
    /// with --quick, whose small batches are no record.
    #[arg(long, conflicts_with = "quick")]
    record: bool,
    /// Parent of the private temp dir (its filesystem is the pool's).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// Run only these sections (comma-separated): provisioning, attach, datapath,
    /// encryption, scale, iolimits, crossnode.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(SECTIONS))]
    only: Vec<String>,
    /// The loopvol binary; default: `loopvol` next to this binary.
    #[arg(long)]
    loopvol: Option<PathBuf>,
    /// Do not (re)build the loopvol binary when run under cargo.
    #[arg(long)]
    no_build: bool,
    /// Passed to `loopvol serve` as --max-concurrent-ops (default: the driver's own).
    #[arg(long)]
    max_concurrent_ops: Option<usize>,
    /// Volumes in the scale section (default: 1000, or 50 with --quick).
    #[arg(long)]
    scale_volumes: Option<usize>,
    /// Client workers in the scale section (default: 32; csi-provisioner runs 100).
    #[arg(long)]
    scale_concurrency: Option<usize>,
    /// Keep the main driver's log here (default: in the temp dir, removed at the end).
    #[arg(long)]
    driver_log: Option<PathBuf>,
    /// Regenerate the Markdown from a saved results JSON, measuring nothing.
    #[arg(long)]
    render: Option<PathBuf>,
}

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ sits in the workspace")
        .to_path_buf()
}

fn default_out_dir() -> PathBuf {
    workspace_dir().join("target/bench")
}

/// Where this run's files go: docs/ only when asked for with --record.
fn out_dir(args: &Args) -> PathBuf {
    if args.record {
        workspace_dir().join("docs")
    } else {
        args.out_dir.clone()
    }
}

fn write_markdown(out_dir: &Path, results: &Results) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let md = out_dir.join("benchmarks.md");
    std::fs::write(&md, report::render(results))
        .with_context(|| format!("write {}", md.display()))?;
    eprintln!("wrote {}", md.display());
    Ok(())
}

fn write_outputs(out_dir: &Path, results: &Results) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let json = out_dir.join("benchmarks.json");
    std::fs::write(&json, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("write {}", json.display()))?;
    eprintln!("wrote {}", json.display());
    write_markdown(out_dir, results)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.render {
        let results: Results = serde_json::from_str(&std::fs::read_to_string(path)?)
            .with_context(|| format!("read {}", path.display()))?;
        return write_markdown(&out_dir(&args), &results);
    }
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark needs root (loop devices, mounts)"
    );
    let bin = driver::locate_binary(args.loopvol.clone(), !args.no_build)?;
    // Declared before everything that mounts, so it is dropped (and sweeps) last.
    let ws = Workspace::new(&args.work_dir)?;
    // Every staging and target path of the run lies in the workspace, which is therefore the
    // driver's allowed root (it never sees the kubelet's directory).
    let mut extra_args = vec![
        "--allowed-root".to_string(),
        ws.root().to_string_lossy().into_owned(),
    ];
    if let Some(n) = args.max_concurrent_ops {
        extra_args.extend(["--max-concurrent-ops".to_string(), n.to_string()]);
    }
    let launch = Launch { bin, extra_args };
    eprintln!("working in {}", ws.root().display());
    let outcome = tokio::select! {
        r = run(&args, &launch, &ws) => r,
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    // Whatever happened, nothing of ours stays mounted or attached.
    let swept = ws.sweep();
    if !swept.unmounted.is_empty() || !swept.detached.is_empty() {
        eprintln!("swept {swept:?}");
    }
    let mut results = outcome?;
    let (mounts, loops) = ws.leftovers();
    results.leftover_mounts = mounts.iter().map(|p| p.display().to_string()).collect();
    results.leftover_loops = loops.iter().map(|p| p.display().to_string()).collect();
    write_outputs(&out_dir(&args), &results)?;
    anyhow::ensure!(
        mounts.is_empty() && loops.is_empty(),
        "left behind: mounts {mounts:?}, loop devices {loops:?}"
    );
    Ok(())
}

async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// Record a section's failure as a note and sweep what it left, so later sections still run.
fn section_failed(results: &mut Results, ws: &Workspace, name: &str, e: anyhow::Error) {
    eprintln!("{name} FAILED: {e:#}");
    results
        .notes
        .push(format!("The {name} section failed: {e:#}"));
    ws.sweep();
}

async fn run(args: &Args, launch: &Launch, ws: &Workspace) -> anyhow::Result<Results> {
    let started = Instant::now();
    let mut plan = Plan::new(args.quick);
    if let Some(n) = args.scale_volumes {
        plan.scale_volumes = n;
    }
    if let Some(c) = args.scale_concurrency {
        plan.scale_concurrency = c;
    }
    let sections: Vec<String> = if args.only.is_empty() {
        SECTIONS.iter().map(|s| s.to_string()).collect()
    } else {
        args.only.clone()
    };
    let wants = |s: &str| sections.iter().any(|x| x == s);
    let mut results = Results {
        meta: Meta {
            date_utc: machine::date_utc(),
            commit: machine::commit(&workspace_dir()),
            mode: if args.quick { "quick" } else { "full" }.into(),
            machine: machine::describe(ws.root()),
            loopvol_binary: launch.bin.display().to_string(),
            // The flags that shape the figures; the workspace's --allowed-root (like its
            // socket and pool) is plumbing and differs on every run.
            loopvol_args: launch
                .extra_args
                .chunks(2)
                .filter(|pair| pair[0] != "--allowed-root")
                .flatten()
                .cloned()
                .collect(),
            tools: machine::tool_versions(),
            sections: sections.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    if fio::engine() != "libaio" && wants("datapath") {
        results.notes.push(
            "fio has no libaio engine here: the data path ran with psync (queue depth 1).".into(),
        );
    }

    eprintln!("footprint: start-to-ready on an empty pool");
    let start_empty = footprint::start_times(launch, ws, plan.start_repetitions).await?;

    let main_dir = ws.subdir("main")?;
    let (mut drv, _) = Driver::start(
        launch,
        &main_dir.join("pool"),
        &main_dir.join("csi.sock"),
        &args
            .driver_log
            .clone()
            .unwrap_or_else(|| main_dir.join("driver.log")),
    )
    .await?;
    let mut csi = Csi::connect(&drv.socket).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle_bytes = drv.memory()?.rss_bytes;

    if wants("provisioning") {
        eprintln!("provisioning: CreateVolume / DeleteVolume");
        match provisioning::run(&plan, ws, launch, &csi).await {
            Ok(p) => results.provisioning = Some(p),
            Err(e) => section_failed(&mut results, ws, "provisioning", e),
        }
    }
    if wants("attach") {
        eprintln!("attach: stage+publish vs floor");
        match attach::run(&plan, ws, &csi).await {
            Ok(a) => results.attach = Some(a),
            Err(e) => section_failed(&mut results, ws, "attach", e),
        }
    }
    if wants("datapath") {
        eprintln!("data path: fio");
        match datapath::run(&plan, ws, &csi).await {
            Ok(d) => results.data_path = Some(d),
            Err(e) => section_failed(&mut results, ws, "data path", e),
        }
    }
    if wants("encryption") {
        eprintln!("encryption: fio on an fscrypt volume and an unencrypted one");
        match encryption::run(&plan, ws, &csi).await {
            Ok(e) => results.encryption = Some(e),
            Err(e) => section_failed(&mut results, ws, "encryption", e),
        }
    }
    if wants("scale") {
        eprintln!("scale: {} volumes", plan.scale_volumes);
        match scale::run(&plan, ws, &mut drv, &mut csi).await {
            Ok(s) => results.scale = Some(s),
            Err(e) => section_failed(&mut results, ws, "scale", e),
        }
    }
    if wants("iolimits") {
        eprintln!("IO limits: fio in a cgroup against configured limits");
        match iolimits::run(&plan, ws, launch).await {
            Ok(l) => results.io_limits = Some(l),
            Err(e) => section_failed(&mut results, ws, "IO limits", e),
        }
    }
    if wants("crossnode") {
        eprintln!("cross-node: the same bytes between two network namespaces");
        match crossnode::run(&plan, ws, launch).await {
            Ok(c) => results.cross_node = Some(c),
            Err(e) => section_failed(&mut results, ws, "cross-node", e),
        }
    }
    // The scale section restarts the driver: the peak is the larger of the two processes'.
    let peak_rss_bytes = drv
        .memory()
        .map(|m| m.peak_rss_bytes)
        .unwrap_or(0)
        .max(results.scale.as_ref().map_or(0, |s| s.peak_rss_bytes));
    drv.stop().await?;
    results.footprint = Some(Footprint {
        binary_bytes: footprint::binary_bytes(launch),
        rss_idle_bytes,
        peak_rss_bytes,
        start_empty,
    });
    results.meta.duration_s = started.elapsed().as_secs_f64();
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_record_writes_docs() {
        let parse = |argv: &[&str]| Args::try_parse_from([&["bench"], argv].concat());
        let quick = parse(&["--quick"]).unwrap();
        assert_eq!(out_dir(&quick), workspace_dir().join("target/bench"));
        assert_eq!(
            out_dir(&parse(&[]).unwrap()),
            workspace_dir().join("target/bench")
        );
        let record = parse(&["--record"]).unwrap();
        assert_eq!(out_dir(&record), workspace_dir().join("docs"));
        let scratch = parse(&["--out-dir", "/tmp/x"]).unwrap();
        assert_eq!(out_dir(&scratch), Path::new("/tmp/x"));
        assert!(parse(&["--record", "--quick"]).is_err());
        assert!(parse(&["--record", "--out-dir", "docs"]).is_err());
    }
}
