//! StorageClasses, PersistentVolumes and claims make sense for node-local loopvol volumes:
//! parameters the driver accepts, its topology key, its volume ID format, sizes each
//! filesystem can be made in, and pre-bound claims that can actually bind.

use super::workload::{pods, CommandLine};
use super::{quantity, TOPOLOGY_KEY};
use crate::finding::Finding;
use crate::inventory::{Doc, Inventory};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    NodeSelectorRequirement, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec,
};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttributesClass};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use provisioner::io_limits::{self, IoLimitsChange};

use provisioner::encryption::{Method, PARAM_ENCRYPTION};
use provisioner::params::{Allocation, FsType, PARAM_ALLOCATION, PARAM_FS_TYPE, PARAM_POOL};

const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";
const SIDECAR_FS_TYPE: &str = "csi.storage.k8s.io/fstype";
/// Used when neither the StorageClass nor the PV names one (csi-provisioner --default-fstype).
const DEFAULT_FS: FsType = FsType::Ext4;

pub fn check(inv: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    for (doc, sc) in inv.all::<StorageClass>() {
        out.extend(storage_class(sc).into_iter().map(|m| doc.finding(m)));
    }
    out.extend(unserved_pools(inv));
    for (doc, vac) in inv.all::<VolumeAttributesClass>() {
        // What ControllerModifyVolume would refuse (INVALID_ARGUMENT) for every PVC using it.
        let params = vac.parameters.iter().flatten();
        if let Err(e) = IoLimitsChange::parse_mutable(params.map(|(k, v)| (k.as_str(), v.as_str())))
        {
            out.push(doc.finding(e.to_string()));
        }
    }
    for (doc, pv) in inv.all::<PersistentVolume>() {
        let problems = pv.spec.as_ref().map(persistent_volume).unwrap_or_default();
        out.extend(problems.into_iter().map(|m| doc.finding(m)));
    }
    for (doc, prefix, pvc) in claims(inv) {
        let problems = claim_size(inv, pvc).into_iter().chain(pre_bound(inv, pvc));
        out.extend(problems.map(|m| doc.finding(format!("{prefix}{m}"))));
    }
    out
}

/// A StorageClass whose `pool` no node plugin serves gets RESOURCE_EXHAUSTED on every node.
/// Checked on rendered sets only: in the source files a component's StorageClass comes without
/// the patch that adds its `--pool`.
fn unserved_pools(inv: &Inventory) -> Vec<Finding> {
    let node_plugins: Vec<CommandLine> = pods(inv)
        .iter()
        .filter(|p| p.per_node)
        .filter_map(|p| p.driver())
        .map(CommandLine::of)
        .collect();
    if !inv.rendered || node_plugins.is_empty() {
        return Vec::new();
    }
    let mut served = vec![provisioner::ids::DEFAULT_POOL];
    for cmd in &node_plugins {
        served.extend(
            cmd.values("pool")
                .iter()
                .filter_map(|v| v.split_once('='))
                .map(|(n, _)| n),
        );
    }
    inv.all::<StorageClass>()
        .filter_map(|(doc, sc)| {
            let pool = sc.parameters.as_ref()?.get(PARAM_POOL)?;
            if served.contains(&pool.as_str())
                || provisioner::ids::validate_pool_name(pool).is_err()
            {
                return None;
            }
            Some(doc.finding(format!(
                "parameter {PARAM_POOL}: no node plugin serves a pool {pool:?} (it serves {}): \
                 add --pool={pool}=DIR to the node DaemonSet's args, or use components/second-pool",
                served.join(", ")
            )))
        })
        .collect()
}

/// The smallest volume loopvol's mkfs of `fs` accepts, if loopvol formats `fs` at all.
fn fs_minimum(fs: &str) -> Option<f64> {
    FsType::ALL
        .iter()
        .find(|t| t.as_str() == fs)
        .map(|t| t.min_size() as f64)
}

fn storage_class(sc: &StorageClass) -> Vec<String> {
    let mut out = Vec::new();
    for (key, value) in sc.parameters.iter().flatten() {
        match key.as_str() {
            PARAM_FS_TYPE | SIDECAR_FS_TYPE if fs_minimum(value).is_none() => out.push(format!(
                "parameter {key}: {value} is not one of ext4, xfs, btrfs"
            )),
            PARAM_ALLOCATION if value.parse::<Allocation>().is_err() => out.push(format!(
                "parameter {PARAM_ALLOCATION}: {value} is not thin or thick"
            )),
            PARAM_POOL => {
                if let Err(e) = provisioner::ids::validate_pool_name(value) {
                    out.push(format!("parameter {PARAM_POOL}: {e}"));
                }
            }
            PARAM_ENCRYPTION => {
                if let Err(e) = value.parse::<Method>() {
                    out.push(e.to_string());
                }
            }
            PARAM_FS_TYPE | SIDECAR_FS_TYPE | PARAM_ALLOCATION => {}
            k if k.starts_with(SIDECAR_PREFIX) => {}
            k if io_limits::KEYS.contains(&k) => {
                if let Err(e) = IoLimitsChange::default().parse_key(k, value) {
                    out.push(e.to_string());
                }
            }
            k => out.push(format!(
                "unknown parameter {k}: loopvol refuses it at CreateVolume; it accepts {PARAM_FS_TYPE}, \
                 {PARAM_ALLOCATION}, {PARAM_POOL}, {PARAM_ENCRYPTION} and the IO limits {} (keys under \
                 {SIDECAR_PREFIX} are for the sidecars)",
                io_limits::KEYS.join(", ")
            )),
        }
    }
    let params = sc.parameters.as_ref();
    if params.is_some_and(|p| p.contains_key(PARAM_ENCRYPTION)) {
        out.extend(encryption_needs(sc));
    }
    let ours = params.and_then(|p| p.get(PARAM_FS_TYPE));
    let sidecars = params.and_then(|p| p.get(SIDECAR_FS_TYPE));
    if let (Some(a), Some(b)) = (ours, sidecars) {
        if a != b {
            out.push(format!(
                "parameters {PARAM_FS_TYPE}={a} and {SIDECAR_FS_TYPE}={b} contradict each other"
            ));
        }
    }
    if sc.volume_binding_mode.as_deref() != Some("WaitForFirstConsumer") {
        out.push(
            "volumeBindingMode must be WaitForFirstConsumer: a loopvol volume lives on one node, \
             so it has to be created where its pod is scheduled"
                .to_string(),
        );
    }
    let keys = sc
        .allowed_topologies
        .iter()
        .flatten()
        .flat_map(|t| t.match_label_expressions.iter().flatten())
        .map(|e| e.key.as_str());
    out.extend(keys.filter(|k| *k != TOPOLOGY_KEY).map(wrong_topology_key));
    out
}

/// An encrypted class: ext4 (fscrypt is ext4's), and a node-stage Secret named, without which
/// every stage is refused (the key reaches NodeStageVolume only that way).
fn encryption_needs(sc: &StorageClass) -> Vec<String> {
    let mut out = Vec::new();
    let fs = class_fs_type(sc);
    if fs != "ext4" {
        out.push(format!(
            "parameter {PARAM_ENCRYPTION} needs ext4, and this class makes {fs}"
        ));
    }
    let params = sc.parameters.as_ref();
    for key in [
        "csi.storage.k8s.io/node-stage-secret-name",
        "csi.storage.k8s.io/node-stage-secret-namespace",
    ] {
        if !params.is_some_and(|p| p.contains_key(key)) {
            out.push(format!(
                "parameter {PARAM_ENCRYPTION} needs {key}: the key comes from the node-stage \
                 Secret, and every NodeStageVolume without one is refused"
            ));
        }
    }
    out
}

fn wrong_topology_key(key: &str) -> String {
    format!("topology key {key}: loopvol labels its nodes with {TOPOLOGY_KEY} (the node name)")
}

fn class_fs_type(sc: &StorageClass) -> &str {
    let params = sc.parameters.as_ref();
    params
        .and_then(|p| p.get(PARAM_FS_TYPE).or_else(|| p.get(SIDECAR_FS_TYPE)))
        .map_or(DEFAULT_FS.as_str(), String::as_str)
}

/// A loopvol PV: a volume ID of ours, pinned to the node named in it, kept on release.
fn persistent_volume(spec: &PersistentVolumeSpec) -> Vec<String> {
    let Some(csi) = &spec.csi else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let node = volume_node(&csi.volume_handle);
    if node.is_none() {
        out.push(format!(
            "spec.csi.volumeHandle {} is not a loopvol volume ID (vol-<20 hex digits>@<node name>)",
            csi.volume_handle
        ));
    }
    if let Some(fs) = csi.fs_type.as_deref().filter(|fs| fs_minimum(fs).is_none()) {
        out.push(format!(
            "spec.csi.fsType {fs} is not one of ext4, xfs, btrfs"
        ));
    }
    if spec.persistent_volume_reclaim_policy.as_deref() != Some("Retain") {
        out.push(
            "persistentVolumeReclaimPolicy should be Retain for a hand-made PersistentVolume: \
             Delete removes the volume's data when its claim goes away"
                .to_string(),
        );
    }
    let requirements: Vec<&NodeSelectorRequirement> = spec
        .node_affinity
        .iter()
        .filter_map(|a| a.required.as_ref())
        .flat_map(|r| r.node_selector_terms.iter())
        .flat_map(|t| t.match_expressions.iter().flatten())
        .collect();
    if requirements.is_empty() {
        out.push(format!(
            "no spec.nodeAffinity: a loopvol volume exists on one node; require {TOPOLOGY_KEY} In [<node>]"
        ));
    }
    out.extend(
        requirements
            .iter()
            .filter(|r| r.key != TOPOLOGY_KEY)
            .map(|r| wrong_topology_key(&r.key)),
    );
    let allowed: Vec<&str> = requirements
        .iter()
        .filter(|r| r.key == TOPOLOGY_KEY && r.operator == "In")
        .flat_map(|r| r.values.iter().flatten().map(String::as_str))
        .collect();
    if let Some(node) = node.filter(|n| !requirements.is_empty() && !allowed.contains(n)) {
        out.push(format!(
            "volumeHandle is on node {node} but nodeAffinity allows [{}]",
            allowed.join(", ")
        ));
    }
    out
}

/// The node of a volume ID `vol-<20 lowercase hex>@<node>`.
fn volume_node(handle: &str) -> Option<&str> {
    let (hex, node) = handle.strip_prefix("vol-")?.split_once('@')?;
    let hex_ok = provisioner::ids::is_hex_id(hex);
    (hex_ok && !node.is_empty()).then_some(node)
}

/// Every claim: standalone PVCs and StatefulSet claim templates, with a message prefix.
pub(super) fn claims(inv: &Inventory) -> Vec<(&Doc, String, &PersistentVolumeClaim)> {
    let mut out: Vec<_> = inv
        .all::<PersistentVolumeClaim>()
        .map(|(doc, pvc)| (doc, String::new(), pvc))
        .collect();
    for (doc, set) in inv.all::<StatefulSet>() {
        for t in set.spec.volume_claim_templates.iter().flatten() {
            let name = t.metadata.name.as_deref().unwrap_or("<unnamed>");
            out.push((doc, format!("volumeClaimTemplate {name}: "), t));
        }
    }
    out
}

fn requested(pvc: &PersistentVolumeClaim) -> Option<&Quantity> {
    pvc.spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
}

/// Filesystem volumes must be at least as big as mkfs allows.
fn claim_size(inv: &Inventory, pvc: &PersistentVolumeClaim) -> Option<String> {
    let spec = pvc.spec.as_ref()?;
    if spec.volume_mode.as_deref() == Some("Block") {
        return None;
    }
    let class = spec.storage_class_name.as_deref()?;
    let (_, sc) = inv.find::<StorageClass>("", class)?;
    let fs = class_fs_type(sc);
    let min = fs_minimum(fs)?;
    let size = requested(pvc)?;
    match quantity::parse(size) {
        Some(bytes) if bytes >= min => None,
        Some(_) => Some(format!(
            "requests {} but {fs} volumes (StorageClass {class}) must be at least {}Mi",
            size.0,
            min / provisioner::size::MIB as f64
        )),
        None => Some(format!("requests {}, which is not a quantity", size.0)),
    }
}

/// A claim with volumeName binds only to a PV with the same class and enough capacity.
fn pre_bound(inv: &Inventory, pvc: &PersistentVolumeClaim) -> Option<String> {
    let spec = pvc.spec.as_ref()?;
    let name = spec.volume_name.as_deref()?;
    let Some((_, pv)) = inv.find::<PersistentVolume>("", name) else {
        return Some(format!(
            "volumeName {name}: no such PersistentVolume in the manifests"
        ));
    };
    let pv_spec = pv.spec.as_ref()?;
    let class = spec.storage_class_name.as_deref().unwrap_or("<unset>");
    let pv_class = pv_spec.storage_class_name.as_deref().unwrap_or("");
    if class != pv_class {
        return Some(format!(
            "storageClassName {class:?} but PersistentVolume {name} has {pv_class:?}; they must match to bind"
        ));
    }
    let capacity = pv_spec.capacity.as_ref().and_then(|c| c.get("storage"));
    match (
        requested(pvc).and_then(quantity::parse),
        capacity.and_then(quantity::parse),
    ) {
        (Some(want), Some(have)) if want > have => Some(format!(
            "requests more storage than PersistentVolume {name} has ({})",
            capacity.map(|q| q.0.as_str()).unwrap_or_default()
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::volume_node;

    #[test]
    fn volume_ids() {
        assert_eq!(
            volume_node("vol-5d41402abc4b2a76b971@node-1"),
            Some("node-1")
        );
        assert_eq!(volume_node("vol-5d41402abc4b2a76b97@node-1"), None);
        assert_eq!(volume_node("vol-5D41402ABC4B2A76B971@node-1"), None);
        assert_eq!(volume_node("snap-5d41402abc4b2a76b971@node-1"), None);
        assert_eq!(volume_node("vol-5d41402abc4b2a76b971@"), None);
    }
}
