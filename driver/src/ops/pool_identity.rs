//! `loopvol pool set-node-id`: give a pool to another node ID on purpose. A pool belongs to one
//! node ID (every volume, snapshot and group ID ends in `@<node>`) and every `serve` of another
//! is refused (provisioner's `pool::identity`); this is the way to move it, with the driver
//! stopped and nothing staged, and it prints the old → new ID of everything it re-keyed, since
//! PersistentVolumes name the old handles.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use provisioner::pool::rekey::{self, Report};
use serde::Serialize;

use crate::ops::admin::output::table;
use crate::ops::admin::{print_json, Output};

/// Test hook: kill the process (SIGKILL, as a crash would end it) after this many records
/// are rewritten, leaving an interrupted re-key behind.
pub const ABORT_AFTER_ENV: &str = "LOOPVOL_TEST_REKEY_ABORT_AFTER";

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Move the pool to another node ID: re-key every volume, snapshot and group snapshot
    /// (and every ID their records name) to NEW, and print old → new. Needs every loopvol on
    /// the pool stopped and nothing staged; an interrupted run is finished by running it again.
    /// Existing PersistentVolumes name the old IDs and must be recreated (docs/operations.md).
    SetNodeId(SetNodeIdArgs),
}

#[derive(Debug, Args)]
pub struct SetNodeIdArgs {
    /// Directory holding the pool's backing files and records.
    #[arg(long, default_value = "/var/lib/loopvol", env = "LOOPVOL_POOL_DIR")]
    pub pool_dir: PathBuf,
    /// The node ID the pool is to belong to (the value `serve --node-id` will then be given).
    pub new_node_id: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Output,
}

pub fn main(cmd: PoolCommand) -> anyhow::Result<()> {
    match cmd {
        PoolCommand::SetNodeId(a) => set_node_id(&a),
    }
}

fn set_node_id(args: &SetNodeIdArgs) -> anyhow::Result<()> {
    let node_dir = args.pool_dir.join("node");
    let attached = crate::datapath::in_use_hook(crate::datapath::default_path());
    let pool_dir = args.pool_dir.clone();
    // What the node uses: a staging record (the kubelet will unstage it by its old ID), or
    // an image a block device still reads whatever the records say.
    let in_use = move |hex: &str| -> Option<String> {
        if let Ok(Some(s)) = crate::node_state::load(&node_dir, hex) {
            return Some(format!("staged at {}", s.staging_path.display()));
        }
        let image = pool_dir.join("volumes").join(format!("{hex}.img"));
        attached
            .user_of(&image)
            .map(|device| format!("attached to {device}"))
    };
    let abort_after: Option<usize> = std::env::var(ABORT_AFTER_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    let mut rewritten = 0;
    let mut progress = |_: &std::path::Path| {
        rewritten += 1;
        if abort_after == Some(rewritten) {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    };
    let report = rekey::set_node_id(&args.pool_dir, &args.new_node_id, &in_use, &mut progress)
        .map_err(|e| match e {
            provisioner::PoolError::PoolLocked(lock) => anyhow::anyhow!(
                "{} is held by a running loopvol: stop every loopvol serving {} first",
                lock.display(),
                args.pool_dir.display()
            ),
            e => anyhow::Error::from(e),
        })
        .with_context(|| format!("set the node ID of {}", args.pool_dir.display()))?;
    print_report(&args.pool_dir, &report, args.output)
}

#[derive(Serialize)]
struct Printed<'a> {
    pool: &'a std::path::Path,
    from: &'a [String],
    to: &'a str,
    /// An interrupted earlier run was finished.
    resumed: bool,
    ids: &'a [rekey::Renamed],
    unreadable: &'a [PathBuf],
}

fn print_report(pool: &std::path::Path, r: &Report, output: Output) -> anyhow::Result<()> {
    for u in &r.unreadable {
        eprintln!(
            "warning: {} does not parse and keeps its old ID (the driver quarantines it at start)",
            u.display()
        );
    }
    let from = if r.plan.from.is_empty() {
        String::new()
    } else {
        format!(" (was {})", r.plan.from.join(", "))
    };
    eprintln!(
        "{}the pool {} belongs to node {:?}{from}; {} IDs changed. Serve it with --node-id {}; \
         PersistentVolumes that name an old ID must be recreated (docs/operations.md)",
        if r.resumed {
            "finished an interrupted run: "
        } else {
            ""
        },
        pool.display(),
        r.plan.to,
        r.plan.ids.len(),
        r.plan.to
    );
    if output == Output::Json {
        return print_json(&Printed {
            pool,
            from: &r.plan.from,
            to: &r.plan.to,
            resumed: r.resumed,
            ids: &r.plan.ids,
            unreadable: &r.unreadable,
        });
    }
    let rows: Vec<Vec<String>> = r
        .plan
        .ids
        .iter()
        .map(|m| vec![m.kind.clone(), m.old.clone(), m.new.clone()])
        .collect();
    if !rows.is_empty() {
        print!("{}", table(&["KIND", "OLD ID", "NEW ID"], &rows));
    }
    Ok(())
}
