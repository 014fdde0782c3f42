//! Encrypted volumes on the node (design §3): the pod is given the directory [`DATA_DIR`] of the
//! staged filesystem, which carries a v2 fscrypt policy set while it was empty, never the
//! filesystem's root. Stage adds the volume's key (derived from the node-stage Secret and the
//! record's salt) to the filesystem and checks it is the key the policy names; unstage removes
//! it again before unmounting.
//!
//! The kernel keeps added keys with the mounted filesystem, so a restarted node plugin finds
//! them still there; every stage adds the key again anyway (harmless when present), which is
//! what brings it back once it is needed and gone.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use provisioner::encryption::Encryption;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::fs::fscrypt::{self, Identifier, Removed};
use crate::fs::fscrypt_key::MasterKey;
pub use crate::fs::fscrypt_key::SECRET_ENTRY;

/// The directory of an encrypted volume's filesystem that pods see.
pub const DATA_DIR: &str = "data";

/// The node-stage Secret's key entry, taken out of the request and wiped when dropped.
pub type SecretKey = Option<Zeroizing<String>>;

/// What a pod is given of a volume staged at `staging`: the staging mount itself, or for an
/// encrypted volume its [`DATA_DIR`].
pub fn pod_dir(staging: &Path, encryption: Option<&Encryption>) -> PathBuf {
    match encryption {
        Some(_) => staging.join(DATA_DIR),
        None => staging.to_path_buf(),
    }
}

/// Parse the Secret's key before anything is attached or mounted: a missing or malformed key
/// is FAILED_PRECONDITION (the request is well formed; the Secret the StorageClass names is
/// not usable), and the message says what is wrong with its shape only.
pub fn master_key(id: &str, key: &SecretKey) -> Result<MasterKey> {
    MasterKey::parse(key.as_ref().map(|k| k.as_str()))
        .map_err(|e| Error::FailedPrecondition(format!("volume {id} is encrypted (fscrypt): {e}")))
}

/// Make the encrypted volume mounted at `staging` usable: add its key, then check (or, on a
/// new filesystem, set) the policy of [`DATA_DIR`]. A key that is not the policy's is removed
/// again and refused with FAILED_PRECONDITION; the caller undoes its mount.
pub fn unlock(
    id: &str,
    staging: &Path,
    enc: &Encryption,
    master: &MasterKey,
    read_only: bool,
) -> Result<Identifier> {
    let salt = enc.salt_bytes().ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "volume {id}'s record has a malformed key_salt; its key cannot be derived"
        ))
    })?;
    let root = open_dir_at(staging)?;
    let key = master.derive(&salt);
    let added = fscrypt::add_key(root.as_fd(), key.bytes()).map_err(|e| match e {
        Errno::EOPNOTSUPP | Errno::ENOTTY => Error::FailedPrecondition(format!(
            "volume {id} is encrypted but its filesystem has no encryption support (made \
             without -O encrypt?)"
        )),
        e => Error::io(
            format!("add the encryption key of volume {id} (FS_IOC_ADD_ENCRYPTION_KEY)"),
            e,
        ),
    })?;
    drop(key);
    let refuse = |why: String| -> Error {
        forget(&root, &added);
        Error::FailedPrecondition(format!("volume {id}: {why}"))
    };
    let data = match open_data(&root) {
        Ok(d) => d,
        Err(Errno::ENOENT) if read_only => {
            return Err(refuse(format!(
                "{DATA_DIR}/ is missing and a read-only stage cannot make it"
            )))
        }
        Err(Errno::ENOENT) => {
            match nix::sys::stat::mkdirat(&root, DATA_DIR, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(refuse(format!("cannot make {DATA_DIR}/: {e}"))),
            }
            open_data(&root).map_err(|e| refuse(format!("cannot open {DATA_DIR}/: {e}")))?
        }
        // A symlink (ELOOP) or a file (ENOTDIR) where the directory belongs: never followed.
        Err(e) => return Err(refuse(format!("cannot open {DATA_DIR}/: {e}"))),
    };
    match fscrypt::policy_identifier(data.as_fd()) {
        Ok(Some(policy)) if policy == added => Ok(added),
        Ok(Some(policy)) => Err(refuse(format!(
            "the node-stage Secret's key is not this volume's key (the key's identifier {} \
             is not the {} its encryption policy names); use the Secret it was created with",
            fscrypt::identifier_hex(&added),
            fscrypt::identifier_hex(&policy)
        ))),
        // A new filesystem, or a stage cut short between mkdir and the policy: the directory
        // must still be empty, or its content would stay in clear text.
        Ok(None) if !read_only && is_empty(&data) => {
            fscrypt::set_policy(data.as_fd(), &added).map_err(|e| {
                refuse(format!(
                    "cannot set the encryption policy of {DATA_DIR}/: {e}"
                ))
            })?;
            tracing::info!(volume_id = id, key_identifier = %fscrypt::identifier_hex(&added),
                "encryption policy set on the volume's data directory");
            Ok(added)
        }
        Ok(None) => Err(refuse(format!(
            "{DATA_DIR}/ has no encryption policy and is not empty (or the stage is \
             read-only); not giving its content to a pod as an encrypted volume"
        ))),
        Err(e) => Err(refuse(format!(
            "cannot read the encryption policy of {DATA_DIR}/: {e}"
        ))),
    }
}

/// Remove the volume's key from the filesystem mounted at `staging` (its identifier is read
/// from the policy, so no Secret is needed). `None` when there was nothing to remove.
pub fn lock(id: &str, staging: &Path) -> Result<Option<Removed>> {
    let root = open_dir_at(staging)?;
    let Ok(data) = open_data(&root) else {
        return Ok(None);
    };
    let Some(key) = fscrypt::policy_identifier(data.as_fd())
        .map_err(|e| Error::io(format!("read the encryption policy of volume {id}"), e))?
    else {
        return Ok(None);
    };
    drop(data);
    let removed = fscrypt::remove_key(root.as_fd(), &key).map_err(|e| {
        Error::io(
            format!("remove the encryption key of volume {id} (FS_IOC_REMOVE_ENCRYPTION_KEY)"),
            e,
        )
    })?;
    match removed {
        Removed::FilesBusy => {
            tracing::warn!(volume_id = id, key_identifier = %fscrypt::identifier_hex(&key),
            "encryption key removed, but files of the volume are still open: they stay readable \
             to whoever holds them until closed (the unmount that follows frees them)")
        }
        r => tracing::info!(volume_id = id, key_identifier = %fscrypt::identifier_hex(&key),
            outcome = ?r, "encryption key removed from the filesystem"),
    }
    Ok(Some(removed))
}

/// Take back a key this stage added and must not leave behind.
fn forget(root: &OwnedFd, key: &Identifier) {
    if let Err(e) = fscrypt::remove_key(root.as_fd(), key) {
        tracing::error!(error = %e, "could not remove a refused encryption key");
    }
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// The staging mount's root (the staging path was confined by the edge and mounted by us).
fn open_dir_at(path: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(path, DIR_FLAGS, Mode::empty())
        .map_err(|e| Error::io(format!("open {}", path.display()), e))
}

/// `<root>/data`, never through a symlink (the filesystem's content is the tenant's).
fn open_data(root: &OwnedFd) -> std::result::Result<OwnedFd, Errno> {
    openat(root, DATA_DIR, DIR_FLAGS, Mode::empty())
}

fn is_empty(dir: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .is_ok_and(|mut entries| entries.next().is_none())
}
