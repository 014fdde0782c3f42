//! What a validated volume capability asks the node engine for (the CSI edge's
//! `capability::check` makes these from the request).

use crate::csi::volume_capability::access_mode::Mode;
use provisioner::FsType;

/// What one capability asks for, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Mount {
        fs_type: Option<FsType>,
        flags: Vec<String>,
    },
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub access: Access,
    pub mode: Mode,
}

impl Checked {
    /// Only a reader-only mode stages a volume read-only.
    pub fn read_only(&self) -> bool {
        self.mode == Mode::SingleNodeReaderOnly
    }
}
