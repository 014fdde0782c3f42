//! Finding a pod's cgroup wherever the node's kubelet made it.
//!
//! kubelet names a pod's cgroup `pod<uid>` (cgroupfs driver) or `…-pod<uid_>.slice` (systemd
//! driver, the UID's dashes as underscores), under `kubepods[/<qos>]` or
//! `kubepods.slice[/kubepods-<qos>.slice]`, and all of that under its own `--cgroup-root`: `/`
//! by default, `/kubelet` on kind, a per-node directory where several kubelets share a host.
//! The well-known places are tried first; then a bounded breadth-first search of every
//! hierarchy that has a block throttle finds the pod under any kubelet cgroup root. The search
//! never descends into another pod's cgroup (only its containers are there), so it costs about
//! one directory read per system service and per pod on the node.
//!
//! What the node plugin can see is what its container was given: the host's cgroup tree must
//! be mounted at `--cgroup-root` (manifests/node.yaml); a container's own `/sys/fs/cgroup`
//! holds only its own cgroup, and [`Lookup::describe`] says so when nothing is found.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use super::io_throttle::version_of;

/// How deep below a hierarchy's root a pod's cgroup may be: kubepods, QoS class and pod are
/// three levels, leaving five for a kubelet cgroup root (itself perhaps inside a container's
/// cgroup, as with kind).
pub const MAX_DEPTH: usize = 8;
/// At most this many cgroup directories are read per lookup, a bound on a runaway tree.
pub const MAX_DIRS: usize = 20_000;

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The pod's cgroup, with a block throttle (v1 blkio or v2 `io.max`).
    Throttled(PathBuf),
    /// The pod's cgroups, none of which can throttle (v2 without the io controller enabled).
    Unthrottled(Vec<PathBuf>),
    /// No cgroup of the pod in these hierarchies, after reading `visited` directories.
    Missing {
        hierarchies: Vec<PathBuf>,
        visited: usize,
    },
}

impl Lookup {
    pub fn cgroup(&self) -> Option<&Path> {
        match self {
            Lookup::Throttled(p) => Some(p),
            _ => None,
        }
    }

    /// Why there is no cgroup to write rules to, for the operator.
    pub fn describe(&self, root: &Path, uid: &str) -> String {
        match self {
            Lookup::Throttled(p) => format!("pod {uid} has cgroup {}", p.display()),
            Lookup::Unthrottled(dirs) => format!(
                "the cgroup of pod {uid} ({}) has no block throttle: neither blkio.throttle.* nor \
                 io.max (on cgroup v2 the io controller must be enabled for kubepods)",
                join(dirs)
            ),
            Lookup::Missing { hierarchies, .. } if hierarchies.is_empty() => format!(
                "no cgroup of pod {uid}: no cgroup hierarchy with a block throttle under {} \
                 (the node plugin needs the host's cgroup tree mounted there, see \
                 manifests/node.yaml)",
                root.display()
            ),
            Lookup::Missing {
                hierarchies,
                visited,
            } => format!(
                "no cgroup of pod {uid} with a block throttle under {} (searched {} to depth \
                 {MAX_DEPTH}, {visited} cgroup directories read, for kubelet's cgroupfs and \
                 systemd layouts under any kubelet --cgroup-root); the node plugin must see the \
                 host's cgroup tree there, not its container's own (see manifests/node.yaml)",
                root.display(),
                join(hierarchies)
            ),
        }
    }
}

fn join(paths: &[PathBuf]) -> String {
    let v: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    v.join(", ")
}

/// The hierarchies under `root` that can hold throttle rules, v1 blkio before v2: `root`
/// itself when it is a v2 root or a v1 blkio hierarchy, else its children that are (the v1
/// and hybrid layouts: `blkio`, `unified`).
pub fn hierarchies(root: &Path) -> Vec<PathBuf> {
    let v1 = |d: &Path| d.join("blkio.throttle.write_iops_device").exists();
    let v2 = |d: &Path| d.join("cgroup.controllers").exists();
    if v1(root) || v2(root) {
        return vec![root.to_path_buf()];
    }
    let mut children: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    children.sort();
    let mut out: Vec<PathBuf> = children.iter().filter(|d| v1(d)).cloned().collect();
    out.extend(children.into_iter().filter(|d| v2(d)));
    out
}

/// The cgroup directories kubelet gives the pod `uid` with the default cgroup root, in the
/// order they are tried: the cgroupfs driver (`kubepods/<qos>/pod<uid>`) and the systemd
/// driver (`kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`) under a
/// hierarchy; Guaranteed pods sit directly under `kubepods`.
pub fn well_known(hierarchy: &Path, uid: &str) -> Vec<PathBuf> {
    let systemd_uid = uid.replace('-', "_");
    let mut out = vec![hierarchy.join("kubepods").join(format!("pod{uid}"))];
    for qos in ["burstable", "besteffort"] {
        out.push(
            hierarchy
                .join("kubepods")
                .join(qos)
                .join(format!("pod{uid}")),
        );
    }
    let slice = hierarchy.join("kubepods.slice");
    out.push(slice.join(format!("kubepods-pod{systemd_uid}.slice")));
    for qos in ["burstable", "besteffort"] {
        out.push(
            slice
                .join(format!("kubepods-{qos}.slice"))
                .join(format!("kubepods-{qos}-pod{systemd_uid}.slice")),
        );
    }
    out
}

/// A UID as kubelet writes it in a cgroup name: hex digits and dashes (cgroupfs) or
/// underscores (systemd), a UUID's length.
fn uid_like(s: &str, sep: u8) -> bool {
    s.len() >= 32 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == sep)
}

/// The UID part of a pod cgroup's name, `pod<uid>` or `…-pod<uid_>.slice`.
fn pod_of(name: &str) -> Option<&str> {
    if let Some(uid) = name.strip_prefix("pod").filter(|u| uid_like(u, b'-')) {
        return Some(uid);
    }
    let stem = name.strip_suffix(".slice")?;
    let (_, last) = stem.rsplit_once('-')?;
    last.strip_prefix("pod").filter(|u| uid_like(u, b'_'))
}

/// Breadth-first search of `hierarchy` for cgroups named for pod `uid`; `budget` counts the
/// directories read, shared by all hierarchies of one lookup.
fn search(hierarchy: &Path, uid: &str, budget: &mut usize) -> Vec<PathBuf> {
    let systemd_uid = uid.replace('-', "_");
    let mut found = Vec::new();
    let mut queue = VecDeque::from([(hierarchy.to_path_buf(), 0usize)]);
    while let Some((dir, depth)) = queue.pop_front() {
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            match pod_of(name) {
                Some(u) if u == uid || u == systemd_uid => found.push(e.path()),
                // Another pod: only its containers are below.
                Some(_) => {}
                None if depth + 1 < MAX_DEPTH => queue.push_back((e.path(), depth + 1)),
                None => {}
            }
        }
    }
    found
}

/// The cgroup of pod `uid` (already validated as a UID) under the cgroup filesystem `root`.
pub fn locate(root: &Path, uid: &str) -> Lookup {
    let hierarchies = hierarchies(root);
    let mut unthrottled = Vec::new();
    for h in &hierarchies {
        for dir in well_known(h, uid) {
            if version_of(&dir).is_some() {
                return Lookup::Throttled(dir);
            }
        }
    }
    let mut budget = MAX_DIRS;
    for h in &hierarchies {
        for dir in search(h, uid, &mut budget) {
            if version_of(&dir).is_some() {
                return Lookup::Throttled(dir);
            }
            unthrottled.push(dir);
        }
    }
    if !unthrottled.is_empty() {
        return Lookup::Unthrottled(unthrottled);
    }
    Lookup::Missing {
        hierarchies,
        visited: MAX_DIRS - budget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f3c2a1e-7b9d-4c1a-9e8f-123456789abc";
    const OTHER: &str = "11111111-2222-3333-4444-555555555555";

    fn cgroup(root: &Path, rel: &str, file: &str) -> PathBuf {
        let dir = root.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), "").unwrap();
        dir
    }

    #[test]
    fn pod_names_of_both_drivers() {
        let u_ = UID.replace('-', "_");
        assert_eq!(pod_of(&format!("pod{UID}")), Some(UID));
        assert_eq!(
            pod_of(&format!("kubepods-burstable-pod{u_}.slice")),
            Some(u_.as_str())
        );
        assert_eq!(
            pod_of(&format!("k8slab-kubepods-pod{u_}.slice")),
            Some(u_.as_str())
        );
        // Cgroup roots and QoS slices that merely contain "pod" are not pods.
        for name in [
            "kubepods",
            "kubepods.slice",
            "k8s-pods.slice",
            "kubepods-besteffort.slice",
            "pods",
            "podcast.service",
        ] {
            assert_eq!(pod_of(name), None, "{name}");
        }
    }

    /// A kubelet with its own `--cgroup-root`, in both drivers, in a v1 blkio hierarchy with
    /// other services and pods around it.
    #[test]
    fn pods_under_a_kubelet_cgroup_root_are_found() {
        let u_ = UID.replace('-', "_");
        for layout in [
            format!("blkio/k8slab-node-2/kubepods/burstable/pod{UID}"),
            format!("blkio/k8slab-node-2/kubepods/pod{UID}"),
            format!("blkio/a/b/c/kubepods/besteffort/pod{UID}"),
            format!(
                "blkio/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                 kubelet-kubepods-besteffort-pod{u_}.slice"
            ),
        ] {
            let root = tempfile::tempdir().unwrap();
            let r = root.path();
            let throttle = "blkio.throttle.write_iops_device";
            std::fs::create_dir_all(r.join("memory/kubepods")).unwrap();
            cgroup(r, "blkio", throttle);
            cgroup(r, "blkio/system.slice/sshd.service", throttle);
            cgroup(
                r,
                &format!("blkio/k8slab-node-1/kubepods/pod{OTHER}"),
                throttle,
            );
            cgroup(
                r,
                &format!("blkio/k8slab-node-1/kubepods/pod{OTHER}/c1"),
                throttle,
            );
            let dir = cgroup(r, &layout, throttle);
            assert_eq!(locate(r, UID), Lookup::Throttled(dir), "{layout}");
            assert!(matches!(locate(r, OTHER), Lookup::Throttled(_)));
            let missing = "22222222-2222-3333-4444-555555555555";
            match locate(r, missing) {
                Lookup::Missing {
                    hierarchies,
                    visited,
                } => {
                    assert_eq!(hierarchies, vec![r.join("blkio")]);
                    assert!(visited > 5 && visited < 20, "{visited}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_pod_cgroup_without_a_throttle_is_reported_as_such() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        cgroup(r, "", "cgroup.controllers");
        let dir = cgroup(
            r,
            &format!("kubepods/burstable/pod{UID}"),
            "cgroup.controllers",
        );
        let found = locate(r, UID);
        assert_eq!(found, Lookup::Unthrottled(vec![dir.clone()]));
        assert!(found.describe(r, UID).contains(&dir.display().to_string()));
        std::fs::write(dir.join("io.max"), "").unwrap();
        assert_eq!(locate(r, UID), Lookup::Throttled(dir));
    }

    #[test]
    fn the_search_is_bounded_in_depth() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        cgroup(r, "blkio", "blkio.throttle.write_iops_device");
        let deep = "blkio/1/2/3/4/5/6/7/8/kubepods";
        cgroup(
            r,
            &format!("{deep}/pod{UID}"),
            "blkio.throttle.write_iops_device",
        );
        assert!(matches!(locate(r, UID), Lookup::Missing { .. }));
    }

    #[test]
    fn a_container_without_the_host_tree_is_told_so() {
        let root = tempfile::tempdir().unwrap();
        let msg = locate(root.path(), UID).describe(root.path(), UID);
        assert!(
            msg.contains("no cgroup hierarchy with a block throttle"),
            "{msg}"
        );
        assert!(msg.contains("manifests/node.yaml"), "{msg}");
    }
}
