//! The CSI socket: loopvol listens on it, every sidecar dials the same one, the registrar tells
//! the kubelet where it is on the host, and the liveness probe watches it.

use super::workload::{mount_for, pods, sidecar, socket_path, CommandLine, PodRef, Sidecar};
use crate::finding::Finding;
use crate::inventory::Inventory;
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The port the livenessprobe sidecar serves when given neither --http-endpoint nor --health-port.
const DEFAULT_HEALTH_PORT: i32 = 9808;

/// loopvol's socket: its path in the loopvol container, and the volume (and path inside it)
/// that other containers must mount to reach it.
struct Socket<'a> {
    path: &'a str,
    volume: &'a str,
    relative: &'a str,
}

pub fn check(inv: &Inventory) -> Vec<Finding> {
    pods(inv)
        .iter()
        .flat_map(|p| check_pod(p, &inv.kubelet_dir))
        .collect()
}

fn check_pod(pod: &PodRef, kubelet_dir: &str) -> Vec<Finding> {
    let Some(driver) = pod.driver() else {
        return orphan_sidecars(pod);
    };
    let cl = CommandLine::of(driver);
    let Some(endpoint) = cl.value("endpoint").map(socket_path) else {
        return vec![pod.finding(driver, "no --endpoint: the sidecars cannot find the driver")];
    };
    let Some((mount, relative)) = mount_for(driver, endpoint) else {
        return vec![pod.finding(
            driver,
            format!(
                "listens on {endpoint}, but no volume is mounted there, so no sidecar can reach it"
            ),
        )];
    };
    let socket = Socket {
        path: endpoint,
        volume: &mount.name,
        relative,
    };
    let mut out: Vec<Finding> = pod
        .containers()
        .filter(|c| sidecar(c).is_some())
        .filter_map(|c| sidecar_address(pod, c, &socket))
        .collect();
    for registrar in pod.sidecars(Sidecar::Registrar) {
        out.extend(registration(pod, registrar, &socket, kubelet_dir));
    }
    out.extend(liveness(pod, driver));
    out
}

fn orphan_sidecars(pod: &PodRef) -> Vec<Finding> {
    pod.containers()
        .filter(|c| sidecar(c).is_some())
        .map(|c| pod.finding(c, "CSI sidecar in a pod without the loopvol container"))
        .collect()
}

fn sidecar_address(pod: &PodRef, c: &Container, socket: &Socket) -> Option<Finding> {
    let cl = CommandLine::of(c);
    let Some(address) = cl.value("csi-address").map(socket_path) else {
        return Some(pod.finding(
            c,
            format!("no --csi-address; loopvol listens on {}", socket.path),
        ));
    };
    let reached = mount_for(c, address).map(|(m, rel)| (m.name.as_str(), rel));
    let message = if reached == Some((socket.volume, socket.relative)) {
        return None;
    } else if address != socket.path {
        format!(
            "--csi-address {address} but loopvol listens on {}",
            socket.path
        )
    } else if let Some((volume, _)) = reached {
        format!(
            "--csi-address {address} is on volume {volume}, but loopvol's socket is on volume {}",
            socket.volume
        )
    } else {
        format!(
            "--csi-address {address}, but volume {} is not mounted there, so this is not \
             loopvol's socket",
            socket.volume
        )
    };
    Some(pod.finding(c, message))
}

/// The registrar must give the kubelet the socket's path on the host, and must mount the
/// kubelet's registration directory.
fn registration(
    pod: &PodRef,
    registrar: &Container,
    socket: &Socket,
    kubelet_dir: &str,
) -> Vec<Finding> {
    // Where the kubelet looks for plugin registration sockets.
    let kubelet_registry = format!("{}/plugins_registry", kubelet_dir.trim_end_matches('/'));
    let cl = CommandLine::of(registrar);
    let mut out = Vec::new();
    let on_host = pod
        .host_path(socket.volume)
        .map(|dir| format!("{}/{}", dir.trim_end_matches('/'), socket.relative));
    match (cl.value("kubelet-registration-path"), on_host) {
        (_, None) => out.push(pod.finding(
            registrar,
            format!(
                "loopvol's socket is on volume {}, which is not a hostPath, so the kubelet cannot reach it",
                socket.volume
            ),
        )),
        (None, Some(host)) => out.push(pod.finding(
            registrar,
            format!("no --kubelet-registration-path; loopvol's socket is {host} on the host"),
        )),
        (Some(given), Some(host)) if given != host => out.push(pod.finding(
            registrar,
            format!(
                "--kubelet-registration-path {given} but loopvol's socket is {host} on the host \
                 (hostPath of volume {})",
                socket.volume
            ),
        )),
        _ => {}
    }
    let registration_dir = cl
        .value("plugin-registration-path")
        .unwrap_or("/registration");
    let mounted = registrar.volume_mounts.iter().flatten().any(|m| {
        m.mount_path.trim_end_matches('/') == registration_dir
            && pod.host_path(&m.name).map(|p| p.trim_end_matches('/'))
                == Some(kubelet_registry.as_str())
    });
    if !mounted {
        out.push(pod.finding(
            registrar,
            format!("must mount hostPath {kubelet_registry} at {registration_dir}, where it registers the driver"),
        ));
    }
    out
}

/// loopvol's livenessProbe must hit the port the livenessprobe sidecar serves.
fn liveness(pod: &PodRef, driver: &Container) -> Vec<Finding> {
    let Some(sidecar) = pod.sidecars(Sidecar::LivenessProbe).next() else {
        return vec![pod.finding(
            driver,
            "no livenessprobe sidecar: nothing checks that the driver still answers",
        )];
    };
    let served = served_port(&CommandLine::of(sidecar));
    let probed = driver
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .map(|get| resolve_port(driver, &get.port));
    let message = match (probed, served) {
        (None, Some(port)) => format!(
            "no livenessProbe; use httpGet /healthz on port {port} (the livenessprobe sidecar)"
        ),
        (Some(probe), Some(port)) if probe == Some(port) => return Vec::new(),
        (Some(probe), Some(port)) => format!(
            "livenessProbe checks port {} but the livenessprobe sidecar serves {port}",
            probe.map_or("<unknown>".to_string(), |p| p.to_string())
        ),
        (_, None) => format!("{}: --http-endpoint has no port number", sidecar.name),
    };
    vec![pod.finding(driver, message)]
}

/// The port of `--http-endpoint=[host]:port`, else of the deprecated `--health-port`.
fn served_port(cl: &CommandLine) -> Option<i32> {
    match (cl.value("http-endpoint"), cl.value("health-port")) {
        (Some(endpoint), _) => endpoint.rsplit(':').next()?.parse().ok(),
        (None, Some(port)) => port.parse().ok(),
        (None, None) => Some(DEFAULT_HEALTH_PORT),
    }
}

fn resolve_port(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    }
}
