//! Enforcing a volume's IO limits with the kernel's block throttle.
//!
//! The loop driver charges IO to the cgroup of the task that issues it, so a throttle rule for
//! the volume's loop device (`MAJ:MIN`) in a pod's cgroup caps exactly that pod on exactly that
//! volume, and nothing else on the node. cgroup v1 has one file per knob
//! (`blkio.throttle.write_iops_device`: `MAJ:MIN N`, 0 removes the rule); cgroup v2 has one
//! line in `io.max` (`MAJ:MIN riops=N wiops=N rbps=N wbps=N`, `max` for none). On cgroup v1 the
//! kernel charges writeback of buffered writes to the root cgroup, so there only direct and
//! synchronous IO is throttled; v2 charges writeback to the page's owner.
//!
//! Each publication records the cgroup its rules went to (`<pool>/node/io/<hex>.json`), so a
//! ControllerModifyVolume can rewrite the rules of every pod using the volume right now,
//! without a remount, from any process on the node (the record is on disk, not in memory).

use std::path::{Path, PathBuf};

use provisioner::ids::Kind;
use provisioner::{atomic, IoLimits, VolumeId};
use serde::{Deserialize, Serialize};

use crate::engine::{pod_cgroup, Engine};
use crate::error::{Error, Result};

/// The volume_context key kubelet sets when the CSIDriver has `podInfoOnMount: true`.
pub const POD_UID_KEY: &str = "csi.storage.k8s.io/pod.uid";

/// Where pod cgroups are looked for, and the cgroup for callers that are not pods.
#[derive(Debug, Clone, Default)]
pub struct CgroupConfig {
    /// The host's cgroup filesystem as the node plugin sees it: `/sys/fs/cgroup` on every
    /// distribution kubelet supports, mounted from the host there by manifests/node.yaml.
    pub root: PathBuf,
    /// Publishes without a pod UID (plain CSI clients, the embedded default) are charged here.
    pub default_cgroup: Option<PathBuf>,
}

/// How a cgroup directory takes throttle rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// One publication's rules: which cgroup, for which device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub target: PathBuf,
    pub cgroup: PathBuf,
    pub major: u32,
    pub minor: u32,
}

pub fn version_of(cgroup: &Path) -> Option<Version> {
    if cgroup.join("blkio.throttle.write_iops_device").exists() {
        Some(Version::V1)
    } else if cgroup.join("io.max").exists() {
        Some(Version::V2)
    } else {
        None
    }
}

/// A pod UID as the API server makes them; anything else never reaches a path.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
}

/// The cgroup a publication's IO is charged to: the pod's, or the configured default for
/// callers that are not pods. `Ok(None)` when there is none; the error explains where it looked.
pub fn find_cgroup(cfg: &CgroupConfig, pod_uid: Option<&str>) -> Result<Option<PathBuf>> {
    let Some(uid) = pod_uid.filter(|u| !u.is_empty()) else {
        return Ok(cfg
            .default_cgroup
            .clone()
            .filter(|c| version_of(c).is_some()));
    };
    if !valid_uid(uid) {
        return Err(Error::InvalidArgument(format!(
            "volume_context {POD_UID_KEY} {uid:?} is not a pod UID"
        )));
    }
    Ok(pod_cgroup::locate(&cfg.root, uid)
        .cgroup()
        .map(Path::to_path_buf))
}

/// The rule text for `dev` in a cgroup of `version`: (file, line) pairs to write.
pub fn rules(
    version: Version,
    (major, minor): (u32, u32),
    l: &IoLimits,
) -> Vec<(&'static str, String)> {
    match version {
        Version::V1 => [
            ("blkio.throttle.read_iops_device", l.read_iops),
            ("blkio.throttle.write_iops_device", l.write_iops),
            ("blkio.throttle.read_bps_device", l.read_bps),
            ("blkio.throttle.write_bps_device", l.write_bps),
        ]
        .into_iter()
        .map(|(f, v)| (f, format!("{major}:{minor} {}", v.unwrap_or(0))))
        .collect(),
        Version::V2 => {
            let v = |x: Option<u64>| x.map_or_else(|| "max".to_string(), |n| n.to_string());
            vec![(
                "io.max",
                format!(
                    "{major}:{minor} rbps={} wbps={} riops={} wiops={}",
                    v(l.read_bps),
                    v(l.write_bps),
                    v(l.read_iops),
                    v(l.write_iops)
                ),
            )]
        }
    }
}

/// Write `limits` for device `dev` into `cgroup` (unlimited values remove their rule).
pub fn write_rules(cgroup: &Path, dev: (u32, u32), limits: &IoLimits) -> Result<()> {
    let version = version_of(cgroup).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "{} has no block throttle (neither blkio.throttle.* nor io.max)",
            cgroup.display()
        ))
    })?;
    for (file, line) in rules(version, dev, limits) {
        let path = cgroup.join(file);
        std::fs::write(&path, &line)
            .map_err(|e| Error::io(format!("write {line:?} to {}", path.display()), e))?;
    }
    Ok(())
}

/// `MAJ:MIN` of a block device node.
pub fn device_number(device: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(device)
        .map_err(|e| Error::io(format!("stat {}", device.display()), e))?;
    let rdev = m.rdev();
    Ok((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

fn record_path(d: &Engine, hex: &str) -> PathBuf {
    d.node_dir_of(hex).join("io").join(format!("{hex}.json"))
}

fn load(d: &Engine, hex: &str) -> Vec<Applied> {
    std::fs::read(record_path(d, hex))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Like staging records, atomic but not durable: cgroups and loop devices do not outlive a
/// power cut either.
fn save(d: &Engine, hex: &str, applied: &[Applied]) -> Result<()> {
    let path = record_path(d, hex);
    if applied.is_empty() {
        return atomic::remove_file_unsynced(&path)
            .map(drop)
            .map_err(|e| Error::io(format!("remove {}", path.display()), e));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    let bytes = serde_json::to_vec_pretty(applied).expect("records serialise");
    atomic::write_file_unsynced(&path, &bytes)
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

fn hex_of(id: &str) -> Result<String> {
    VolumeId::parse(Kind::Volume, id)
        .map(|v| v.hex)
        .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))
}

/// Before a publish: the cgroup its IO will be charged to. A volume with limits whose pod
/// cgroup cannot be found is refused rather than published unlimited; kubelet reports the
/// error as an event on the pod.
pub fn before_publish(d: &Engine, id: &str, pod_uid: Option<&str>) -> Result<Option<PathBuf>> {
    let limits = d.pools.get_volume(id)?.io_limits;
    let found = find_cgroup(&d.cgroups, pod_uid)?;
    if found.is_none() && !limits.is_empty() {
        let looked = match pod_uid.filter(|u| !u.is_empty()) {
            // Only on this error path: look again, to say what is missing and where.
            Some(uid) => pod_cgroup::locate(&d.cgroups.root, uid).describe(&d.cgroups.root, uid),
            None => "no pod UID in volume_context (set podInfoOnMount: true in the CSIDriver) \
                     and no --io-cgroup for other callers"
                .to_string(),
        };
        return Err(Error::FailedPrecondition(format!(
            "volume {id} has IO limits ({}) that cannot be enforced: {looked}",
            limits.describe()
        )));
    }
    Ok(found)
}

/// After a publish on `device`: write the rules into `cgroup` and remember them.
pub fn after_publish(
    d: &Engine,
    id: &str,
    target: &Path,
    cgroup: Option<PathBuf>,
    device: &Path,
) -> Result<()> {
    let Some(cgroup) = cgroup else {
        return Ok(());
    };
    let hex = hex_of(id)?;
    let _g = d.pools.for_id(Kind::Volume, id)?.lock_volume(&hex);
    let limits = d.pools.get_volume(id)?.io_limits;
    let (major, minor) = device_number(device)?;
    write_rules(&cgroup, (major, minor), &limits)?;
    let mut applied = load(d, &hex);
    applied.retain(|a| a.target != target);
    applied.push(Applied {
        target: target.to_path_buf(),
        cgroup,
        major,
        minor,
    });
    save(d, &hex, &applied)?;
    tracing::info!(volume_id = id, target = %target.display(), limits = %limits.describe(), "IO limits applied");
    Ok(())
}

/// After an unpublish: remove the rules this publication wrote (a pod's cgroup may outlive
/// the volume's use in it, and the device number will be reused).
pub fn after_unpublish(d: &Engine, id: &str, target: &Path) -> Result<()> {
    let hex = hex_of(id)?;
    let _g = d.pools.for_id(Kind::Volume, id)?.lock_volume(&hex);
    let mut applied = load(d, &hex);
    let Some(pos) = applied.iter().position(|a| a.target == target) else {
        return Ok(());
    };
    let gone = applied.remove(pos);
    if gone.cgroup.exists() {
        write_rules(&gone.cgroup, (gone.major, gone.minor), &IoLimits::default())?;
    }
    save(d, &hex, &applied)
}

/// Rewrite the rules of every current publication of volume `id` with its recorded limits, for
/// the device it is attached to now (`device` finds it; ControllerModifyVolume, and a re-stage
/// that got a new device). Publications whose pod cgroup is gone are forgotten. A volume that
/// no pod has published costs one failed file open.
pub fn reapply(
    d: &Engine,
    id: &str,
    device: impl FnOnce() -> Result<Option<PathBuf>>,
) -> Result<usize> {
    let hex = hex_of(id)?;
    let _g = d.pools.for_id(Kind::Volume, id)?.lock_volume(&hex);
    let mut applied = load(d, &hex);
    if applied.is_empty() {
        return Ok(0);
    }
    let limits = d.pools.get_volume(id)?.io_limits;
    let now = device()?.as_deref().map(device_number).transpose()?;
    applied.retain(|a| a.cgroup.exists());
    for a in &mut applied {
        let dev = now.unwrap_or((a.major, a.minor));
        if dev != (a.major, a.minor) {
            // The volume moved to another loop device: the old number's rules must not stay
            // behind for whatever device gets that number next.
            write_rules(&a.cgroup, (a.major, a.minor), &IoLimits::default())?;
            (a.major, a.minor) = dev;
        }
        write_rules(&a.cgroup, dev, &limits)?;
    }
    save(d, &hex, &applied)?;
    tracing::info!(volume_id = id, publications = applied.len(), limits = %limits.describe(), "IO limits re-applied");
    Ok(applied.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_text_for_both_cgroup_versions() {
        let l = IoLimits {
            write_iops: Some(300),
            read_bps: Some(8 << 20),
            ..Default::default()
        };
        let v1 = rules(Version::V1, (7, 3), &l);
        assert_eq!(
            v1,
            vec![
                ("blkio.throttle.read_iops_device", "7:3 0".to_string()),
                ("blkio.throttle.write_iops_device", "7:3 300".to_string()),
                ("blkio.throttle.read_bps_device", "7:3 8388608".to_string()),
                ("blkio.throttle.write_bps_device", "7:3 0".to_string()),
            ]
        );
        assert_eq!(
            rules(Version::V2, (7, 3), &l),
            vec![(
                "io.max",
                "7:3 rbps=8388608 wbps=max riops=max wiops=300".to_string()
            )]
        );
        assert_eq!(
            rules(Version::V2, (7, 0), &IoLimits::default())[0].1,
            "7:0 rbps=max wbps=max riops=max wiops=max"
        );
    }

    /// Directory trees laid out as kubelet lays them, for both drivers and both versions.
    #[test]
    fn pod_cgroups_are_found_in_every_kubelet_layout() {
        let uid = "0f3c2a1e-7b9d-4c1a-9e8f-123456789abc";
        let u_ = uid.replace('-', "_");
        for (layout, file) in [
            (format!("blkio/kubepods/burstable/pod{uid}"), "blkio.throttle.write_iops_device"),
            (format!("blkio/kubepods/pod{uid}"), "blkio.throttle.write_iops_device"),
            (
                format!("blkio/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u_}.slice"),
                "blkio.throttle.write_iops_device",
            ),
            (
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u_}.slice"),
                "io.max",
            ),
            (format!("kubepods.slice/kubepods-pod{u_}.slice"), "io.max"),
            (format!("kubepods/besteffort/pod{uid}"), "io.max"),
        ] {
            let root = tempfile::tempdir().unwrap();
            // The hierarchy's own root: a v1 blkio mount, or a v2 unified root.
            let (top, marker) = match layout.strip_prefix("blkio/") {
                Some(_) => (root.path().join("blkio"), file),
                None => (root.path().to_path_buf(), "cgroup.controllers"),
            };
            std::fs::create_dir_all(&top).unwrap();
            std::fs::write(top.join(marker), "").unwrap();
            let dir = root.path().join(&layout);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(file), "").unwrap();
            let cfg = CgroupConfig {
                root: root.path().to_path_buf(),
                default_cgroup: None,
            };
            assert_eq!(find_cgroup(&cfg, Some(uid)).unwrap(), Some(dir.clone()), "{layout}");
            let want = if file == "io.max" { Version::V2 } else { Version::V1 };
            assert_eq!(version_of(&dir), Some(want));
            // Another pod's UID finds nothing.
            let other = "11111111-2222-3333-4444-555555555555";
            assert_eq!(find_cgroup(&cfg, Some(other)).unwrap(), None, "{layout}");
        }
        let cfg = CgroupConfig::default();
        for hostile in ["../../etc", "pod/x", "a b", &"f".repeat(65)] {
            assert!(find_cgroup(&cfg, Some(hostile)).is_err(), "{hostile:?}");
        }
    }

    #[test]
    fn callers_without_a_pod_use_the_configured_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let cg = root.path().join("mine");
        std::fs::create_dir_all(&cg).unwrap();
        let cfg = CgroupConfig {
            root: root.path().to_path_buf(),
            default_cgroup: Some(cg.clone()),
        };
        // Not a cgroup (no throttle files): nothing to write to.
        assert_eq!(find_cgroup(&cfg, None).unwrap(), None);
        std::fs::write(cg.join("io.max"), "").unwrap();
        assert_eq!(find_cgroup(&cfg, None).unwrap(), Some(cg.clone()));
        assert_eq!(find_cgroup(&cfg, Some("")).unwrap(), Some(cg));
    }
}
