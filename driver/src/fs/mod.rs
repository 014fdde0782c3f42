//! Filesystems on a block device: probing, mkfs, fsck and growing (`format`), freezing
//! (`freeze`), mounts (`mount`), and an ext4 journal the kernel aborted (`ext4_journal`). Nothing here knows what kind of block device it is given.

pub mod ext4_journal;
pub mod format;
pub mod freeze;
pub mod mount;
pub mod mount_options;
pub mod statmount;
