//! The object kinds a manifest may contain, parsed into typed values.
//!
//! Built-in kinds use k8s-openapi. Kinds without k8s-openapi types (the snapshot CRDs and
//! kustomize's Kustomization) get small hand-written structs that refuse unknown fields.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
    ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass, VolumeAttributesClass};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Whether objects of a k8s-openapi scope live in a namespace.
pub trait Scope {
    const NAMESPACED: bool;
}

impl Scope for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}

impl Scope for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// How to recognise and parse one kind.
pub struct KindInfo {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Parse the document; return the typed object and its value serialized back.
    parse: fn(&Value) -> Result<(Object, Value), String>,
}

impl KindInfo {
    fn of<K>() -> Self
    where
        K: Resource + DeserializeOwned + Serialize + Into<Object>,
        K::Scope: Scope,
    {
        KindInfo {
            api_version: K::API_VERSION,
            kind: K::KIND,
            namespaced: K::Scope::NAMESPACED,
            parse: parse_as::<K>,
        }
    }

    pub fn parse(&self, value: &Value) -> Result<(Object, Value), String> {
        (self.parse)(value)
    }
}

fn parse_as<K>(value: &Value) -> Result<(Object, Value), String>
where
    K: DeserializeOwned + Serialize + Into<Object>,
{
    let typed: K = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    Ok((typed.into(), back))
}

/// Pick one kind of object out of an [`Object`].
pub trait Pick: Sized {
    fn pick(object: &Object) -> Option<&Self>;
}

macro_rules! objects {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// A parsed manifest object.
        #[derive(Debug, Clone)]
        pub enum Object {
            $($variant(Box<$ty>),)*
        }

        $(
            impl From<$ty> for Object {
                fn from(value: $ty) -> Self {
                    Object::$variant(Box::new(value))
                }
            }

            impl Pick for $ty {
                fn pick(object: &Object) -> Option<&Self> {
                    match object {
                        Object::$variant(value) => Some(value),
                        _ => None,
                    }
                }
            }
        )*

        /// Every kind the checker understands.
        pub fn known_kinds() -> Vec<KindInfo> {
            vec![$(KindInfo::of::<$ty>()),*]
        }
    };
}

objects! {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    CsiDriver(CSIDriver),
    CustomResourceDefinition(CustomResourceDefinition),
    StorageClass(StorageClass),
    VolumeAttributesClass(VolumeAttributesClass),
    Deployment(Deployment),
    DaemonSet(DaemonSet),
    StatefulSet(StatefulSet),
    Pod(Pod),
    Service(Service),
    ConfigMap(ConfigMap),
    Secret(Secret),
    PersistentVolume(PersistentVolume),
    PersistentVolumeClaim(PersistentVolumeClaim),
    VolumeSnapshotClass(VolumeSnapshotClass),
    VolumeSnapshot(VolumeSnapshot),
    VolumeGroupSnapshotClass(VolumeGroupSnapshotClass),
    VolumeGroupSnapshot(VolumeGroupSnapshot),
    ServiceMonitor(ServiceMonitor),
    Kustomization(Kustomization),
}

/// Look up a kind by the document's `apiVersion` and `kind`.
pub fn find_kind<'a>(
    kinds: &'a [KindInfo],
    api_version: &str,
    kind: &str,
) -> Result<&'a KindInfo, String> {
    if let Some(info) = kinds
        .iter()
        .find(|k| k.api_version == api_version && k.kind == kind)
    {
        return Ok(info);
    }
    match kinds.iter().find(|k| k.kind == kind) {
        Some(info) => Err(format!(
            "apiVersion {api_version} is not served for {kind}; use {}",
            info.api_version
        )),
        None => Err(format!(
            "kind {kind} ({api_version}) is not known to manifest-check; \
             add it to tests/manifest-check/src/kinds.rs"
        )),
    }
}

/// Implement [`Resource`] for a hand-written kind, the way kube's CustomResource derive does.
macro_rules! custom_resource {
    ($ty:ty, group: $group:literal, version: $version:literal, kind: $kind:literal,
     plural: $plural:literal, scope: $scope:ty) => {
        impl Resource for $ty {
            const API_VERSION: &'static str = concat!($group, "/", $version);
            const GROUP: &'static str = $group;
            const KIND: &'static str = $kind;
            const VERSION: &'static str = $version;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = $scope;
        }
    };
}

/// snapshot.storage.k8s.io/v1 VolumeSnapshotClass.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeSnapshotClass {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub driver: String,
    pub deletion_policy: DeletionPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<BTreeMap<String, String>>,
}

custom_resource!(VolumeSnapshotClass, group: "snapshot.storage.k8s.io", version: "v1",
    kind: "VolumeSnapshotClass", plural: "volumesnapshotclasses", scope: ClusterResourceScope);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeletionPolicy {
    Delete,
    Retain,
}

/// snapshot.storage.k8s.io/v1 VolumeSnapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeSnapshot {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: VolumeSnapshotSpec,
}

custom_resource!(VolumeSnapshot, group: "snapshot.storage.k8s.io", version: "v1",
    kind: "VolumeSnapshot", plural: "volumesnapshots", scope: NamespaceResourceScope);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    pub source: VolumeSnapshotSource,
}

/// Exactly one of the two must be set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

/// groupsnapshot.storage.k8s.io/v1 VolumeGroupSnapshotClass (external-snapshotter v8.6).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeGroupSnapshotClass {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub driver: String,
    pub deletion_policy: DeletionPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<BTreeMap<String, String>>,
}

custom_resource!(VolumeGroupSnapshotClass, group: "groupsnapshot.storage.k8s.io", version: "v1",
    kind: "VolumeGroupSnapshotClass", plural: "volumegroupsnapshotclasses",
    scope: ClusterResourceScope);

/// groupsnapshot.storage.k8s.io/v1 VolumeGroupSnapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeGroupSnapshot {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: VolumeGroupSnapshotSpec,
}

custom_resource!(VolumeGroupSnapshot, group: "groupsnapshot.storage.k8s.io", version: "v1",
    kind: "VolumeGroupSnapshot", plural: "volumegroupsnapshots", scope: NamespaceResourceScope);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeGroupSnapshotSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class_name: Option<String>,
    pub source: VolumeGroupSnapshotSource,
}

/// Exactly one of the two must be set: a label selector for a new group, or the content of a
/// group snapshot taken before.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeGroupSnapshotSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_content_name: Option<String>,
}

/// monitoring.coreos.com/v1 ServiceMonitor (Prometheus Operator), limited to the fields the
/// monitoring component uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceMonitor {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceMonitorSpec,
}

custom_resource!(ServiceMonitor, group: "monitoring.coreos.com", version: "v1",
    kind: "ServiceMonitor", plural: "servicemonitors", scope: NamespaceResourceScope);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    pub selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    pub endpoints: Vec<MonitorEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MonitorEndpoint {
    pub port: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relabelings: Vec<Relabeling>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Relabeling {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_label: Option<String>,
}

/// kustomize.config.k8s.io/v1beta1 Kustomization, limited to what loopvol uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Kustomization {
    pub api_version: String,
    pub kind: String,
    pub resources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<KustomizeImage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_generator: Vec<SecretGenerator>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator_options: Option<GeneratorOptions>,
}

/// A Secret that kustomize builds from files at apply time (the mTLS certificates, which are
/// generated per cluster and never committed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretGenerator {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GeneratorOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_name_suffix_hash: Option<bool>,
}

// Not an API object at all; modelled as cluster-scoped so it never carries a namespace.
custom_resource!(Kustomization, group: "kustomize.config.k8s.io", version: "v1beta1",
    kind: "Kustomization", plural: "kustomizations", scope: ClusterResourceScope);

/// An `images:` override: containers whose image is `name` get `newName:newTag`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KustomizeImage {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kinds() -> Vec<KindInfo> {
        known_kinds()
    }

    #[test]
    fn scope_comes_from_k8s_openapi() {
        let kinds = kinds();
        assert!(
            find_kind(&kinds, "apps/v1", "DaemonSet")
                .unwrap()
                .namespaced
        );
        assert!(
            !find_kind(&kinds, "storage.k8s.io/v1", "CSIDriver")
                .unwrap()
                .namespaced
        );
        assert!(
            !find_kind(&kinds, "snapshot.storage.k8s.io/v1", "VolumeSnapshotClass")
                .unwrap()
                .namespaced
        );
    }

    #[test]
    fn wrong_api_version_names_the_right_one() {
        let err = find_kind(&kinds(), "extensions/v1beta1", "Deployment")
            .err()
            .unwrap();
        assert_eq!(
            err,
            "apiVersion extensions/v1beta1 is not served for Deployment; use apps/v1"
        );
    }

    #[test]
    fn custom_kinds_refuse_unknown_fields() {
        let kinds = kinds();
        let info = find_kind(&kinds, "snapshot.storage.k8s.io/v1", "VolumeSnapshotClass").unwrap();
        let doc = json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
            "metadata": {"name": "x"}, "drvier": "loopvol.csi.dev", "deletionPolicy": "Delete"});
        let err = info.parse(&doc).err().unwrap();
        assert!(err.contains("unknown field `drvier`"), "{err}");
    }
}
