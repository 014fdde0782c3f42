//! The LoopPool object: one per node and pool, cluster-scoped, named `<node>.<pool>`, whose
//! status the node plugin keeps current (`kubectl get looppools`).
//!
//! Plain serde types with `k8s_openapi::Resource` implemented by hand, not kube's
//! `CustomResource` derive: the derive needs kube's `derive` feature, which brings
//! `kube-derive` (a proc macro) and `schemars` (neither is in Cargo.lock) only to generate a
//! schema we write by hand anyway, for its printer columns and descriptions. The CRD is
//! `manifests/looppool-crd.yaml`; the tests below keep it and these types in step (names,
//! scope, every status field and printer column).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "loopvol.csi.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "loopvol.csi.dev/v1alpha1";
pub const KIND: &str = "LoopPool";
pub const PLURAL: &str = "looppools";
/// Label: the node the pool is on (selects a node's own objects at start).
pub const NODE_LABEL: &str = "loopvol.csi.dev/node";
/// Label: the pool's name.
pub const POOL_LABEL: &str = "loopvol.csi.dev/pool";
/// The field manager of every apply the node plugin makes.
pub const FIELD_MANAGER: &str = "loopvol-node";

/// `status.health` and condition types.
pub const HEALTHY: &str = "Healthy";
pub const FULL: &str = "Full";
pub const READ_ONLY: &str = "ReadOnly";
pub const MISSING: &str = "Missing";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoopPool {
    #[serde(rename = "apiVersion", default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<LoopPoolStatus>,
}

impl k8s_openapi::Resource for LoopPool {
    const API_VERSION: &'static str = API_VERSION;
    const GROUP: &'static str = GROUP;
    const KIND: &'static str = KIND;
    const VERSION: &'static str = VERSION;
    const URL_PATH_SEGMENT: &'static str = PLURAL;
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::Metadata for LoopPool {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What `loopvol status` and the per-pool gauges say about one pool, as of `last_update`.
/// Byte figures are integers for machines; `capacity` and `free` repeat two of them for the
/// printer columns. Every field has a default when read back, so an object written by an
/// older loopvol (or by hand) still lists.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoopPoolStatus {
    pub node: String,
    pub pool: String,
    /// The pool directory as the node plugin sees it.
    pub path: String,
    /// `ext4`, `xfs`, `btrfs`, ... (statfs).
    pub filesystem: String,
    /// Whether snapshots and clones share extents (else they copy, freezing the source).
    pub reflink: bool,
    pub capacity_bytes: u64,
    /// Physical: blocks the images of volumes and snapshots take.
    pub allocated_bytes: u64,
    /// Logical: the volumes' sizes, summed.
    pub provisioned_bytes: u64,
    /// Promised to thin volumes, not yet written.
    pub promised_bytes: u64,
    /// Free on the pool's filesystem.
    pub free_bytes: u64,
    /// What a new thin volume may still be promised (GetCapacity's answer).
    pub headroom_bytes: u64,
    pub capacity: String,
    pub free: String,
    pub volumes: u64,
    /// Of `volumes`, those encrypted at rest (`encryption: fscrypt`).
    pub encrypted_volumes: u64,
    pub snapshots: u64,
    /// `Healthy`, `Full`, `ReadOnly` or `Missing`: the worst true condition.
    pub health: String,
    pub conditions: Vec<Condition>,
    /// RFC 3339.
    pub last_update: String,
}

/// A condition in the shape of `metav1.Condition`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

/// The object name of `pool` on `node`. Both are DNS labels or subdomains, so the name is a
/// valid object name when it fits; [`check_name`] says when it does not.
pub fn name(node: &str, pool: &str) -> String {
    format!("{node}.{pool}")
}

/// Refuse (at start) a node whose objects the API server would refuse on every publish: the
/// name must be a DNS subdomain of at most 253 characters, the node label value at most 63.
pub fn check_name(node: &str, pool: &str) -> Result<(), String> {
    let n = name(node, pool);
    let subdomain = n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !subdomain {
        return Err(format!(
            "LoopPool name {n:?} is not a Kubernetes object name (lowercase DNS subdomain)"
        ));
    }
    if node.len() > 63 {
        return Err(format!(
            "node name {node:?} is longer than 63 characters, too long for the {NODE_LABEL} label"
        ));
    }
    Ok(())
}

/// The measured figures of one pool, before they become a status.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub path: String,
    pub filesystem: String,
    pub reflink: bool,
    pub read_only: bool,
    pub sample: crate::metrics::PoolSample,
    pub headroom_bytes: u64,
}

impl Figures {
    /// Full: nothing more can be promised, or the filesystem is down to the last MiB the pool
    /// keeps free everywhere.
    pub fn full(&self) -> bool {
        self.headroom_bytes == 0 || self.sample.available_bytes < provisioner::pool::FULL_BYTES
    }
}

/// A status for `figures`; a condition keeps its `lastTransitionTime` from `previous` while
/// its status stays the same.
pub fn status(
    node: &str,
    figures: &Figures,
    previous: Option<&LoopPoolStatus>,
    now: &str,
) -> LoopPoolStatus {
    let s = &figures.sample;
    let full = figures.full();
    let conditions = vec![
        condition(
            previous,
            FULL,
            full,
            if full { "NoRoom" } else { "HasRoom" },
            &format!(
                "{} free, {} can still be promised",
                crate::shared::units::bytes(s.available_bytes),
                crate::shared::units::bytes(figures.headroom_bytes)
            ),
            now,
        ),
        condition(
            previous,
            READ_ONLY,
            figures.read_only,
            if figures.read_only {
                "MountedReadOnly"
            } else {
                "Writable"
            },
            "the pool's filesystem as statvfs reports it",
            now,
        ),
        condition(
            previous,
            MISSING,
            false,
            "Served",
            "the node plugin serves this pool",
            now,
        ),
    ];
    LoopPoolStatus {
        node: node.to_string(),
        pool: s.pool.clone(),
        path: figures.path.clone(),
        filesystem: figures.filesystem.clone(),
        reflink: figures.reflink,
        capacity_bytes: s.capacity_bytes,
        allocated_bytes: s.allocated_bytes,
        provisioned_bytes: s.provisioned_bytes,
        promised_bytes: s.reserved_bytes,
        free_bytes: s.available_bytes,
        headroom_bytes: figures.headroom_bytes,
        capacity: crate::shared::units::bytes(s.capacity_bytes),
        free: crate::shared::units::bytes(s.available_bytes),
        volumes: s.volumes,
        encrypted_volumes: s.encrypted_volumes,
        snapshots: s.snapshots,
        health: if figures.read_only {
            READ_ONLY
        } else if full {
            FULL
        } else {
            HEALTHY
        }
        .to_string(),
        conditions,
        last_update: now.to_string(),
    }
}

/// The status of a pool this node no longer serves: its last figures, marked `Missing`.
pub fn missing(mut last: LoopPoolStatus, now: &str) -> LoopPoolStatus {
    let previous = last.clone();
    last.conditions.retain(|c| c.type_ != MISSING);
    last.conditions.push(condition(
        Some(&previous),
        MISSING,
        true,
        "NotServed",
        "the node plugin no longer serves this pool (removed from its flags); the figures are \
         the last it published",
        now,
    ));
    last.health = MISSING.to_string();
    last.last_update = now.to_string();
    last
}

fn condition(
    previous: Option<&LoopPoolStatus>,
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
    now: &str,
) -> Condition {
    let status = if on { "True" } else { "False" };
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map_or(now, |c| c.last_transition_time.as_str());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: since.to_string(),
    }
}

/// Now, as RFC 3339 (UTC, seconds).
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
#[path = "object_tests.rs"]
mod tests;
