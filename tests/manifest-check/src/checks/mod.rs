//! Cross-checks between manifest objects. Each check looks at the whole inventory and returns
//! what is wrong, in terms an operator can act on.

mod containers;
mod driver;
mod images;
mod kustomize;
mod namespaces;
mod quantity;
mod references;
mod security;
mod sockets;
mod storage;
pub mod workload;

use crate::finding::Finding;
use crate::inventory::Inventory;

/// The namespace everything loopvol installs lives in.
pub const NAMESPACE: &str = "loopvol-system";
/// The topology key the node plugin reports; its value is the node name.
pub const TOPOLOGY_KEY: &str = "topology.loopvol.csi.dev/node";

type Check = fn(&Inventory) -> Vec<Finding>;

const CHECKS: &[Check] = &[
    namespaces::check,
    driver::check,
    sockets::check,
    references::check,
    kustomize::check,
    images::check,
    containers::check,
    security::check,
    storage::check,
];

/// Run every cross-check.
pub fn run(inv: &Inventory) -> Vec<Finding> {
    CHECKS.iter().flat_map(|check| check(inv)).collect()
}
