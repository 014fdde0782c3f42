//! Only the node plugin's loopvol container is privileged, and it has what it needs; everything
//! else that loopvol installs runs with a minimal security context.

use super::workload::{is_driver, pods, PodRef};
use crate::finding::Finding;
use crate::inventory::{Inventory, Origin};
use k8s_openapi::api::core::v1::{Container, SecurityContext};

pub fn check(inv: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    for pod in pods(inv) {
        for c in pod.containers() {
            out.extend(bidirectional_needs_privilege(c).map(|m| pod.finding(c, m)));
            if pod.doc.origin == Origin::Install {
                out.extend(privilege(&pod, c).into_iter().map(|m| pod.finding(c, m)));
            }
        }
        if pod.doc.origin == Origin::Install && pod.per_node {
            out.extend(node_plugin_mounts(&pod, &inv.kubelet_dir));
        }
    }
    out
}

fn is_privileged(c: &Container) -> bool {
    c.security_context.as_ref().and_then(|s| s.privileged) == Some(true)
}

fn bidirectional_needs_privilege(c: &Container) -> Option<String> {
    let bidirectional = c
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.mount_propagation.as_deref() == Some("Bidirectional"));
    (bidirectional && !is_privileged(c)).then(|| {
        "mountPropagation Bidirectional is only allowed in a privileged container".to_string()
    })
}

fn privilege(pod: &PodRef, c: &Container) -> Vec<String> {
    // The serving container only: the certs init container runs the same image unprivileged.
    let node_plugin =
        pod.per_node && is_driver(c) && pod.driver().is_some_and(|d| std::ptr::eq(d, c));
    match (node_plugin, is_privileged(c)) {
        (true, true) => Vec::new(),
        (true, false) => vec![
            "the node plugin must run privileged: it creates loop devices, runs mkfs and mounts \
             into the kubelet's directories"
                .to_string(),
        ],
        (false, true) => {
            vec!["runs privileged; only the node plugin's loopvol container needs that".to_string()]
        }
        (false, false) => minimal(c.security_context.as_ref()),
    }
}

/// Non-privileged containers: no privilege escalation, read-only root, no capabilities.
fn minimal(sc: Option<&SecurityContext>) -> Vec<String> {
    let default = SecurityContext::default();
    let sc = sc.unwrap_or(&default);
    let drops_all = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.as_ref())
        .is_some_and(|d| d.iter().any(|cap| cap == "ALL"));
    let checks = [
        (
            sc.allow_privilege_escalation == Some(false),
            "allowPrivilegeEscalation: false",
        ),
        (
            sc.read_only_root_filesystem == Some(true),
            "readOnlyRootFilesystem: true",
        ),
        (drops_all, "capabilities.drop: [ALL]"),
    ];
    checks
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, what)| format!("securityContext should set {what}"))
        .collect()
}

/// The node plugin needs the host's /dev and the kubelet directory with Bidirectional
/// propagation, or its mounts never reach the pods, and the host's cgroup tree for IO limits.
fn node_plugin_mounts(pod: &PodRef, kubelet_dir: &str) -> Vec<Finding> {
    let kubelet_dir = kubelet_dir.trim_end_matches('/');
    let Some(driver) = pod.driver() else {
        return Vec::new();
    };
    let mounts: Vec<_> = driver
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m, pod.host_path(&m.name).map(|p| p.trim_end_matches('/'))))
        .collect();
    let kubelet = mounts.iter().find(|(m, host)| {
        *host == Some(kubelet_dir) && m.mount_path.trim_end_matches('/') == kubelet_dir
    });
    let mut out = Vec::new();
    // The plugin stages and publishes only inside --kubelet-dir: it must be the directory the
    // kubelet's paths arrive under, mounted at that same path.
    let confined_to = super::workload::CommandLine::of(driver)
        .value("kubelet-dir")
        .map(|d| d.trim_end_matches('/').to_string())
        .unwrap_or_else(|| kubelet_dir.to_string());
    if confined_to != kubelet_dir {
        out.push(format!(
            "--kubelet-dir {confined_to}, but the kubelet's paths arrive under {kubelet_dir}: \
             every NodeStageVolume and NodePublishVolume would be refused"
        ));
    }
    match kubelet {
        None => out.push(format!(
            "must mount hostPath {kubelet_dir} at {kubelet_dir}: the kubelet's staging and publish paths are under it"
        )),
        Some((m, _)) if m.mount_propagation.as_deref() != Some("Bidirectional") => out.push(format!(
            "{kubelet_dir} needs mountPropagation: Bidirectional, or mounts made by the plugin stay invisible to the kubelet"
        )),
        Some(_) => {}
    }
    if !mounts
        .iter()
        .any(|(m, host)| *host == Some("/dev") && m.mount_path == "/dev")
    {
        out.push("must mount hostPath /dev at /dev: loop devices appear there after the container starts".to_string());
    }
    out.extend(host_cgroup_tree(pod, driver));
    out.into_iter().map(|m| pod.finding(driver, m)).collect()
}

/// The host's cgroup tree, where IO limits are written into pods' cgroups.
const HOST_CGROUP: &str = "/sys/fs/cgroup";

/// The plugin looks for pods' cgroups under --cgroup-root: the host's tree must be mounted
/// there, writable. A container's own /sys/fs/cgroup holds only its own cgroup, so without the
/// mount every volume with IO limits is refused.
fn host_cgroup_tree(pod: &PodRef, driver: &Container) -> Option<String> {
    let cl = super::workload::CommandLine::of(driver);
    let root = cl.value("cgroup-root").unwrap_or(HOST_CGROUP);
    let root = root.trim_end_matches('/');
    // The mount that holds `root` (the longest mount path that is it or above it), and the
    // host path `root` then shows.
    let holding = driver
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let at = m.mount_path.trim_end_matches('/');
            let rest = root.strip_prefix(at)?;
            (rest.is_empty() || rest.starts_with('/')).then_some((m, rest))
        })
        .max_by_key(|(m, _)| m.mount_path.len());
    let shown = holding.and_then(|(m, rest)| {
        let host = pod.host_path(&m.name)?.trim_end_matches('/');
        Some((m, format!("{host}{rest}")))
    });
    match shown {
        Some((m, host)) if host == HOST_CGROUP => m.read_only.unwrap_or(false).then(|| {
            format!(
                "the host's cgroup tree at {root} is mounted readOnly: IO limits are written into \
                 pods' cgroups there (io.max, blkio.throttle.*)"
            )
        }),
        _ => Some(format!(
            "--cgroup-root {root} is not the host's cgroup tree: mount hostPath {HOST_CGROUP} at \
             {root}, or no pod's cgroup is found and every volume with IO limits is refused"
        )),
    }
}
