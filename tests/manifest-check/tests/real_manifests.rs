//! The manifests in the repository pass every check.

mod common;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass, VolumeAttributesClass};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use manifest_check::kinds::{
    Kustomization, Pick, ServiceMonitor, VolumeGroupSnapshot, VolumeGroupSnapshotClass,
    VolumeSnapshot, VolumeSnapshotClass,
};
use manifest_check::{check_files, Inventory, Origin};

#[test]
fn real_manifests_have_no_problems() {
    let findings = check_files(common::real_files());
    let report: Vec<String> = findings.iter().map(ToString::to_string).collect();
    assert!(
        findings.is_empty(),
        "{} problem(s) in the manifests:\n  {}",
        findings.len(),
        report.join("\n  ")
    );
}

fn count<T: Pick>(inv: &Inventory, origin: Origin) -> usize {
    inv.in_origin::<T>(origin).count()
}

/// Guards against a vacuous pass: the install and the examples really contain what the
/// checks are about.
#[test]
fn real_manifests_contain_the_whole_install() {
    let (inv, _) = Inventory::load(common::real_files());
    let install = [
        ("Namespace", count::<Namespace>(&inv, Origin::Install), 1),
        ("CSIDriver", count::<CSIDriver>(&inv, Origin::Install), 1),
        ("Deployment", count::<Deployment>(&inv, Origin::Install), 1),
        ("DaemonSet", count::<DaemonSet>(&inv, Origin::Install), 1),
        (
            "ServiceAccount",
            count::<ServiceAccount>(&inv, Origin::Install),
            2,
        ),
        // The three sidecars', and the node plugin's LoopPool objects.
        (
            "ClusterRole",
            count::<ClusterRole>(&inv, Origin::Install),
            4,
        ),
        (
            "ClusterRoleBinding",
            count::<ClusterRoleBinding>(&inv, Origin::Install),
            4,
        ),
        (
            "CustomResourceDefinition",
            count::<CustomResourceDefinition>(&inv, Origin::Install),
            1,
        ),
        // Leader election, CSIStorageCapacity, the router's pod watch, the CA Secret.
        ("Role", count::<Role>(&inv, Origin::Install), 4),
        (
            "RoleBinding",
            count::<RoleBinding>(&inv, Origin::Install),
            4,
        ),
        // Two, and loopvol-fast from components/second-pool.
        (
            "StorageClass",
            count::<StorageClass>(&inv, Origin::Install),
            3,
        ),
        // From components/snapshots.
        (
            "VolumeSnapshotClass",
            count::<VolumeSnapshotClass>(&inv, Origin::Install),
            1,
        ),
        // From components/group-snapshots.
        (
            "VolumeGroupSnapshotClass",
            count::<VolumeGroupSnapshotClass>(&inv, Origin::Install),
            1,
        ),
        // From components/monitoring.
        (
            "ServiceMonitor",
            count::<ServiceMonitor>(&inv, Origin::Install),
            1,
        ),
        (
            "Kustomization",
            count::<Kustomization>(&inv, Origin::Install),
            1,
        ),
    ];
    let examples = [
        (
            "PersistentVolumeClaim",
            count::<PersistentVolumeClaim>(&inv, Origin::Example),
            7,
        ),
        ("Pod", count::<Pod>(&inv, Origin::Example), 5),
        (
            "VolumeGroupSnapshot",
            count::<VolumeGroupSnapshot>(&inv, Origin::Example),
            1,
        ),
        (
            "StatefulSet",
            count::<StatefulSet>(&inv, Origin::Example),
            1,
        ),
        (
            "PersistentVolume",
            count::<PersistentVolume>(&inv, Origin::Example),
            1,
        ),
        (
            "VolumeSnapshot",
            count::<VolumeSnapshot>(&inv, Origin::Example),
            1,
        ),
        (
            "VolumeAttributesClass",
            count::<VolumeAttributesClass>(&inv, Origin::Example),
            2,
        ),
    ];
    for (kind, found, expected) in install.iter().chain(examples.iter()) {
        assert_eq!(found, expected, "number of {kind} objects");
    }
    println!(
        "checked {} objects in {} files",
        inv.docs.len(),
        inv.files.len()
    );
}
