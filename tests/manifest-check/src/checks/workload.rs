//! Pods inside workloads, and the containers in them: command lines, environment, mounts.

use crate::finding::Finding;
use crate::inventory::{Doc, Inventory};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodTemplateSpec, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::BTreeMap;

/// The container image name that kustomize's `images:` maps to the real driver image.
pub const DRIVER_IMAGE: &str = "loopvol";

/// A pod spec and the object that carries it.
pub struct PodRef<'a> {
    pub doc: &'a Doc,
    pub spec: &'a PodSpec,
    /// Labels of the pod template (or of the Pod).
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// The workload's pod selector (none for a bare Pod).
    pub selector: Option<&'a LabelSelector>,
    /// A DaemonSet: one pod per node.
    pub per_node: bool,
}

/// Every pod spec in the inventory: Deployments, DaemonSets, StatefulSets and bare Pods.
pub fn pods(inv: &Inventory) -> Vec<PodRef<'_>> {
    let mut out = Vec::new();
    for (doc, d) in inv.all::<Deployment>() {
        out.extend(template(doc, &d.spec.template, &d.spec.selector, false));
    }
    for (doc, d) in inv.all::<DaemonSet>() {
        out.extend(template(doc, &d.spec.template, &d.spec.selector, true));
    }
    for (doc, s) in inv.all::<StatefulSet>() {
        out.extend(template(doc, &s.spec.template, &s.spec.selector, false));
    }
    for (doc, p) in inv.all::<Pod>() {
        out.extend(p.spec.as_ref().map(|spec| PodRef {
            doc,
            spec,
            labels: p.metadata.labels.as_ref(),
            selector: None,
            per_node: false,
        }));
    }
    out
}

fn template<'a>(
    doc: &'a Doc,
    t: &'a PodTemplateSpec,
    selector: &'a LabelSelector,
    per_node: bool,
) -> Option<PodRef<'a>> {
    Some(PodRef {
        doc,
        spec: t.spec.as_ref()?,
        labels: t.metadata.as_ref().and_then(|m| m.labels.as_ref()),
        selector: Some(selector),
        per_node,
    })
}

impl<'a> PodRef<'a> {
    /// Init containers, then containers.
    pub fn containers(&self) -> impl Iterator<Item = &'a Container> {
        let spec: &'a PodSpec = self.spec;
        spec.init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
    }

    /// The loopvol container that serves, if this pod runs the driver (init containers run
    /// the same image for `loopvol certs bootstrap`, and serve nothing).
    pub fn driver(&self) -> Option<&'a Container> {
        self.spec.containers.iter().find(|c| is_driver(c))
    }

    /// Sidecars of one kind.
    pub fn sidecars(&self, kind: Sidecar) -> impl Iterator<Item = &'a Container> {
        self.containers().filter(move |c| sidecar(c) == Some(kind))
    }

    pub fn volume(&self, name: &str) -> Option<&'a Volume> {
        self.spec.volumes.iter().flatten().find(|v| v.name == name)
    }

    /// The hostPath behind a volume, if it is one.
    pub fn host_path(&self, volume: &str) -> Option<&'a str> {
        self.volume(volume)?
            .host_path
            .as_ref()
            .map(|h| h.path.as_str())
    }

    pub fn finding(&self, container: &Container, message: impl Into<String>) -> Finding {
        self.doc.finding(message).in_container(&container.name)
    }
}

/// The sig-storage sidecars loopvol is deployed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sidecar {
    Provisioner,
    Attacher,
    Resizer,
    Snapshotter,
    Registrar,
    LivenessProbe,
}

/// Which sidecar a container runs, judged by its image.
pub fn sidecar(c: &Container) -> Option<Sidecar> {
    let repository = image_repository(image(c));
    let last = repository.rsplit('/').next().unwrap_or(repository);
    Some(match last {
        "csi-provisioner" => Sidecar::Provisioner,
        "csi-attacher" => Sidecar::Attacher,
        "csi-resizer" => Sidecar::Resizer,
        "csi-snapshotter" => Sidecar::Snapshotter,
        "csi-node-driver-registrar" => Sidecar::Registrar,
        "livenessprobe" => Sidecar::LivenessProbe,
        _ => return None,
    })
}

/// Whether a container runs loopvol itself (by name or by image).
pub fn is_driver(c: &Container) -> bool {
    let repository = image_repository(image(c));
    c.name == DRIVER_IMAGE || repository == DRIVER_IMAGE || repository.ends_with("/loopvol")
}

pub fn image(c: &Container) -> &str {
    c.image.as_deref().unwrap_or("")
}

/// `registry/name` without `:tag` or `@digest`.
pub fn image_repository(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match without_digest.rfind(':') {
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[..colon],
        _ => without_digest,
    }
}

/// The tag of an image reference, if it has one.
pub fn image_tag(image: &str) -> Option<&str> {
    let repository = image_repository(image);
    let rest = &image[repository.len()..];
    let tag = rest.split('@').next().unwrap_or("");
    tag.strip_prefix(':')
}

/// A container's command line (`command` then `args`), with `$(VAR)` references to literal
/// `env` values expanded the way the kubelet does.
pub struct CommandLine {
    pub words: Vec<String>,
}

impl CommandLine {
    pub fn of(c: &Container) -> Self {
        let words = c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .map(|w| expand(w, c))
            .collect();
        CommandLine { words }
    }

    /// Whether `--name` is given, as `--name`, `--name=...` or `-name`.
    pub fn has(&self, name: &str) -> bool {
        self.words.iter().any(|w| flag_name(w) == Some(name))
    }

    /// Whether the boolean flag `--name` is given and not `--name=false`.
    pub fn is_on(&self, name: &str) -> bool {
        self.has(name) && self.value(name) != Some("false")
    }

    /// Every value of a repeatable flag, in order.
    pub fn values(&self, name: &str) -> Vec<&str> {
        (0..self.words.len())
            .filter_map(|i| {
                let word = &self.words[i];
                if flag_name(word) != Some(name) {
                    return None;
                }
                match word.split_once('=') {
                    Some((_, value)) => Some(value),
                    None => self
                        .words
                        .get(i + 1)
                        .filter(|next| !next.starts_with('-'))
                        .map(String::as_str),
                }
            })
            .collect()
    }

    /// The value of `--name=value` or `--name value`.
    pub fn value(&self, name: &str) -> Option<&str> {
        for (i, word) in self.words.iter().enumerate() {
            if flag_name(word) != Some(name) {
                continue;
            }
            if let Some((_, value)) = word.split_once('=') {
                return Some(value);
            }
            return self
                .words
                .get(i + 1)
                .filter(|next| !next.starts_with('-'))
                .map(String::as_str);
        }
        None
    }
}

fn flag_name(word: &str) -> Option<&str> {
    let stripped = word.strip_prefix("--").or_else(|| word.strip_prefix('-'))?;
    Some(stripped.split('=').next().unwrap_or(stripped))
}

/// Expand `$(VAR)` from the container's literal env values; unknown references stay as they are.
fn expand(word: &str, c: &Container) -> String {
    let mut out = word.to_string();
    for var in env_references(word) {
        let value = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == var)
            .and_then(|e| e.value.as_deref());
        if let Some(value) = value {
            out = out.replace(&format!("$({var})"), value);
        }
    }
    out
}

/// The `VAR`s of every `$(VAR)` in a word.
pub fn env_references(word: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = word;
    while let Some(start) = rest.find("$(") {
        // `$$(` is the kubelet's escape for a literal `$(` (a shell's `$((n+1))`).
        if rest[..start].ends_with('$') {
            rest = &rest[start + 2..];
            continue;
        }
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) => {
                out.push(&after[..end]);
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

/// Whether env `var` of the container comes from the downward API field `field`.
pub fn env_from_field(c: &Container, var: &str, field: &str) -> bool {
    c.env.iter().flatten().any(|e| {
        e.name == var
            && e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .is_some_and(|f| f.field_path == field)
    })
}

/// A CSI endpoint (`unix:///csi/csi.sock`, `unix:/csi/csi.sock` or `/csi/csi.sock`) as a path.
pub fn socket_path(endpoint: &str) -> &str {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    path.strip_prefix("unix:").unwrap_or(path)
}

/// The mount that holds `path` inside the container, and `path` relative to the mount.
pub fn mount_for<'a>(c: &'a Container, path: &'a str) -> Option<(&'a VolumeMount, &'a str)> {
    c.volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let rest = path.strip_prefix(m.mount_path.trim_end_matches('/'))?;
            rest.strip_prefix('/').map(|rel| (m, rel))
        })
        .max_by_key(|(m, _)| m.mount_path.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(args: &[&str]) -> Container {
        Container {
            name: "c".into(),
            args: Some(args.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn flags_in_both_spellings() {
        let cl = CommandLine::of(&container(&[
            "serve",
            "--endpoint",
            "unix:///csi/csi.sock",
            "--leader-election",
            "--timeout=60s",
        ]));
        assert_eq!(cl.value("endpoint"), Some("unix:///csi/csi.sock"));
        assert_eq!(cl.value("timeout"), Some("60s"));
        assert_eq!(cl.value("leader-election"), None);
        assert!(cl.has("leader-election"));
        assert!(cl.is_on("leader-election"));
        assert!(!CommandLine::of(&container(&["--enable-capacity=false"])).is_on("enable-capacity"));
        assert!(!cl.has("strict-topology"));
    }

    #[test]
    fn images_split_into_repository_and_tag() {
        assert_eq!(
            image_repository("registry.k8s.io/sig-storage/livenessprobe:v2.20.0"),
            "registry.k8s.io/sig-storage/livenessprobe"
        );
        assert_eq!(
            image_tag("registry.k8s.io/sig-storage/livenessprobe:v2.20.0"),
            Some("v2.20.0")
        );
        assert_eq!(
            image_repository("localhost:5000/loopvol"),
            "localhost:5000/loopvol"
        );
        assert_eq!(image_tag("localhost:5000/loopvol"), None);
        assert_eq!(image_tag("busybox@sha256:abc"), None);
        assert_eq!(image_repository("busybox:1.37@sha256:abc"), "busybox");
        assert_eq!(image_tag("busybox:1.37@sha256:abc"), Some("1.37"));
    }

    #[test]
    fn env_references_are_found() {
        assert_eq!(env_references("--node-id=$(NODE_NAME)"), vec!["NODE_NAME"]);
        assert_eq!(env_references("$(A)/$(B)"), vec!["A", "B"]);
        assert!(env_references("plain").is_empty());
        assert!(env_references("n=$$((n+1))").is_empty());
    }

    #[test]
    fn endpoints_become_paths() {
        assert_eq!(socket_path("unix:///csi/csi.sock"), "/csi/csi.sock");
        assert_eq!(socket_path("unix:/csi/csi.sock"), "/csi/csi.sock");
        assert_eq!(socket_path("/csi/csi.sock"), "/csi/csi.sock");
    }
}
