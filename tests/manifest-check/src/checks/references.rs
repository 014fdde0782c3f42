//! Everything one object refers to by name exists in the manifests: service accounts, config
//! maps, secrets, roles, claims, storage and snapshot classes, volumes, snapshots.

use super::storage;
use super::workload::{pods, PodRef};
use crate::finding::Finding;
use crate::inventory::{Doc, Inventory};
use crate::kinds::{
    VolumeGroupSnapshot, VolumeGroupSnapshotClass, VolumeSnapshot, VolumeSnapshotClass,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolumeClaim, PodSpec, Secret, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

pub fn check(inv: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    for pod in pods(inv) {
        out.extend(pod_references(inv, &pod));
        out.extend(selector(&pod));
    }
    out.extend(role_bindings(inv));
    out.extend(custom_resource_rules(inv));
    out.extend(claims(inv));
    out.extend(snapshots(inv));
    out.extend(group_snapshots(inv));
    out
}

/// A reference from a pod spec to a namespaced object.
struct Reference {
    kind: &'static str,
    name: String,
    /// Where the reference is, e.g. `volume config` or `env FOO`.
    from: String,
    container: Option<String>,
}

impl Reference {
    fn new(kind: &'static str, name: &str, from: String, container: Option<&Container>) -> Self {
        Reference {
            kind,
            name: name.to_string(),
            from,
            container: container.map(|c| c.name.clone()),
        }
    }
}

fn pod_references(inv: &Inventory, pod: &PodRef) -> Vec<Finding> {
    let namespace = pod.doc.effective_namespace();
    references(pod.spec)
        .into_iter()
        .filter(|r| !exists(inv, r.kind, namespace, &r.name))
        .map(|r| {
            let finding = pod.doc.finding(format!(
                "{} refers to {} {}, which is not defined in the manifests",
                r.from,
                r.kind,
                qualified(namespace, &r.name)
            ));
            match &r.container {
                Some(c) => finding.in_container(c),
                None => finding,
            }
        })
        .collect()
}

fn exists(inv: &Inventory, kind: &str, namespace: &str, name: &str) -> bool {
    match kind {
        "ServiceAccount" => inv.has::<ServiceAccount>(namespace, name),
        // Published into every namespace by kube-controller-manager (the API server's CA).
        "ConfigMap" if name == "kube-root-ca.crt" => true,
        "ConfigMap" => inv.has::<ConfigMap>(namespace, name),
        "Secret" => inv.has::<Secret>(namespace, name) || generated_secret(inv, namespace, name),
        "PersistentVolumeClaim" => inv.has::<PersistentVolumeClaim>(namespace, name),
        _ => false,
    }
}

/// A Secret the kustomization generates under exactly this name (no hash suffix, or the
/// reference would miss it).
fn generated_secret(inv: &Inventory, namespace: &str, name: &str) -> bool {
    inv.in_origin::<crate::kinds::Kustomization>(crate::inventory::Origin::Install)
        .any(|(_, k)| {
            let exact = k
                .generator_options
                .as_ref()
                .and_then(|o| o.disable_name_suffix_hash)
                == Some(true);
            exact
                && k.secret_generator
                    .iter()
                    .any(|g| g.name == name && g.namespace.as_deref().unwrap_or("") == namespace)
        })
}

fn qualified(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

/// Every required (non-optional) reference a pod spec makes.
fn references(spec: &PodSpec) -> Vec<Reference> {
    let mut out = Vec::new();
    let account = spec
        .service_account_name
        .as_ref()
        .or(spec.service_account.as_ref());
    if let Some(sa) = account {
        out.push(Reference::new(
            "ServiceAccount",
            sa,
            "serviceAccountName".into(),
            None,
        ));
    }
    for secret in spec.image_pull_secrets.iter().flatten() {
        out.push(Reference::new(
            "Secret",
            &secret.name,
            "imagePullSecrets".into(),
            None,
        ));
    }
    for volume in spec.volumes.iter().flatten() {
        let from = || format!("volume {}", volume.name);
        if let Some(cm) = volume
            .config_map
            .as_ref()
            .filter(|c| c.optional != Some(true))
        {
            out.push(Reference::new("ConfigMap", &cm.name, from(), None));
        }
        if let Some(name) = volume
            .secret
            .as_ref()
            .filter(|s| s.optional != Some(true))
            .and_then(|s| s.secret_name.as_ref())
        {
            out.push(Reference::new("Secret", name, from(), None));
        }
        if let Some(claim) = &volume.persistent_volume_claim {
            out.push(Reference::new(
                "PersistentVolumeClaim",
                &claim.claim_name,
                from(),
                None,
            ));
        }
        for source in volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
        {
            if let Some(cm) = source
                .config_map
                .as_ref()
                .filter(|c| c.optional != Some(true))
            {
                out.push(Reference::new("ConfigMap", &cm.name, from(), None));
            }
            if let Some(s) = source.secret.as_ref().filter(|s| s.optional != Some(true)) {
                out.push(Reference::new("Secret", &s.name, from(), None));
            }
        }
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    for c in containers {
        out.extend(container_references(c));
    }
    out
}

fn container_references(c: &Container) -> Vec<Reference> {
    let mut out = Vec::new();
    for env in c.env.iter().flatten() {
        let from = || format!("env {}", env.name);
        let source = env.value_from.as_ref();
        if let Some(r) = source
            .and_then(|s| s.config_map_key_ref.as_ref())
            .filter(|r| r.optional != Some(true))
        {
            out.push(Reference::new("ConfigMap", &r.name, from(), Some(c)));
        }
        if let Some(r) = source
            .and_then(|s| s.secret_key_ref.as_ref())
            .filter(|r| r.optional != Some(true))
        {
            out.push(Reference::new("Secret", &r.name, from(), Some(c)));
        }
    }
    for env_from in c.env_from.iter().flatten() {
        if let Some(r) = env_from
            .config_map_ref
            .as_ref()
            .filter(|r| r.optional != Some(true))
        {
            out.push(Reference::new(
                "ConfigMap",
                &r.name,
                "envFrom".into(),
                Some(c),
            ));
        }
        if let Some(r) = env_from
            .secret_ref
            .as_ref()
            .filter(|r| r.optional != Some(true))
        {
            out.push(Reference::new("Secret", &r.name, "envFrom".into(), Some(c)));
        }
    }
    out
}

/// Bindings point at roles and service accounts that exist.
fn role_bindings(inv: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    for (doc, b) in inv.all::<RoleBinding>() {
        out.extend(role_ref(inv, doc, &b.role_ref, true));
        out.extend(subjects(inv, doc, b.subjects.iter().flatten()));
    }
    for (doc, b) in inv.all::<ClusterRoleBinding>() {
        out.extend(role_ref(inv, doc, &b.role_ref, false));
        out.extend(subjects(inv, doc, b.subjects.iter().flatten()));
    }
    out
}

fn role_ref(inv: &Inventory, doc: &Doc, r: &RoleRef, namespaced_binding: bool) -> Option<Finding> {
    let found = match r.kind.as_str() {
        "Role" if namespaced_binding => inv.has::<Role>(doc.effective_namespace(), &r.name),
        "ClusterRole" => inv.has::<ClusterRole>("", &r.name) || is_builtin_cluster_role(&r.name),
        _ => return Some(doc.finding(format!("roleRef.kind {} cannot be bound here", r.kind))),
    };
    (!found).then(|| {
        doc.finding(format!(
            "roleRef {} {} is not defined in the manifests",
            r.kind, r.name
        ))
    })
}

fn is_builtin_cluster_role(name: &str) -> bool {
    matches!(name, "cluster-admin" | "admin" | "edit" | "view") || name.starts_with("system:")
}

fn subjects<'a>(
    inv: &Inventory,
    doc: &Doc,
    subjects: impl Iterator<Item = &'a Subject>,
) -> Vec<Finding> {
    subjects
        .filter(|s| s.kind == "ServiceAccount")
        .filter_map(|s| {
            let namespace = s.namespace.as_deref().unwrap_or(doc.effective_namespace());
            (!inv.has::<ServiceAccount>(namespace, &s.name)).then(|| {
                doc.finding(format!(
                    "subject ServiceAccount {} is not defined in the manifests",
                    qualified(namespace, &s.name)
                ))
            })
        })
        .collect()
}

/// A workload's selector must match its own pod template.
fn selector(pod: &PodRef) -> Option<Finding> {
    let labels = pod.labels;
    let missing: Vec<String> = pod
        .selector?
        .match_labels
        .iter()
        .flatten()
        .filter(|(k, v)| labels.and_then(|l| l.get(*k)) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    (!missing.is_empty()).then(|| {
        pod.doc.finding(format!(
            "spec.selector wants {} but the pod template does not carry it",
            missing.join(", ")
        ))
    })
}

/// Claims name an existing StorageClass (explicitly: the cluster default is not loopvol), and an
/// existing snapshot or claim when restoring or cloning.
fn claims(inv: &Inventory) -> Vec<Finding> {
    storage::claims(inv)
        .into_iter()
        .flat_map(|(doc, prefix, pvc)| claim(inv, doc, pvc, &prefix))
        .collect()
}

fn claim(inv: &Inventory, doc: &Doc, pvc: &PersistentVolumeClaim, prefix: &str) -> Vec<Finding> {
    let Some(spec) = &pvc.spec else {
        return vec![doc.finding(format!("{prefix}no spec"))];
    };
    let mut problems = Vec::new();
    match spec.storage_class_name.as_deref() {
        None => problems.push(
            "storageClassName is not set, so the cluster's default StorageClass is used \
             instead of loopvol; name it (or \"\" for a pre-bound PersistentVolume)"
                .to_string(),
        ),
        Some("") => {}
        Some(class) if !inv.has::<StorageClass>("", class) => problems.push(format!(
            "storageClassName {class} is not defined in the manifests"
        )),
        Some(_) => {}
    }
    if let Some(source) = &spec.data_source {
        let namespace = doc.effective_namespace();
        let found = match source.kind.as_str() {
            "VolumeSnapshot" => inv.has::<VolumeSnapshot>(namespace, &source.name),
            "PersistentVolumeClaim" => inv.has::<PersistentVolumeClaim>(namespace, &source.name),
            _ => true,
        };
        if !found {
            problems.push(format!(
                "dataSource {} {} is not defined in the manifests",
                source.kind, source.name
            ));
        }
    }
    problems
        .into_iter()
        .map(|p| doc.finding(format!("{prefix}{p}")))
        .collect()
}

/// A group snapshot names an existing class and exactly one source: a selector that matches
/// at least one claim in its namespace, or an existing group snapshot's content.
fn group_snapshots(inv: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    for (doc, group) in inv.all::<VolumeGroupSnapshot>() {
        let spec = &group.spec;
        match spec.volume_group_snapshot_class_name.as_deref() {
            Some(class) if !inv.has::<VolumeGroupSnapshotClass>("", class) => {
                out.push(doc.finding(format!(
                    "volumeGroupSnapshotClassName {class} is not defined in the manifests"
                )))
            }
            Some(_) => {}
            None => out.push(doc.finding(
                "volumeGroupSnapshotClassName is not set; name loopvol's VolumeGroupSnapshotClass",
            )),
        }
        let source = &spec.source;
        match (&source.selector, &source.volume_group_snapshot_content_name) {
            (Some(selector), None) => {
                let want = selector.match_labels.clone().unwrap_or_default();
                if selector.match_expressions.is_some() {
                    continue;
                }
                let matched = inv
                    .all::<PersistentVolumeClaim>()
                    .filter(|(d, _)| d.effective_namespace() == doc.effective_namespace())
                    .filter(|(_, pvc)| {
                        let labels = pvc.metadata.labels.clone().unwrap_or_default();
                        want.iter().all(|(k, v)| labels.get(k) == Some(v))
                    })
                    .count();
                if want.is_empty() || matched == 0 {
                    out.push(doc.finding(
                        "source.selector matches no PersistentVolumeClaim in the manifests",
                    ));
                }
            }
            (None, Some(_)) => {}
            _ => out.push(doc.finding(
                "source needs exactly one of selector and volumeGroupSnapshotContentName",
            )),
        }
    }
    out
}

/// A snapshot names an existing class and exactly one existing source.
fn snapshots(inv: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    for (doc, snapshot) in inv.all::<VolumeSnapshot>() {
        let spec = &snapshot.spec;
        match spec.volume_snapshot_class_name.as_deref() {
            Some(class) if !inv.has::<VolumeSnapshotClass>("", class) => out.push(doc.finding(
                format!("volumeSnapshotClassName {class} is not defined in the manifests"),
            )),
            Some(_) => {}
            None => {
                out.push(doc.finding(
                    "volumeSnapshotClassName is not set; name loopvol's VolumeSnapshotClass",
                ))
            }
        }
        let source = &spec.source;
        match (&source.persistent_volume_claim_name, &source.volume_snapshot_content_name) {
            (Some(claim), None) => {
                if !inv.has::<PersistentVolumeClaim>(doc.effective_namespace(), claim) {
                    out.push(doc.finding(format!(
                        "source PersistentVolumeClaim {claim} is not defined in the manifests"
                    )));
                }
            }
            (None, Some(_)) => {}
            _ => out.push(doc.finding(
                "spec.source needs exactly one of persistentVolumeClaimName and volumeSnapshotContentName",
            )),
        }
    }
    out
}

/// A role's rule on the API group of a CRD defined in the manifests names only resources that
/// CRD serves: its plural, and `<plural>/status` only with the status subresource (a typo
/// there grants nothing, and the node plugin's applies would be forbidden).
fn custom_resource_rules(inv: &Inventory) -> Vec<Finding> {
    let crds: Vec<&CustomResourceDefinition> = inv
        .all::<CustomResourceDefinition>()
        .map(|(_, c)| c)
        .collect();
    let served = |group: &str, resource: &str| -> Option<bool> {
        let in_group: Vec<_> = crds.iter().filter(|c| c.spec.group == group).collect();
        if in_group.is_empty() {
            return None; // not a group the manifests define
        }
        let (plural, sub) = match resource.split_once('/') {
            Some((p, s)) => (p, Some(s)),
            None => (resource, None),
        };
        Some(in_group.iter().any(|c| {
            c.spec.names.plural == plural
                && match sub {
                    None => true,
                    Some("status") => c
                        .spec
                        .versions
                        .iter()
                        .any(|v| v.subresources.as_ref().is_some_and(|s| s.status.is_some())),
                    Some("scale") => c
                        .spec
                        .versions
                        .iter()
                        .any(|v| v.subresources.as_ref().is_some_and(|s| s.scale.is_some())),
                    Some(_) => false,
                }
        }))
    };
    let mut out = Vec::new();
    let mut check = |doc: &Doc, rules: &[PolicyRule]| {
        for rule in rules {
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    if served(group, resource) == Some(false) {
                        out.push(doc.finding(format!(
                            "rule on {resource} in API group {group}: no CustomResourceDefinition \
                             in the manifests serves it"
                        )));
                    }
                }
            }
        }
    };
    for (doc, r) in inv.all::<ClusterRole>() {
        check(doc, r.rules.as_deref().unwrap_or_default());
    }
    for (doc, r) in inv.all::<Role>() {
        check(doc, r.rules.as_deref().unwrap_or_default());
    }
    out
}
