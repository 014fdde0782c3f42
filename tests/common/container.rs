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
drop_foreign_loop_mounts "$3" "$4"
shift 4
exec "$@"
"#;

/// A shell function for a container script, defined ahead of it: `drop_foreign_loop_mounts
/// KEEP...` lazily unmounts, in the container's own mount namespace only, every private
/// filesystem on a loop device that is not under one of the KEEP paths. `unshare --mount`
/// copies every mount the host has at that moment, and this machine's `/` is a private mount,
/// so a parallel test's staged volume copied in here would stay mounted in this namespace after
/// that test unmounts it on the host, and that test's node plugin then rightly refuses to
/// unstage a volume "mounted somewhere it cannot see". A real container sees none of those
/// mounts; this makes the emulation match.
///
/// Only mounts that are private and sit on a private parent are dropped. A shared copy (one
/// under another test's kubelet directory) leaves with the host's unmount by propagation, so
/// it is left alone; unmounting it here would propagate out and unmount the other test's
/// volume on the host, and making it private first would open a moment in which the host's
/// unmount no longer reaches it.
pub const DROP_FOREIGN_LOOP_MOUNTS: &str = r#"drop_foreign_loop_mounts() {
  awk -v keep="$*" '
    function shared(from,   i) { for (i = 7; $i != "-"; i++) if ($i ~ /^shared:/) return 1; return 0 }
    NR == FNR { is_shared[$1] = shared(); next }
    FNR == 1 { n = split(keep, k, " ") }
    { for (i = 7; $i != "-"; i++) ; if ($(i + 2) !~ /^\/dev\/loop/) next
      if (is_shared[$1] || is_shared[$2]) next
      for (j = 1; j <= n; j++) if (index($5 "/", k[j] "/") == 1) next
      print $5 }' /proc/self/mountinfo /proc/self/mountinfo |
  while read -r m; do umount -l "$(printf '%b' "$m")" 2>/dev/null || true; done
}
"#;

/// `unshare` running [`CONTAINER`]: append the four paths, then the command.
pub fn unshare_args() -> Vec<String> {
    [
        "unshare",
        "--mount",
        "--propagation",
        "unchanged",
        "--",
        "sh",
        "-c",
        &format!("{DROP_FOREIGN_LOOP_MOUNTS}{CONTAINER}"),
        "loopvol-container",
    ]
    .map(String::from)
    .to_vec()
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
