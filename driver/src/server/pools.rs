//! Open the node's pools at start: `--pool-dir` (the pool `default`) and every `--pool`, each
//! with its own lock, repairs, overcommit ratio and size cap.

use anyhow::{bail, Context};
use provisioner::ids::DEFAULT_POOL;
use provisioner::{Pool, PoolOptions, Pools};

use crate::cli::ServeArgs;
use crate::ops::pool_args::PoolSpec;
use crate::shared::Mode;

/// The pools `args` name: `--pool default=DIR` stands in for `--pool-dir` (the CLI refuses
/// both), so the default pool is always there and existing installs need no new flag.
pub fn specs(args: &ServeArgs) -> anyhow::Result<Vec<PoolSpec>> {
    let mut specs = args.pools.clone();
    if !specs.iter().any(|s| s.name == DEFAULT_POOL) {
        specs.insert(0, PoolSpec::default_of(&args.pool));
    }
    for (i, s) in specs.iter().enumerate() {
        if let Some(twin) = specs[..i].iter().find(|t| t.name == s.name) {
            bail!(
                "--pool {} is given twice ({} and {})",
                s.name,
                twin.dir.display(),
                s.dir.display()
            );
        }
        if let Some(twin) = specs[..i].iter().find(|t| same_dir(&t.dir, &s.dir)) {
            bail!(
                "pools {} and {} are the same directory {}",
                twin.name,
                s.name,
                s.dir.display()
            );
        }
    }
    Ok(specs)
}

fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    a == b || std::fs::canonicalize(a).is_ok_and(|x| std::fs::canonicalize(b).is_ok_and(|y| x == y))
}

/// Open every pool (blocking: locks, start-up repair, record loading), logging the repairs.
pub fn open(args: &ServeArgs, node_id: &str) -> anyhow::Result<Pools> {
    let mut pools = Vec::new();
    for spec in specs(args)? {
        let opts = PoolOptions {
            dir: spec.dir.clone(),
            name: spec.name.clone(),
            node_id: node_id.to_string(),
            overcommit_ratio: spec.overcommit_ratio,
            // A node serving its pools to the router owns them outright.
            writer: matches!(args.mode, Mode::Controller | Mode::All)
                || args.multi.pool_listen.is_some(),
            node: matches!(args.mode, Mode::Node | Mode::All),
            in_use: crate::datapath::in_use_hook(crate::datapath::default_path()),
        };
        let (mut pool, repairs) = Pool::open(opts)
            .with_context(|| format!("open pool {} at {}", spec.name, spec.dir.display()))?;
        pool.set_max_bytes(spec.max_bytes);
        for r in &repairs {
            tracing::warn!(pool = %spec.name, repair = %r, "pool repaired at start-up");
        }
        pools.push(pool);
    }
    Ok(Pools::new(pools)?)
}
