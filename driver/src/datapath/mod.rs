//! The block data path: how a volume's image becomes a block device on this node.

pub mod loopdev;
