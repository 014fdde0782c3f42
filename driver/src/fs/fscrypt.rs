//! ext4's native file encryption (fscrypt), the kernel side only: the five ioctls loopvol
//! uses, with the structures of `<linux/fscrypt.h>`. Keys go into the filesystem's own keyring
//! (not a process keyring), so they last as long as the mounted filesystem and outlive the node
//! plugin; a reboot (or the last unmount) forgets them.
//!
//! Policies are v2 (the key is named by an identifier the kernel computes from the key, so a
//! wrong key is told apart from the right one without decrypting anything): AES-256-XTS for
//! contents, AES-256-CTS for names, names padded to 32 bytes.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use zeroize::Zeroize;

/// Bytes of a key identifier (`FSCRYPT_KEY_IDENTIFIER_SIZE`).
pub const IDENTIFIER_BYTES: usize = 16;
/// Bytes of the raw key given to the kernel: AES-256-XTS needs 64.
pub const KEY_BYTES: usize = 64;

const KEY_SPEC_TYPE_IDENTIFIER: u32 = 2;
const POLICY_V2: u8 = 2;
const MODE_AES_256_XTS: u8 = 1;
const MODE_AES_256_CTS: u8 = 4;
const POLICY_FLAGS_PAD_32: u8 = 0x03;
const REMOVAL_FLAG_FILES_BUSY: u32 = 0x1;
const STATUS_ABSENT: u32 = 1;
const STATUS_PRESENT: u32 = 2;
const STATUS_INCOMPLETELY_REMOVED: u32 = 3;

/// The name of a key, computed by the kernel from the key (not secret).
pub type Identifier = [u8; IDENTIFIER_BYTES];

/// `struct fscrypt_key_specifier`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct KeySpec {
    kind: u32,
    reserved: u32,
    u: [u8; 32],
}

impl KeySpec {
    fn identifier(id: &Identifier) -> Self {
        let mut s = KeySpec {
            kind: KEY_SPEC_TYPE_IDENTIFIER,
            ..Default::default()
        };
        s.u[..IDENTIFIER_BYTES].copy_from_slice(id);
        s
    }
}

/// `struct fscrypt_add_key_arg` followed by its `raw[]` key bytes, which are wiped on drop.
#[repr(C)]
struct AddKeyArg {
    key_spec: KeySpec,
    raw_size: u32,
    key_id: u32,
    reserved: [u32; 8],
    raw: [u8; KEY_BYTES],
}

impl Drop for AddKeyArg {
    fn drop(&mut self) {
        self.raw.zeroize();
    }
}

/// `struct fscrypt_remove_key_arg`.
#[repr(C)]
#[derive(Default)]
struct RemoveKeyArg {
    key_spec: KeySpec,
    removal_status_flags: u32,
    reserved: [u32; 5],
}

/// `struct fscrypt_get_key_status_arg`.
#[repr(C)]
#[derive(Default)]
struct KeyStatusArg {
    key_spec: KeySpec,
    reserved: [u32; 6],
    status: u32,
    status_flags: u32,
    user_count: u32,
    out_reserved: [u32; 13],
}

/// `struct fscrypt_policy_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PolicyV2 {
    version: u8,
    contents_mode: u8,
    filenames_mode: u8,
    flags: u8,
    reserved: [u8; 4],
    identifier: Identifier,
}

/// `struct fscrypt_get_policy_ex_arg` with room for a v2 policy.
#[repr(C)]
#[derive(Default)]
struct GetPolicyExArg {
    policy_size: u64,
    policy: PolicyV2,
}

// The request numbers encode the sizes <linux/fscrypt.h> gives them, which are not always the
// size of the argument passed (ADD_KEY has a flexible array, SET_POLICY names the v1 struct,
// GET_POLICY_EX names `__u8[9]`), hence the `_bad` forms with the codes spelt out.
nix::ioctl_readwrite_bad!(
    ioc_add_key,
    nix::request_code_readwrite!(b'f', 23, 80),
    AddKeyArg
);
nix::ioctl_readwrite!(ioc_remove_key_all_users, b'f', 25, RemoveKeyArg);
nix::ioctl_readwrite!(ioc_key_status, b'f', 26, KeyStatusArg);
nix::ioctl_write_ptr_bad!(
    ioc_set_policy,
    nix::request_code_read!(b'f', 19, 12),
    PolicyV2
);
nix::ioctl_readwrite_bad!(
    ioc_get_policy_ex,
    nix::request_code_readwrite!(b'f', 22, 9),
    GetPolicyExArg
);

/// Add `key` to the keyring of the filesystem `mount_fd` is on (any directory of it), and
/// return its identifier. Adding a key that is already there is harmless.
pub fn add_key(mount_fd: BorrowedFd<'_>, key: &[u8; KEY_BYTES]) -> Result<Identifier, Errno> {
    let mut arg = Box::new(AddKeyArg {
        key_spec: KeySpec {
            kind: KEY_SPEC_TYPE_IDENTIFIER,
            ..Default::default()
        },
        raw_size: KEY_BYTES as u32,
        key_id: 0,
        reserved: [0; 8],
        raw: [0; KEY_BYTES],
    });
    arg.raw.copy_from_slice(key);
    // SAFETY: `arg` is a live, correctly laid out fscrypt_add_key_arg with `raw_size` bytes of
    // key after it; the kernel writes only the identifier back into it.
    unsafe { ioc_add_key(mount_fd.as_raw_fd(), &mut *arg) }?;
    let mut id = [0u8; IDENTIFIER_BYTES];
    id.copy_from_slice(&arg.key_spec.u[..IDENTIFIER_BYTES]);
    Ok(id)
}

/// What removing a key left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// Gone: nothing encrypted under it can be read until it is added again.
    Fully,
    /// The key is wiped, but files still open keep their per-file keys (and so stay readable
    /// to whoever holds them open) until they are closed.
    FilesBusy,
    /// It was not there.
    Absent,
}

/// Remove the key `id` for every user from the filesystem `mount_fd` is on.
pub fn remove_key(mount_fd: BorrowedFd<'_>, id: &Identifier) -> Result<Removed, Errno> {
    let mut arg = RemoveKeyArg {
        key_spec: KeySpec::identifier(id),
        ..Default::default()
    };
    // SAFETY: a correctly laid out fscrypt_remove_key_arg the kernel reads and writes.
    match unsafe { ioc_remove_key_all_users(mount_fd.as_raw_fd(), &mut arg) } {
        Ok(_) if arg.removal_status_flags & REMOVAL_FLAG_FILES_BUSY != 0 => Ok(Removed::FilesBusy),
        Ok(_) => Ok(Removed::Fully),
        Err(Errno::ENOKEY) => Ok(Removed::Absent),
        Err(e) => Err(e),
    }
}

/// Whether a filesystem's keyring holds a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Absent,
    Present,
    IncompletelyRemoved,
}

/// The status of key `id` in the keyring of the filesystem `mount_fd` is on.
pub fn key_status(mount_fd: BorrowedFd<'_>, id: &Identifier) -> Result<KeyStatus, Errno> {
    let mut arg = KeyStatusArg {
        key_spec: KeySpec::identifier(id),
        ..Default::default()
    };
    // SAFETY: a correctly laid out fscrypt_get_key_status_arg the kernel reads and writes.
    unsafe { ioc_key_status(mount_fd.as_raw_fd(), &mut arg) }?;
    match arg.status {
        STATUS_ABSENT => Ok(KeyStatus::Absent),
        STATUS_PRESENT => Ok(KeyStatus::Present),
        STATUS_INCOMPLETELY_REMOVED => Ok(KeyStatus::IncompletelyRemoved),
        _ => Err(Errno::EPROTO),
    }
}

/// Give the empty directory `dir_fd` loopvol's v2 policy under key `id` (which must have been
/// added): everything created in it from then on is encrypted.
pub fn set_policy(dir_fd: BorrowedFd<'_>, id: &Identifier) -> Result<(), Errno> {
    let policy = PolicyV2 {
        version: POLICY_V2,
        contents_mode: MODE_AES_256_XTS,
        filenames_mode: MODE_AES_256_CTS,
        flags: POLICY_FLAGS_PAD_32,
        reserved: [0; 4],
        identifier: *id,
    };
    // SAFETY: the kernel reads a fscrypt_policy_v2 from a live struct.
    unsafe { ioc_set_policy(dir_fd.as_raw_fd(), &policy) }.map(drop)
}

/// The key identifier of the directory's v2 policy; `None` when the directory has no policy.
/// A v1 policy (or an unknown version) is `EINVAL`: loopvol never sets one.
pub fn policy_identifier(dir_fd: BorrowedFd<'_>) -> Result<Option<Identifier>, Errno> {
    let mut arg = GetPolicyExArg {
        policy_size: std::mem::size_of::<PolicyV2>() as u64,
        ..Default::default()
    };
    // SAFETY: a correctly laid out fscrypt_get_policy_ex_arg with room for a v2 policy.
    match unsafe { ioc_get_policy_ex(dir_fd.as_raw_fd(), &mut arg) } {
        Ok(_) if arg.policy.version == POLICY_V2 => Ok(Some(arg.policy.identifier)),
        Ok(_) => Err(Errno::EINVAL),
        Err(Errno::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// For logs and errors: an identifier in hex (it names a key, it is not one).
pub fn identifier_hex(id: &Identifier) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_have_the_kernels_sizes() {
        assert_eq!(std::mem::size_of::<KeySpec>(), 40);
        assert_eq!(std::mem::size_of::<AddKeyArg>(), 80 + KEY_BYTES);
        assert_eq!(std::mem::size_of::<RemoveKeyArg>(), 64);
        assert_eq!(std::mem::size_of::<KeyStatusArg>(), 128);
        assert_eq!(std::mem::size_of::<PolicyV2>(), 24);
        // The request codes platform-facts.md gives for this kernel.
        assert_eq!(
            nix::request_code_readwrite!(b'f', 23, 80) as u32,
            0xC050_6617
        );
        assert_eq!(nix::request_code_read!(b'f', 19, 12) as u32, 0x800C_6613);
    }
}
