//! Mount propagation of the kubelet directory. The node plugin mounts volumes under it; unless
//! the mount holding it is *shared*, those mounts stay inside the plugin's mount namespace and
//! pods see empty directories.

use std::path::Path;

use super::Check;
use crate::fs::mount::{self, MountEntry};

const NAME: &str = "kubelet mount propagation";

pub fn kubelet_dir(dir: &Path) -> Check {
    if !dir.exists() {
        return Check::pass(
            NAME,
            format!(
                "skipped: {} does not exist (not a Kubernetes node; give --kubelet-dir \
                 otherwise)",
                dir.display()
            ),
        );
    }
    let text = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(t) => t,
        Err(e) => return Check::fail(NAME, format!("read mountinfo: {e}"), "mount /proc"),
    };
    let all = mount::parse_mountinfo(&text);
    let Some(m) = containing_mount(&all, &mount::canonical(dir)) else {
        return Check::fail(
            NAME,
            format!("no mount holds {}", dir.display()),
            "check /proc/self/mountinfo",
        );
    };
    let fields = optional_fields(&text, m.id);
    if fields.iter().any(|f| f.starts_with("shared:")) {
        Check::pass(
            NAME,
            format!(
                "{} is on mount {} with shared propagation",
                dir.display(),
                m.mount_point.display()
            ),
        )
    } else {
        let kind = if fields.iter().any(|f| f.starts_with("master:")) {
            "slave"
        } else {
            "private"
        };
        Check::fail(
            NAME,
            format!(
                "{} is on mount {}, whose propagation is {kind}: volumes mounted by the node \
                 plugin would not reach the pods",
                dir.display(),
                m.mount_point.display()
            ),
            format!(
                "on the host: `mount --make-rshared {}`; in the node plugin's pod: mount the \
                 kubelet directory with mountPropagation: Bidirectional",
                m.mount_point.display()
            ),
        )
    }
}

/// The mount `path` lives on: the longest mount point that is a prefix of it (the last one
/// mounted, when several are stacked).
fn containing_mount<'a>(all: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    all.iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| (m.mount_point.components().count(), position(all, m)))
}

fn position(all: &[MountEntry], m: &MountEntry) -> usize {
    all.iter().position(|x| std::ptr::eq(x, m)).unwrap_or(0)
}

/// The optional fields (`shared:N`, `master:N`...) of mount `id` in a mountinfo text: the
/// fields after the sixth, up to the lone `-`.
fn optional_fields(mountinfo: &str, id: u32) -> Vec<String> {
    mountinfo
        .lines()
        .find(|l| l.split(' ').next().and_then(|f| f.parse().ok()) == Some(id))
        .map(|l| {
            l.split(' ')
                .skip(6)
                .take_while(|f| *f != "-")
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// For tests: the propagation verdict of `path` under a given mountinfo text.
#[cfg(test)]
fn is_shared(mountinfo: &str, path: &Path) -> Option<(std::path::PathBuf, bool)> {
    let all = mount::parse_mountinfo(mountinfo);
    let m = containing_mount(&all, path)?;
    let shared = optional_fields(mountinfo, m.id)
        .iter()
        .any(|f| f.starts_with("shared:"));
    Some((m.mount_point.clone(), shared))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 8:2 / /var/lib rw,relatime master:4 - ext4 /dev/sda2 rw
31 22 8:3 / /var/lib/kubelet rw,relatime shared:7 master:2 - ext4 /dev/sda3 rw
";

    #[test]
    fn finds_the_mount_and_its_propagation() {
        assert_eq!(
            is_shared(INFO, Path::new("/var/lib/kubelet/pods")),
            Some((PathBuf::from("/var/lib/kubelet"), true))
        );
        assert_eq!(
            is_shared(INFO, Path::new("/var/lib/other")),
            Some((PathBuf::from("/var/lib"), false))
        );
        assert_eq!(
            is_shared(INFO, Path::new("/srv")),
            Some((PathBuf::from("/"), true))
        );
        assert!(optional_fields(INFO, 99).is_empty());
    }
}
