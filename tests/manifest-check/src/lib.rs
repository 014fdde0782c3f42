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
pub mod render;
pub mod roundtrip;

pub use finding::Finding;
pub use inventory::{Inventory, Origin, SourceFile};

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Check a set of manifest files; the result is sorted and empty when all is well.
pub fn check_files(files: Vec<SourceFile>) -> Vec<Finding> {
    let (inventory, mut findings) = Inventory::load(files);
    findings.extend(checks::run(&inventory));
    findings.sort();
    findings.dedup();
    findings
}

/// Read `manifests/*.yaml`, `manifests/examples/*.yaml` and the objects of the optional
/// components (`manifests/components/*/`, without their kustomization.yaml).
pub fn read_manifests(root: &Path) -> io::Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    for dir in ["manifests", "manifests/examples"] {
        files.extend(read_yaml_files(root, dir)?);
    }
    for component in component_dirs(root)? {
        let dir = format!("manifests/components/{component}");
        files.extend(
            read_yaml_files(root, &dir)?
                .into_iter()
                .filter(|f| !f.path.ends_with("/kustomization.yaml")),
        );
    }
    Ok(files)
}

fn sorted_dirs(dir: &Path) -> io::Result<Vec<String>> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    names.sort();
    Ok(names)
}

/// The optional components, by directory name.
pub fn component_dirs(root: &Path) -> io::Result<Vec<String>> {
    sorted_dirs(&root.join("manifests/components"))
}

/// The kubelet root directory a component moves the node plugin to, if it does.
pub fn kubelet_dir_of(component: &str) -> Option<&'static str> {
    match component {
        "kubelet-k0s" => Some("/var/lib/k0s/kubelet"),
        "kubelet-microk8s" => Some("/var/snap/microk8s/common/var/lib/kubelet"),
        _ => None,
    }
}

/// One way to install loopvol: the default, the default plus one component, or an overlay.
#[derive(Debug, Clone)]
pub struct Configuration {
    pub name: String,
    /// The directory `kubectl kustomize` would be given, if there is one.
    pub dir: Option<PathBuf>,
    pub components: Vec<PathBuf>,
    /// Where that configuration's kubelet keeps its directory.
    pub kubelet_dir: &'static str,
}

/// Every configuration CI checks: `manifests/`, `manifests/` with each component, and each
/// overlay under `overlays/`.
pub fn configurations(root: &Path) -> io::Result<Vec<Configuration>> {
    let manifests = root.join("manifests");
    let mut out = vec![Configuration {
        name: "manifests".into(),
        dir: Some(manifests.clone()),
        components: vec![],
        kubelet_dir: DEFAULT_KUBELET_DIR,
    }];
    for c in component_dirs(root)? {
        out.push(Configuration {
            name: format!("manifests + components/{c}"),
            dir: None,
            components: vec![manifests.join("components").join(&c)],
            kubelet_dir: kubelet_dir_of(&c).unwrap_or(DEFAULT_KUBELET_DIR),
        });
    }
    for o in sorted_dirs(&root.join("overlays"))? {
        if let Some((_, why)) = NOT_RENDERED.iter().find(|(n, _)| *n == o) {
            eprintln!("overlays/{o} is not rendered here: {why}");
            continue;
        }
        out.push(Configuration {
            name: format!("overlays/{o}"),
            dir: Some(root.join("overlays").join(&o)),
            components: vec![],
            kubelet_dir: DEFAULT_KUBELET_DIR,
        });
    }
    Ok(out)
}

impl Configuration {
    pub fn render(&self) -> Result<Vec<serde_json::Value>, String> {
        match &self.dir {
            Some(d) => render::render(d),
            None => {
                let base = self.components[0].join("../..");
                render::render_with(&base, &self.components)
            }
        }
    }

    /// Render and check; a render failure is a finding too.
    pub fn check(&self) -> Vec<Finding> {
        let path = format!("rendered {}", self.name);
        match self.render() {
            Err(e) => vec![Finding::file(&path, format!("does not render: {e}"))],
            Ok(objects) => check_rendered(&path, &objects, self.kubelet_dir),
        }
    }
}

/// Overlays this crate cannot render, and why (so nothing here checks them; `kubectl
/// kustomize` renders them once their certificates exist).
pub const NOT_RENDERED: &[(&str, &str)] = &[(
    "snapshot-metadata",
    "it needs certificates generated per cluster (secretGenerator) and uses a strategic-merge \
     patch, which the renderer does not implement",
)];

/// The kubelet's directory on most distributions.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";

/// Check the output of a kustomize build (everything the cluster would receive).
pub fn check_rendered(
    path: &str,
    objects: &[serde_json::Value],
    kubelet_dir: &str,
) -> Vec<Finding> {
    let file = SourceFile {
        path: path.to_string(),
        origin: Origin::Install,
        text: render::to_yaml(objects),
    };
    let (mut inventory, mut findings) = Inventory::load(vec![file]);
    inventory.rendered = true;
    inventory.kubelet_dir = kubelet_dir.to_string();
    findings.extend(checks::run(&inventory));
    findings.sort();
    findings.dedup();
    findings
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

/// Check the manifests of the repository at `root`: the files, then every configuration as
/// rendered.
pub fn check_repo(root: &Path) -> io::Result<Vec<Finding>> {
    let mut findings = check_files(read_manifests(root)?);
    for c in configurations(root)? {
        findings.extend(c.check());
    }
    Ok(findings)
}

/// The repository this crate lives in (`tests/manifest-check` is two levels down).
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}
