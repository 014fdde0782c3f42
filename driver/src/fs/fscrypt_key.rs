//! The key of one encrypted volume (design §3): the node-stage Secret's `key` entry (64 hex
//! characters, 256 bits) is a master secret, and each volume's fscrypt key is
//! `HKDF-SHA256(master, salt = the record's key_salt, info = "loopvol fscrypt v1")`, 64 bytes.
//! Derived, not wrapped: the pool holds nothing secret, and a clone or restore (ciphertext plus
//! its source's salt) opens with the same Secret.
//!
//! Key bytes only ever sit in buffers wiped on drop, and nothing here formats them: errors say
//! what is wrong with the Secret's shape, never what it holds.

use zeroize::Zeroizing;

use super::fscrypt::KEY_BYTES;

/// The Secret's entry that holds the key.
pub const SECRET_ENTRY: &str = "key";
/// Hex characters of the Secret's key.
pub const HEX_CHARS: usize = 64;
const INFO: &[u8] = b"loopvol fscrypt v1";

/// Why a Secret's key cannot be used. The messages describe the shape only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the node-stage Secret has no entry {SECRET_ENTRY:?} (set \
         csi.storage.k8s.io/node-stage-secret-name and -namespace in the StorageClass, and put \
         the key under {SECRET_ENTRY:?})"
    )]
    Missing,
    #[error(
        "the node-stage Secret's {SECRET_ENTRY:?} is {0} characters long; it must be exactly \
         {HEX_CHARS} hex characters (256 bits)"
    )]
    Length(usize),
    #[error(
        "the node-stage Secret's {SECRET_ENTRY:?} has a character that is not a hex digit; it \
         must be exactly {HEX_CHARS} hex characters (256 bits)"
    )]
    NotHex,
}

/// The Secret's 32 key bytes.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// Parse the Secret's entry: exactly 64 hex characters, either case.
    pub fn parse(entry: Option<&str>) -> Result<Self, KeyError> {
        let entry = entry.ok_or(KeyError::Missing)?;
        let s = entry.as_bytes();
        if s.len() != HEX_CHARS {
            return Err(KeyError::Length(entry.chars().count()));
        }
        let mut out = Zeroizing::new([0u8; 32]);
        for (i, pair) in s.chunks(2).enumerate() {
            let (Some(hi), Some(lo)) = (nibble(pair[0]), nibble(pair[1])) else {
                return Err(KeyError::NotHex);
            };
            out[i] = (hi << 4) | lo;
        }
        Ok(MasterKey(out))
    }

    /// The fscrypt key of the volume whose record has salt `salt`.
    pub fn derive(&self, salt: &[u8]) -> VolumeKey {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), &self.0[..]);
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        hk.expand(INFO, &mut key[..])
            .expect("64 bytes is within HKDF-SHA256's output limit");
        VolumeKey(key)
    }
}

/// One volume's fscrypt key, wiped on drop.
pub struct VolumeKey(Zeroizing<[u8; KEY_BYTES]>);

impl VolumeKey {
    pub fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }
}

/// Nothing prints a key, even by accident through `{:?}`.
impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeKey(..)")
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";

    #[test]
    fn only_64_hex_characters_are_a_key() {
        assert!(MasterKey::parse(Some(HEX)).is_ok());
        assert_eq!(MasterKey::parse(None).unwrap_err(), KeyError::Missing);
        assert_eq!(
            MasterKey::parse(Some(&HEX[..63])).unwrap_err(),
            KeyError::Length(63)
        );
        assert_eq!(
            MasterKey::parse(Some(&format!("{HEX}0"))).unwrap_err(),
            KeyError::Length(65)
        );
        let not_hex = format!("{}g", &HEX[..63]);
        assert_eq!(
            MasterKey::parse(Some(&not_hex)).unwrap_err(),
            KeyError::NotHex
        );
        // Multi-byte characters cannot pass as 64 hex characters, or panic the parser.
        let wide = "é".repeat(32);
        assert_eq!(wide.len(), 64);
        assert_eq!(MasterKey::parse(Some(&wide)).unwrap_err(), KeyError::NotHex);
        assert_eq!(
            MasterKey::parse(Some(&"0".repeat(1 << 20))).unwrap_err(),
            KeyError::Length(1 << 20)
        );
    }

    #[test]
    fn keys_are_per_salt_and_per_secret_and_never_printed() {
        let m = MasterKey::parse(Some(HEX)).unwrap();
        let a = m.derive(&[1; 16]);
        assert_eq!(a.bytes(), m.derive(&[1; 16]).bytes());
        assert_ne!(a.bytes(), m.derive(&[2; 16]).bytes());
        let other = MasterKey::parse(Some(&HEX.replace('0', "1"))).unwrap();
        assert_ne!(a.bytes(), other.derive(&[1; 16]).bytes());
        // Case does not change the key (hex is case-insensitive).
        let lower = MasterKey::parse(Some(&HEX.to_lowercase())).unwrap();
        assert_eq!(a.bytes(), lower.derive(&[1; 16]).bytes());
        assert_eq!(format!("{m:?} {a:?}"), "MasterKey(..) VolumeKey(..)");
        for e in [KeyError::Missing, KeyError::Length(63), KeyError::NotHex] {
            assert!(!e.to_string().contains("0011"), "{e}");
        }
    }

    /// RFC 5869 test case 1 through the same crate call, so the derivation is the standard one.
    #[test]
    fn hkdf_is_rfc5869() {
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let mut okm = [0u8; 42];
        hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), &ikm)
            .expand(&info, &mut okm)
            .unwrap();
        assert_eq!(okm[..4], [0x3c, 0xb2, 0x5f, 0x25]);
    }
}
