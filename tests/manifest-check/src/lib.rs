//! manifest-check: validates loopvol's Kubernetes manifests without a cluster.
//!
//! Every YAML document in `manifests/*.yaml` and `manifests/examples/*.yaml` is parsed into its
//! typed form (k8s-openapi for built-in kinds, small strict structs for the snapshot CRDs and the
//! Kustomization) and serialized back; anything that does not survive the round trip is a
//! misspelled or unknown field. Then cross-checks make sure the pieces fit together: driver name,
//! CSI socket paths, references between objects, namespaces, topology key, images, resources and
//! security contexts.
//!
//! Run it with `cargo test -p manifest-check`, or `cargo run -p manifest-check` for a report.

pub mod checks;
pub mod finding;
pub mod inventory;
pub mod kinds;
pub mod roundtrip;

pub use finding::Finding;
pub use inventory::{Inventory, Origin, SourceFile};

use std::fs;
use std::io;
use std::path::Path;

/// Check a set of manifest files; the result is sorted and empty when all is well.
pub fn check_files(files: Vec<SourceFile>) -> Vec<Finding> {
    let (inventory, mut findings) = Inventory::load(files);
    findings.extend(checks::run(&inventory));
    findings.sort();
    findings.dedup();
    findings
}

/// Read `manifests/*.yaml` and `manifests/examples/*.yaml` under the repository root.
pub fn read_manifests(root: &Path) -> io::Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    for dir in ["manifests", "manifests/examples"] {
        files.extend(read_yaml_files(root, dir)?);
    }
    Ok(files)
}

fn read_yaml_files(root: &Path, dir: &str) -> io::Result<Vec<SourceFile>> {
    let mut names: Vec<String> = fs::read_dir(root.join(dir))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let path = format!("{dir}/{name}");
            let text = fs::read_to_string(root.join(&path))?;
            Ok(SourceFile::new(&path, &text))
        })
        .collect()
}

/// Check the manifests of the repository at `root`.
pub fn check_repo(root: &Path) -> io::Result<Vec<Finding>> {
    Ok(check_files(read_manifests(root)?))
}

/// The repository this crate lives in (`tests/manifest-check` is two levels down).
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}
