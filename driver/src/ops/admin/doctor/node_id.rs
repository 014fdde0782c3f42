//! The node ID the pool belongs to (provisioner's `pool::identity`): a pool half-way through a
//! `loopvol pool set-node-id`, or whose objects name several nodes, is refused by every
//! `serve`; with `--node-id`, so is a pool of another node.

use std::path::Path;

use provisioner::pool::identity;

use super::Check;

const NAME: &str = "node ID";
const FIX: &str = "see \"Moving a pool to another node ID\" in docs/operations.md";

pub fn check(pool: &Path, node_id: Option<&str>) -> Check {
    if !pool.is_dir() {
        return Check::pass(
            NAME,
            "a new pool belongs to the node ID it is first served with",
        );
    }
    let id = match identity::identity(pool) {
        Ok(id) => id,
        Err(e) => return Check::fail(NAME, e.to_string(), FIX),
    };
    if let Some(why) = node_id.and_then(|n| identity::refusal(pool, &id, n)) {
        return Check::fail(NAME, why, FIX);
    }
    match id.owner {
        Some(owner) => Check::pass(
            NAME,
            format!("the pool belongs to node {owner:?}: serve it with --node-id {owner}"),
        ),
        None => Check::pass(
            NAME,
            "a new pool belongs to the node ID it is first served with",
        ),
    }
}
