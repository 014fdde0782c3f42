//! Filesystems on a block device: probing, mkfs, fsck and growing (`format`), freezing
//! (`freeze`), and mounts (`mount`). Nothing here knows what kind of block device it is given.

pub mod format;
pub mod freeze;
pub mod mount;
pub mod mount_options;
pub mod statmount;
