//! Per-container hygiene: resource requests and limits, `$(VAR)` references that resolve, and a
//! node ID that comes from the node the pod runs on.

use super::quantity;
use super::workload::{env_from_field, env_references, pods, CommandLine, PodRef};
use crate::finding::Finding;
use crate::inventory::Inventory;
use k8s_openapi::api::core::v1::{Container, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

pub fn check(inv: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    for pod in pods(inv) {
        for c in pod.containers() {
            out.extend(resources(c).map(|m| pod.finding(c, m)));
            out.extend(
                undefined_variables(c)
                    .into_iter()
                    .map(|m| pod.finding(c, m)),
            );
        }
        out.extend(node_id(&pod));
    }
    out
}

/// requests.cpu, requests.memory and limits.memory must be set, and the request within the
/// limit. (No CPU limit is required: throttling a CSI driver only makes mounts time out.)
fn resources(c: &Container) -> Option<String> {
    let empty = ResourceRequirements::default();
    let r = c.resources.as_ref().unwrap_or(&empty);
    fn get<'a>(map: &'a Option<BTreeMap<String, Quantity>>, key: &str) -> Option<&'a Quantity> {
        map.as_ref().and_then(|m| m.get(key))
    }
    let wanted = [
        ("requests.cpu", get(&r.requests, "cpu")),
        ("requests.memory", get(&r.requests, "memory")),
        ("limits.memory", get(&r.limits, "memory")),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, q)| q.is_none())
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Some(format!("resources: {} not set", missing.join(", ")));
    }
    let request = get(&r.requests, "memory").and_then(quantity::parse);
    let limit = get(&r.limits, "memory").and_then(quantity::parse);
    match (request, limit) {
        (Some(req), Some(lim)) if req > lim => {
            Some("resources: requests.memory is above limits.memory".to_string())
        }
        (None, _) | (_, None) => Some("resources: memory is not a valid quantity".to_string()),
        _ => None,
    }
}

/// The kubelet only expands `$(VAR)` for variables in the container's env; others are passed
/// through literally.
fn undefined_variables(c: &Container) -> Vec<String> {
    let defined = |name: &str| c.env.iter().flatten().any(|e| e.name == name);
    c.command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .flat_map(|word| env_references(word))
        .filter(|var| !defined(var))
        .map(|var| {
            format!("$({var}) is used in the command line but {var} is not in env, so it is passed literally")
        })
        .collect()
}

/// loopvol's --node-id must be the node's name, through the downward API: it ends up in volume
/// IDs and in the topology label the scheduler matches against.
fn node_id(pod: &PodRef) -> Option<Finding> {
    let driver = pod.driver()?;
    let cl = CommandLine::of(driver);
    let from_node_name = |value: &str| {
        env_references(value)
            .first()
            .is_some_and(|var| env_from_field(driver, var, "spec.nodeName"))
    };
    let message = match cl.value("node-id") {
        None => {
            "no --node-id; pass $(NODE_NAME) with NODE_NAME from fieldRef spec.nodeName".to_string()
        }
        Some(value) if from_node_name(value) => return None,
        Some(value) => format!(
            "--node-id {value} is not the node's name; pass $(NODE_NAME) with NODE_NAME from \
             fieldRef spec.nodeName"
        ),
    };
    Some(pod.finding(driver, message))
}
