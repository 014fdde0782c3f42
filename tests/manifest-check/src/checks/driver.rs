//! One CSIDriver, and everything that names the driver agrees with it; the CSIDriver's
//! features match the sidecars that are deployed.

use super::workload::{env_from_field, pods, CommandLine, PodRef, Sidecar};
use crate::finding::Finding;
use crate::inventory::{Doc, Inventory, Origin};
use crate::kinds::{VolumeGroupSnapshotClass, VolumeSnapshotClass};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass, VolumeAttributesClass};
use k8s_openapi::Resource as _;

pub fn check(inv: &Inventory) -> Vec<Finding> {
    let drivers: Vec<(&Doc, &CSIDriver)> = inv.in_origin::<CSIDriver>(Origin::Install).collect();
    let Some(&(doc, driver)) = drivers.first() else {
        return vec![Finding::file(
            "manifests/",
            "no CSIDriver object: the kubelet would not know the driver",
        )];
    };
    let name = doc.name.as_str();
    let mut out: Vec<Finding> = drivers[1..]
        .iter()
        .map(|(d, _)| {
            d.finding(format!(
                "a second CSIDriver; {} is already defined",
                doc.label()
            ))
        })
        .collect();
    out.extend(driver_name_flags(inv, name));
    out.extend(storage_class_provisioners(inv, name));
    out.extend(attribute_class_drivers(inv, name));
    out.extend(snapshot_class_drivers(inv, name));
    out.extend(group_snapshot_class_drivers(inv, name));
    out.extend(persistent_volume_drivers(inv, name));
    out.extend(features(inv, doc, driver));
    out.extend(pods(inv).iter().flat_map(capacity_publishing));
    out
}

fn driver_name_flags(inv: &Inventory, name: &str) -> Vec<Finding> {
    pods(inv)
        .iter()
        .filter_map(|pod| {
            let driver = pod.driver()?;
            let message = match CommandLine::of(driver).value("driver-name") {
                Some(flag) if flag == name => return None,
                Some(flag) => format!("--driver-name {flag} but the CSIDriver is named {name}"),
                None => format!("no --driver-name; it must be {name}, the CSIDriver's name"),
            };
            Some(pod.finding(driver, message))
        })
        .collect()
}

fn attribute_class_drivers(inv: &Inventory, name: &str) -> Vec<Finding> {
    inv.all::<VolumeAttributesClass>()
        .filter(|(_, vac)| vac.driver_name != name)
        .map(|(doc, vac)| {
            doc.finding(format!(
                "driverName {} but the CSIDriver is named {name}",
                vac.driver_name
            ))
        })
        .collect()
}

fn storage_class_provisioners(inv: &Inventory, name: &str) -> Vec<Finding> {
    inv.all::<StorageClass>()
        .filter(|(_, sc)| sc.provisioner != name)
        .map(|(doc, sc)| {
            doc.finding(format!(
                "provisioner {} but the CSIDriver is named {name}",
                sc.provisioner
            ))
        })
        .collect()
}

fn snapshot_class_drivers(inv: &Inventory, name: &str) -> Vec<Finding> {
    inv.all::<VolumeSnapshotClass>()
        .filter(|(_, vsc)| vsc.driver != name)
        .map(|(doc, vsc)| {
            doc.finding(format!(
                "driver {} but the CSIDriver is named {name}",
                vsc.driver
            ))
        })
        .collect()
}

fn group_snapshot_class_drivers(inv: &Inventory, name: &str) -> Vec<Finding> {
    inv.all::<VolumeGroupSnapshotClass>()
        .filter(|(_, c)| c.driver != name)
        .map(|(doc, c)| {
            doc.finding(format!(
                "driver {} but the CSIDriver is named {name}",
                c.driver
            ))
        })
        .collect()
}

fn persistent_volume_drivers(inv: &Inventory, name: &str) -> Vec<Finding> {
    inv.all::<PersistentVolume>()
        .filter_map(|(doc, pv)| {
            let csi = pv.spec.as_ref().and_then(|s| s.csi.as_ref());
            let message = match csi {
                Some(csi) if csi.driver == name => return None,
                Some(csi) => format!(
                    "spec.csi.driver {} but the CSIDriver is named {name}",
                    csi.driver
                ),
                None => {
                    format!("has no spec.csi; a loopvol PersistentVolume is a CSI volume of {name}")
                }
            };
            Some(doc.finding(message))
        })
        .collect()
}

/// attachRequired and storageCapacity only work with the matching sidecar behaviour.
fn features(inv: &Inventory, doc: &Doc, driver: &CSIDriver) -> Vec<Finding> {
    let all_pods = pods(inv);
    let has_attacher = all_pods
        .iter()
        .any(|p| p.sidecars(Sidecar::Attacher).next().is_some());
    let publishes_capacity = all_pods
        .iter()
        .flat_map(|p| p.sidecars(Sidecar::Provisioner))
        .any(|c| CommandLine::of(c).is_on("enable-capacity"));
    let spec = &driver.spec;
    let mut out = Vec::new();
    if spec.attach_required != Some(false) && !has_attacher {
        out.push(doc.finding(
            "spec.attachRequired must be false: no csi-attacher is deployed, so volumes would \
             wait forever for a VolumeAttachment",
        ));
    }
    match (spec.storage_capacity == Some(true), publishes_capacity) {
        (true, false) => out.push(doc.finding(
            "spec.storageCapacity is true but csi-provisioner does not run with --enable-capacity: \
             the scheduler would wait for capacity objects that never come",
        )),
        (false, true) => out.push(doc.finding(
            "csi-provisioner publishes capacity (--enable-capacity) but spec.storageCapacity is not \
             true, so the scheduler ignores it",
        )),
        _ => {}
    }
    out
}

/// --enable-capacity needs POD_NAME and NAMESPACE from the downward API, and an owner-reference
/// level that reaches the object that owns the pod.
fn capacity_publishing(pod: &PodRef) -> Vec<Finding> {
    let Some(provisioner) = pod.sidecars(Sidecar::Provisioner).next() else {
        return Vec::new();
    };
    let cl = CommandLine::of(provisioner);
    if !cl.is_on("enable-capacity") {
        return Vec::new();
    }
    let mut out: Vec<Finding> = [
        ("POD_NAME", "metadata.name"),
        ("NAMESPACE", "metadata.namespace"),
    ]
    .iter()
    .filter(|(var, field)| !env_from_field(provisioner, var, field))
    .map(|(var, field)| {
        pod.finding(
            provisioner,
            format!("--enable-capacity needs env {var} from fieldRef {field}"),
        )
    })
    .collect();
    // Pod -> ReplicaSet -> Deployment; Pod -> StatefulSet or DaemonSet.
    let expected = match pod.doc.kind.as_str() {
        kind if kind == Deployment::KIND => "2",
        kind if kind == Pod::KIND => "0",
        _ => "1",
    };
    match cl.value("capacity-ownerref-level") {
        Some(level) if level == expected => {}
        level => out.push(pod.finding(
            provisioner,
            format!(
                "--capacity-ownerref-level is {}; for a {} it must be {expected} so the capacity \
                 objects are owned by it and deleted on uninstall",
                level.unwrap_or("unset"),
                pod.doc.kind
            ),
        )),
    }
    out
}
