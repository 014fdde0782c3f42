//! `loopvol doctor`: can this node run loopvol, and is its pool sound? Each check prints ✔, ⚠
//! or ✘, and every ⚠ and ✘ says what to do about it. The exit status is non-zero when any check
//! fails; a warning (loopvol works, but less well than an operator would expect) does not fail.
//!
//! Everything here is safe next to a running driver: the pool is read without its locks, and
//! the only writes are two small scratch files (O_DIRECT and reflink probes) that are removed
//! again, named so that nothing in the pool ever mistakes them for a volume.

mod frozen;
mod growth;
mod kernel;
mod node_id;
mod orphans;
mod pool_fs;
mod propagation;
mod space;
mod staged;
mod tools;

use std::path::{Path, PathBuf};

use provisioner::FsType;

use crate::ops::pool_args::PoolSpec;

#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// The pool directory (it need not exist yet: its future filesystem is checked then).
    #[arg(long, default_value = "/var/lib/loopvol", env = "LOOPVOL_POOL_DIR")]
    pub pool_dir: PathBuf,
    /// The kubelet's root directory, whose mount must propagate mounts to the host.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// The driver's --overcommit-ratio, for the free space check.
    #[arg(long, default_value_t = 1.0, value_parser = crate::shared::units::parse_overcommit_ratio)]
    pub overcommit_ratio: f64,
    /// Filesystems to check tools for (the ones your StorageClasses use).
    #[arg(
        long = "fs-type",
        value_delimiter = ',',
        default_value = "ext4,xfs,btrfs"
    )]
    pub fs_types: Vec<FsType>,
    /// The node ID the driver will serve the pool as: checked against the one the pool
    /// belongs to. Not checked when not given.
    #[arg(long, env = "LOOPVOL_NODE_ID")]
    pub node_id: Option<String>,
    /// Also check a named pool, as the driver serves it (repeatable, the same
    /// NAME=DIR[,OPTS] as `serve --pool`): each of its checks names the pool.
    #[arg(long = "pool", value_name = "NAME=DIR[,OPTS]", value_parser = crate::ops::pool_args::parse_pool_spec)]
    pub pools: Vec<PoolSpec>,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Fine; the text says what was found (and notes anything worth knowing).
    Pass(String),
    /// Works, but not as an operator would expect: what they will see, and how to avoid it.
    Warn { problem: String, fix: String },
    /// A problem, and the fix to apply.
    Fail { problem: String, fix: String },
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            verdict: Verdict::Pass(detail.into()),
        }
    }

    fn fail(name: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            verdict: Verdict::Fail {
                problem: problem.into(),
                fix: fix.into(),
            },
        }
    }

    fn warn(name: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            verdict: Verdict::Warn {
                problem: problem.into(),
                fix: fix.into(),
            },
        }
    }

    pub fn failed(&self) -> bool {
        matches!(self.verdict, Verdict::Fail { .. })
    }

    pub fn warned(&self) -> bool {
        matches!(self.verdict, Verdict::Warn { .. })
    }
}

/// Run every check and print the report; returns the process exit code (0: all passed).
pub fn main(args: &DoctorArgs) -> i32 {
    let checks = run(args);
    for c in &checks {
        match &c.verdict {
            Verdict::Pass(detail) => println!("✔ {}: {detail}", c.name),
            Verdict::Warn { problem, fix } => {
                println!("⚠ {}: {problem}", c.name);
                println!("    to avoid it: {fix}");
            }
            Verdict::Fail { problem, fix } => {
                println!("✘ {}: {problem}", c.name);
                println!("    fix: {fix}");
            }
        }
    }
    let failed = checks.iter().filter(|c| c.failed()).count();
    let warned = checks.iter().filter(|c| c.warned()).count();
    let warnings = match warned {
        0 => String::new(),
        1 => " (1 with a warning)".to_string(),
        n => format!(" ({n} with warnings)"),
    };
    if failed == 0 {
        println!("all {} checks passed{warnings}", checks.len());
        0
    } else {
        println!("{failed} of {} checks failed{warnings}", checks.len());
        1
    }
}

/// Every check, in the order a person would fix them: the node's, then each pool's.
pub fn run(args: &DoctorArgs) -> Vec<Check> {
    let mut checks = vec![kernel::loop_support()];
    checks.extend(tools::check(&args.fs_types));
    checks.extend(growth::ext4_online(&args.fs_types));
    checks.push(propagation::kubelet_dir(&args.kubelet_dir));
    let node_id = args.node_id.as_deref();
    if args.pools.is_empty() {
        checks.extend(pool_checks(
            &args.pool_dir,
            args.overcommit_ratio,
            node_id,
            None,
        ));
        return checks;
    }
    // Several pools, as `serve` and `status` take them: the default pool (--pool-dir) first,
    // unless a --pool names it.
    if !args
        .pools
        .iter()
        .any(|p| p.name == provisioner::ids::DEFAULT_POOL)
    {
        let default = provisioner::ids::DEFAULT_POOL;
        checks.extend(pool_checks(
            &args.pool_dir,
            args.overcommit_ratio,
            node_id,
            Some(default),
        ));
    }
    for p in &args.pools {
        checks.extend(pool_checks(
            &p.dir,
            p.overcommit_ratio,
            node_id,
            Some(&p.name),
        ));
    }
    checks
}

/// One pool's checks; with a name (several pools), each check says which pool it is about.
fn pool_checks(
    dir: &Path,
    overcommit_ratio: f64,
    node_id: Option<&str>,
    name: Option<&str>,
) -> Vec<Check> {
    let probe_dir = existing_ancestor(dir);
    let mut checks = vec![
        pool_fs::pool_dir(dir),
        node_id::check(dir, node_id),
        pool_fs::direct_io(&probe_dir),
        pool_fs::reflink(&probe_dir, name),
        space::free_space(dir, &probe_dir, overcommit_ratio),
    ];
    checks.extend(orphans::check(dir));
    checks.push(frozen::check(dir));
    checks.push(staged::check(dir));
    if let Some(name) = name {
        for c in &mut checks {
            c.name = format!("{} in pool {name}", c.name);
        }
    }
    checks
}

/// The pool directory, or where it will be created: the filesystem checks need a directory on
/// the filesystem the pool will live on.
fn existing_ancestor(dir: &Path) -> PathBuf {
    dir.ancestors()
        .find(|d| d.is_dir())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}
