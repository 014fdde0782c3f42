//! Filesystems on a block device: probing, mkfs, fsck and growing (`format`), freezing
//! (`freeze`), mounts (`mount`), file encryption (`fscrypt`, and the
//! per-volume key: `fscrypt_key`), and an ext4 journal the kernel aborted (`ext4_journal`). Nothing here knows what kind of block device it is given.

pub mod ext4_journal;
pub mod format;
pub mod freeze;
pub mod fscrypt;
pub mod fscrypt_key;
pub mod mount;
pub mod mount_options;
pub mod statmount;
