//! fio: the four standard jobs (sequential 1 MiB read/write, random 4 KiB read/write), direct
//! I/O, run against one directory, read back from fio's JSON output.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::tools;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    Sequential,
    Random,
}

#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub name: &'static str,
    /// fio's `--rw`.
    pub rw: &'static str,
    pub block_size: &'static str,
    pub iodepth: u32,
    pub pattern: Pattern,
}

impl Job {
    pub fn is_read(&self) -> bool {
        self.rw.contains("read")
    }
}

pub const JOBS: [Job; 4] = [
    Job {
        name: "seq-read-1m",
        rw: "read",
        block_size: "1m",
        iodepth: 8,
        pattern: Pattern::Sequential,
    },
    Job {
        name: "seq-write-1m",
        rw: "write",
        block_size: "1m",
        iodepth: 8,
        pattern: Pattern::Sequential,
    },
    Job {
        name: "rand-read-4k",
        rw: "randread",
        block_size: "4k",
        iodepth: 32,
        pattern: Pattern::Random,
    },
    Job {
        name: "rand-write-4k",
        rw: "randwrite",
        block_size: "4k",
        iodepth: 32,
        pattern: Pattern::Random,
    },
];

/// The data file every job works on, in the directory under test.
pub const DATA_FILE: &str = "fio.dat";

/// One job's result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub bw_mib_s: f64,
    pub iops: f64,
    pub clat_p50_us: f64,
    pub clat_p99_us: f64,
}

/// libaio when this fio has it, else psync (which ignores iodepth).
pub fn engine() -> &'static str {
    let engines = tools::output_text("fio", &["--enghelp"]).unwrap_or_default();
    if engines.lines().any(|l| l.trim() == "libaio") {
        "libaio"
    } else {
        "psync"
    }
}

fn common_args(dir: &Path, engine: &str, size_mib: u64) -> Vec<String> {
    vec![
        "--name=bench".into(),
        format!("--directory={}", dir.display()),
        format!("--filename={DATA_FILE}"),
        format!("--size={size_mib}m"),
        format!("--ioengine={engine}"),
        "--direct=1".into(),
        "--numjobs=1".into(),
        // The file is laid out by `lay_out`; never let fio fallocate a fresh one, whose
        // unwritten extents would read back as zeros without touching the device.
        "--fallocate=none".into(),
    ]
}

/// Write the data file in full once, so reads read real blocks and thin volumes have their
/// blocks allocated before anything is measured.
pub fn lay_out(dir: &Path, engine: &str, size_mib: u64) -> anyhow::Result<()> {
    let mut args = common_args(dir, engine, size_mib);
    args.extend([
        "--rw=write".into(),
        "--bs=1m".into(),
        "--end_fsync=1".into(),
    ]);
    tools::run("fio", &args).context("lay out the fio data file")?;
    Ok(())
}

/// Run `job` for `runtime_s` seconds (after a 1 s ramp) in `dir`.
pub fn run(
    job: &Job,
    dir: &Path,
    engine: &str,
    size_mib: u64,
    runtime_s: u64,
) -> anyhow::Result<Figures> {
    run_in(job, dir, engine, size_mib, runtime_s, None)
}

/// [`run`], with fio inside `cgroup` (a v1 blkio or v2 directory) when one is given: its IO is
/// then charged, and throttled, there.
pub fn run_in(
    job: &Job,
    dir: &Path,
    engine: &str,
    size_mib: u64,
    runtime_s: u64,
    cgroup: Option<&Path>,
) -> anyhow::Result<Figures> {
    let out = tempfile::NamedTempFile::new()?;
    let mut args = common_args(dir, engine, size_mib);
    args.extend([
        format!("--rw={}", job.rw),
        format!("--bs={}", job.block_size),
        format!("--iodepth={}", job.iodepth),
        "--time_based".into(),
        format!("--runtime={runtime_s}"),
        "--ramp_time=1".into(),
        "--randrepeat=0".into(),
        "--group_reporting".into(),
        "--output-format=json".into(),
        format!("--output={}", out.path().display()),
    ]);
    match cgroup {
        None => tools::run("fio", &args),
        // The shell only moves itself into the cgroup; the paths are arguments, never code.
        Some(cg) => tools::run(
            "sh",
            [
                "-c".to_string(),
                r#"echo $$ > "$0/cgroup.procs" && exec fio "$@""#.to_string(),
                cg.display().to_string(),
            ]
            .into_iter()
            .chain(args),
        ),
    }
    .with_context(|| format!("fio {}", job.name))?;
    let json = std::fs::read_to_string(out.path())?;
    parse(&json, job.is_read())
}

/// Read one job's figures from fio's `--output-format=json`. fio may print notices before the
/// JSON document, so parsing starts at the first `{`.
pub fn parse(output: &str, read: bool) -> anyhow::Result<Figures> {
    let start = output.find('{').context("no JSON in fio's output")?;
    let doc: serde_json::Value =
        serde_json::from_str(&output[start..]).context("parse fio's JSON output")?;
    let side = doc
        .get("jobs")
        .and_then(|j| j.get(0))
        .and_then(|j| j.get(if read { "read" } else { "write" }))
        .context("fio's JSON has no jobs[0].read/write")?;
    let num = |v: Option<&serde_json::Value>| v.and_then(serde_json::Value::as_f64);
    let bw_bytes = num(side.get("bw_bytes"))
        .or_else(|| num(side.get("bw")).map(|kib| kib * 1024.0))
        .context("fio's JSON has no bandwidth")?;
    let iops = num(side.get("iops")).context("fio's JSON has no iops")?;
    let pct = |p: &str| num(side.get("clat_ns")?.get("percentile")?.get(p)).map(|ns| ns / 1e3);
    Ok(Figures {
        bw_mib_s: bw_bytes / (1 << 20) as f64,
        iops,
        clat_p50_us: pct("50.000000").unwrap_or(0.0),
        clat_p99_us: pct("99.000000").unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "bench",
      "read" : {
        "io_bytes" : 1073741824,
        "bw_bytes" : 209715200,
        "bw" : 204800,
        "iops" : 51200.5,
        "clat_ns" : {
          "min" : 1000,
          "percentile" : {
            "1.000000" : 2000,
            "50.000000" : 150000,
            "99.000000" : 1200000
          }
        }
      },
      "write" : {
        "io_bytes" : 0,
        "bw_bytes" : 0,
        "bw" : 0,
        "iops" : 0.0,
        "clat_ns" : { "min" : 0 }
      }
    }
  ]
}"#;

    #[test]
    fn parses_the_read_side() {
        let f = parse(SAMPLE, true).unwrap();
        assert_eq!(f.bw_mib_s, 200.0);
        assert_eq!(f.iops, 51200.5);
        assert_eq!(f.clat_p50_us, 150.0);
        assert_eq!(f.clat_p99_us, 1200.0);
    }

    #[test]
    fn parses_the_write_side_without_percentiles() {
        let f = parse(SAMPLE, false).unwrap();
        assert_eq!((f.bw_mib_s, f.iops, f.clat_p99_us), (0.0, 0.0, 0.0));
    }

    #[test]
    fn falls_back_to_kib_bandwidth_and_rejects_garbage() {
        let old = r#"{"jobs":[{"write":{"bw":1024,"iops":256}}]}"#;
        let f = parse(old, false).unwrap();
        assert_eq!(f.bw_mib_s, 1.0);
        assert_eq!(f.iops, 256.0);
        assert!(parse("fio: engine libaio not loadable", true).is_err());
        assert!(parse(r#"{"jobs":[]}"#, true).is_err());
    }

    #[test]
    fn the_jobs_are_the_four_asked_for() {
        let names: Vec<_> = JOBS.iter().map(|j| j.name).collect();
        assert_eq!(
            names,
            [
                "seq-read-1m",
                "seq-write-1m",
                "rand-read-4k",
                "rand-write-4k"
            ]
        );
        assert!(JOBS[0].is_read() && !JOBS[1].is_read() && JOBS[2].is_read());
    }
}
