//! Encryption at rest as the records see it (design §3, docs/design-pools-transfer.md): which
//! method a volume uses and the per-volume salt its key is derived with. Nothing secret lives
//! here: the node derives each volume's key from the node-stage Secret's key and this salt, so a
//! record (or a backup of the pool) holds no key material at all.
//!
//! A clone or restore copies ciphertext, so it takes its source's [`Encryption`] unchanged (the
//! same salt, so the same Secret opens it); a snapshot keeps its volume's, so a restore works
//! after the volume is gone.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::PoolError;

/// The StorageClass parameter asking for an encrypted volume.
pub const PARAM_ENCRYPTION: &str = "encryption";
/// Bytes of a volume's key salt.
pub const SALT_BYTES: usize = 16;

/// How a volume is encrypted. One method today: ext4's native file encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// fscrypt v2 policy on the directory given to the pod (AES-256-XTS contents,
    /// AES-256-CTS names); ext4 only.
    Fscrypt,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Fscrypt => "fscrypt",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, PoolError> {
        match s {
            "fscrypt" => Ok(Method::Fscrypt),
            _ => Err(PoolError::InvalidArgument(format!(
                "parameter {PARAM_ENCRYPTION}: {s:?} is not a supported method; loopvol \
                 supports \"fscrypt\" (ext4 filesystem volumes)"
            ))),
        }
    }
}

/// What a volume's (or snapshot's) record says about its encryption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    pub method: Method,
    /// [`SALT_BYTES`] random bytes in lowercase hex, made when the volume was created blank
    /// and carried unchanged by every copy of its content.
    pub key_salt: String,
}

impl Encryption {
    /// A new volume's: a fresh random salt from the kernel's generator.
    pub fn new(method: Method) -> Result<Self, PoolError> {
        let mut salt = [0u8; SALT_BYTES];
        getrandom::fill(&mut salt).map_err(|e| {
            PoolError::io(
                "read random bytes for a key salt",
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(Encryption {
            method,
            key_salt: salt.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    /// The salt's bytes; `None` when the record's salt is malformed (edited by hand).
    pub fn salt_bytes(&self) -> Option<[u8; SALT_BYTES]> {
        let s = self.key_salt.as_bytes();
        if s.len() != 2 * SALT_BYTES {
            return None;
        }
        let mut out = [0u8; SALT_BYTES];
        for (i, pair) in s.chunks(2).enumerate() {
            let hex = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salts_are_random_and_round_trip() {
        let a = Encryption::new(Method::Fscrypt).unwrap();
        let b = Encryption::new(Method::Fscrypt).unwrap();
        assert_ne!(a.key_salt, b.key_salt);
        assert_eq!(a.key_salt.len(), 32);
        let bytes = a.salt_bytes().unwrap();
        let back: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(back, a.key_salt);
        let bad = Encryption {
            method: Method::Fscrypt,
            key_salt: "zz".repeat(16),
        };
        assert_eq!(bad.salt_bytes(), None);
    }

    #[test]
    fn only_fscrypt_is_a_method() {
        assert_eq!("fscrypt".parse::<Method>().unwrap(), Method::Fscrypt);
        let e = "luks".parse::<Method>().unwrap_err();
        assert!(matches!(e, PoolError::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("luks"), "{e}");
    }
}
