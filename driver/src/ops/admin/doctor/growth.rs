//! Online growth of mounted ext4. resize2fs grows a mounted ext4 through EXT4_IOC_RESIZE_FS,
//! which the kernel allows only with CAP_SYS_RESOURCE; root in a container or sandbox that
//! dropped it is refused. Nothing is lost (the volume is grown offline when it is next staged),
//! but an operator who expands a PVC expects the pod to see the space now, so this warns.
//! xfs and btrfs grow online with CAP_SYS_ADMIN alone.

use provisioner::FsType;

use super::Check;
use crate::shared::kernel::{has_capability, CAP_SYS_RESOURCE};

const NAME: &str = "online ext4 growth";

/// A check only when ext4 is among the filesystems in use.
pub fn ext4_online(fs_types: &[FsType]) -> Option<Check> {
    fs_types
        .contains(&FsType::Ext4)
        .then(|| verdict(has_capability(CAP_SYS_RESOURCE)))
}

fn verdict(held: Option<bool>) -> Check {
    match held {
        Some(true) => Check::pass(
            NAME,
            "CAP_SYS_RESOURCE is held: mounted ext4 volumes grow while in use",
        ),
        Some(false) => Check::warn(
            NAME,
            "this process lacks CAP_SYS_RESOURCE, which the kernel demands to grow a mounted \
             ext4: NodeExpandVolume of a staged ext4 volume answers FAILED_PRECONDITION, and the \
             filesystem grows only when the volume is next staged (its pods restarted)",
            "run the node plugin with CAP_SYS_RESOURCE (privileged, as manifests/node.yaml \
             does, or `capabilities: add: [SYS_RESOURCE]`), and run doctor inside it; or use \
             xfs or btrfs, which grow online without it",
        ),
        None => Check::warn(
            NAME,
            "cannot read CapEff from /proc/self/status to tell whether CAP_SYS_RESOURCE is \
             held (without it, mounted ext4 volumes grow only when next staged)",
            "mount /proc",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Verdict;
    use super::*;

    #[test]
    fn warns_without_the_capability_and_only_for_ext4() {
        assert!(matches!(verdict(Some(true)).verdict, Verdict::Pass(_)));
        match verdict(Some(false)).verdict {
            Verdict::Warn { problem, fix } => {
                assert!(problem.contains("CAP_SYS_RESOURCE"), "{problem}");
                assert!(problem.contains("next staged"), "{problem}");
                assert!(fix.contains("SYS_RESOURCE"), "{fix}");
            }
            v => panic!("{v:?}"),
        }
        assert!(ext4_online(&[FsType::Xfs, FsType::Btrfs]).is_none());
        assert!(ext4_online(&[FsType::Ext4]).is_some());
    }
}
