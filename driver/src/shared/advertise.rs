//! Which optional capabilities loopvol advertises, and why some are off by default.
//!
//! loopvol implements CSI v1.13.0, but the clients it is deployed with are older: the released
//! csi-provisioner, csi-resizer, csi-snapshotter and livenessprobe vendor spec v1.12.0, the
//! kubelet v1.9.0, and the released conformance suite (csi-test v5.4) fails a spec on any
//! capability value its own switch does not name ("Unknown capability: N"). A capability value
//! a client cannot name is at best ignored and at worst fails the client, so by default loopvol
//! advertises only values csi-test v5.4 knows. The RPCs behind the opt-in values are served
//! either way; only the advertisement changes.

use clap::ValueEnum;

use crate::csi::controller_service_capability::rpc::Type as ControllerCap;
use crate::csi::node_service_capability::rpc::Type as NodeCap;

/// An opt-in group of capabilities (`loopvol serve --advertise-capabilities a,b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Extra {
    /// CSI v1.13's volume-health RPCs: controller GET_VOLUME_HEALTH and LIST_VOLUME_HEALTH,
    /// node GET_VOLUME_HEALTH and GET_STORAGE_HEALTH. Unknown to every v1.12 client.
    VolumeHealth,
    /// GET_SNAPSHOT (spec v1.12.0): in the spec the sidecars vendor, but csi-test v5.4's
    /// capability spec cannot name it.
    GetSnapshot,
}

/// The capability set a serving process advertises; `Default` is what released clients know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Advertised {
    pub volume_health: bool,
    pub get_snapshot: bool,
}

/// Controller capabilities every loopvol controller advertises: all are in spec v1.12.0 and
/// named by csi-test v5.4, and each is implemented completely.
const CONTROLLER_BASE: &[ControllerCap] = &[
    ControllerCap::CreateDeleteVolume,
    ControllerCap::ListVolumes,
    ControllerCap::GetCapacity,
    ControllerCap::GetVolume,
    ControllerCap::SingleNodeMultiWriter,
    ControllerCap::ExpandVolume,
    ControllerCap::CreateDeleteSnapshot,
    ControllerCap::ListSnapshots,
    ControllerCap::CloneVolume,
    ControllerCap::ModifyVolume,
];

const NODE_BASE: &[NodeCap] = &[
    NodeCap::StageUnstageVolume,
    NodeCap::GetVolumeStats,
    NodeCap::ExpandVolume,
    NodeCap::SingleNodeMultiWriter,
];

impl Advertised {
    pub fn new(extras: &[Extra]) -> Self {
        Advertised {
            volume_health: extras.contains(&Extra::VolumeHealth),
            get_snapshot: extras.contains(&Extra::GetSnapshot),
        }
    }

    pub fn controller(&self) -> Vec<ControllerCap> {
        let mut caps = CONTROLLER_BASE.to_vec();
        if self.get_snapshot {
            caps.push(ControllerCap::GetSnapshot);
        }
        if self.volume_health {
            caps.extend([
                ControllerCap::GetVolumeHealth,
                ControllerCap::ListVolumeHealth,
            ]);
        }
        caps
    }

    pub fn node(&self) -> Vec<NodeCap> {
        let mut caps = NODE_BASE.to_vec();
        if self.volume_health {
            caps.extend([NodeCap::GetVolumeHealth, NodeCap::GetStorageHealth]);
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values csi-test v5.4's ControllerGetCapabilities / NodeGetCapabilities specs name
    /// (pkg/sanity/controller.go and node.go at v5.4.0), as wire numbers of spec v1.12.0.
    const CSI_TEST_V5_4_CONTROLLER: &[i32] = &[1, 2, 3, 4, 5, 6, 8, 7, 9, 14, 10, 12, 11, 13];
    const CSI_TEST_V5_4_NODE: &[i32] = &[0, 1, 2, 3, 4, 5, 6];

    #[test]
    fn defaults_are_what_released_clients_can_name() {
        let d = Advertised::default();
        for c in d.controller() {
            assert!(CSI_TEST_V5_4_CONTROLLER.contains(&(c as i32)), "{c:?}");
        }
        for c in d.node() {
            assert!(CSI_TEST_V5_4_NODE.contains(&(c as i32)), "{c:?}");
        }
    }

    #[test]
    fn extras_add_exactly_their_values() {
        let all = Advertised::new(&[Extra::VolumeHealth, Extra::GetSnapshot]);
        let base = Advertised::default();
        let added: Vec<_> = all
            .controller()
            .into_iter()
            .filter(|c| !base.controller().contains(c))
            .collect();
        assert_eq!(
            added,
            [
                ControllerCap::GetSnapshot,
                ControllerCap::GetVolumeHealth,
                ControllerCap::ListVolumeHealth
            ]
        );
        assert_eq!(all.node().len(), base.node().len() + 2);
        assert!(all.node().contains(&NodeCap::GetStorageHealth));
    }
}
