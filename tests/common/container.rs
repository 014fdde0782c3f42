//! The node plugin's container, as the DaemonSet in manifests/node.yaml makes it: a mount
//! namespace of its own (`unshare --mount`) that sees the host's pool through a bind mount and
//! the kubelet directory through an rbind that stays in the host's peer group
//! (`mountPropagation: Bidirectional`), so what the plugin stages and publishes shows up on
//! the host, as it does for kubelet.

use std::path::Path;

use nix::mount::{mount, MsFlags};

/// What the container runtime does for the node plugin's container, as a shell script run by
/// `unshare --mount --propagation unchanged`: bind the pool, rbind the kubelet directory (it
/// stays in the host's peer group, so mounts propagate both ways), and hide the host's own
/// view of the kubelet directory as a container would not have one (made private first, so
/// that unmounting this namespace's copy cannot propagate to the host). Paths come in as
/// positional arguments, never inside the script: `$1` host pool, `$2` host kubelet directory,
/// `$3` and `$4` where the container sees them, then the command.
pub const CONTAINER: &str = r#"set -e
mount --bind "$1" "$3"
mount --rbind "$2" "$4"
mount --make-rprivate "$2"
umount -R "$2"
shift 4
exec "$@"
"#;

/// `unshare` running [`CONTAINER`]: append the four paths, then the command.
pub fn unshare_args() -> Vec<&'static str> {
    vec![
        "unshare",
        "--mount",
        "--propagation",
        "unchanged",
        "--",
        "sh",
        "-c",
        CONTAINER,
        "loopvol-container",
    ]
}

pub fn bind(src: &Path, dst: &Path) {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .unwrap_or_else(|e| panic!("bind {} on {}: {e}", src.display(), dst.display()));
}

pub fn propagation(path: &Path, flag: MsFlags) {
    mount(None::<&str>, path, None::<&str>, flag, None::<&str>)
        .unwrap_or_else(|e| panic!("set propagation of {}: {e}", path.display()));
}

/// Make `root` (a test's temp dir) a private mount of its own, so nothing mounted below it
/// propagates anywhere else, and `kubelet` (below it) a shared one, as Bidirectional
/// propagation needs.
pub fn fence(root: &Path, kubelets: &[&Path]) {
    bind(root, root);
    propagation(root, MsFlags::MS_PRIVATE);
    for k in kubelets {
        bind(k, k);
        propagation(k, MsFlags::MS_SHARED);
    }
}
