//! Names and IDs. A volume's ID is derived from its CSI name and names its owning node:
//! `vol-<20 hex>@<node-id>`. Deriving it from the name makes name lookups O(1) (the record file is
//! named by the hash) and makes concurrent creates of one name collide on one file instead of
//! racing to create two. Carrying the node lets a router find the owning node from the ID alone.

use sha2::{Digest, Sha256};
use std::fmt;

use crate::PoolError;

/// The CSI spec caps names and IDs at 128 bytes.
pub const MAX_ID_LEN: usize = 128;
/// Node IDs must leave room for the `vol-<20 hex>@` prefix inside 128 bytes.
pub const MAX_NODE_ID_LEN: usize = 100;
const HEX_LEN: usize = 20;

/// What an ID designates; the prefix keeps volume and snapshot IDs apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Volume,
    Snapshot,
    /// A volume group snapshot (group_snapshot.rs).
    Group,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Volume => "vol",
            Kind::Snapshot => "snap",
            Kind::Group => "group",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeId {
    pub kind: Kind,
    /// 20 lowercase hex digits; the only part of an ID ever used in a path.
    pub hex: String,
    pub node: String,
}

/// The part of every ID (and of every file name in a pool, and of the driver's list tokens)
/// that names an object: exactly 20 lowercase hex digits.
pub fn is_hex_id(s: &str) -> bool {
    s.len() == HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl VolumeId {
    /// The ID a name gets on `node`.
    pub fn from_name(kind: Kind, name: &str, node: &str) -> Self {
        let digest = Sha256::digest(name.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        VolumeId {
            kind,
            hex: hex[..HEX_LEN].to_string(),
            node: node.to_string(),
        }
    }

    /// Parse an ID of ours; `None` means "well-formed string, but not an ID we ever issued".
    pub fn parse(kind: Kind, id: &str) -> Option<Self> {
        let rest = id.strip_prefix(kind.prefix())?.strip_prefix('-')?;
        let (hex, node) = rest.split_once('@')?;
        if !is_hex_id(hex) {
            return None;
        }
        validate_node_id(node).ok()?;
        Some(VolumeId {
            kind,
            hex: hex.to_string(),
            node: node.to_string(),
        })
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}@{}", self.kind.prefix(), self.hex, self.node)
    }
}

/// Reject strings that are dangerous anywhere near a path or a log line, with a message that
/// says exactly what is wrong. Shared by names and IDs.
fn check_safe(what: &str, s: &str) -> Result<(), PoolError> {
    let bad = |why: &str| Err(PoolError::InvalidArgument(format!("{what} {why}")));
    if s.is_empty() {
        return bad("is required and must not be empty");
    }
    if s.len() > MAX_ID_LEN {
        return bad(&format!(
            "is {} bytes long; the CSI limit is {MAX_ID_LEN}",
            s.len()
        ));
    }
    if s.contains('\0') {
        return bad("must not contain NUL bytes");
    }
    if s.contains('/') {
        return bad("must not contain '/'");
    }
    if s.contains("..") {
        return bad("must not contain '..'");
    }
    if s.chars().any(char::is_control) {
        return bad("must not contain control characters");
    }
    Ok(())
}

/// A CSI volume or snapshot name from CreateVolume/CreateSnapshot.
pub fn validate_name(s: &str) -> Result<(), PoolError> {
    check_safe("name", s)
}

/// A volume or snapshot ID from any request. Safe IDs that we did not issue are *not* an error
/// here: the spec wants NOT_FOUND (or OK for deletes) for those.
pub fn validate_id(what: &str, s: &str) -> Result<(), PoolError> {
    check_safe(what, s)
}

/// Node IDs end up in volume IDs and topology labels: a DNS-ish alphabet, bounded length.
pub fn validate_node_id(s: &str) -> Result<(), PoolError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    if s.is_empty() || s.len() > MAX_NODE_ID_LEN || !s.chars().all(ok_char) || s.contains("..") {
        return Err(PoolError::InvalidArgument(format!(
            "node id {s:?} must be 1-{MAX_NODE_ID_LEN} characters of [A-Za-z0-9._-]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_fit_the_spec_limit() {
        let node = "n".repeat(MAX_NODE_ID_LEN);
        let id = VolumeId::from_name(Kind::Volume, &"x".repeat(128), &node);
        let s = id.to_string();
        assert!(s.len() <= MAX_ID_LEN, "{} bytes", s.len());
        assert_eq!(VolumeId::parse(Kind::Volume, &s), Some(id.clone()));
        assert_eq!(VolumeId::parse(Kind::Snapshot, &s), None);
        let snap = VolumeId::from_name(Kind::Snapshot, "s", "node-1").to_string();
        assert!(snap.starts_with("snap-"));
    }

    #[test]
    fn same_name_same_id_different_name_different_id() {
        let a = VolumeId::from_name(Kind::Volume, "pvc-1", "n1");
        assert_eq!(a, VolumeId::from_name(Kind::Volume, "pvc-1", "n1"));
        assert_ne!(a.hex, VolumeId::from_name(Kind::Volume, "pvc-2", "n1").hex);
    }

    #[test]
    fn foreign_ids_do_not_parse() {
        for s in [
            "fake-vol-id",
            "vol-123@n",
            "vol-ZZZZZZZZZZZZZZZZZZZZ@n",
            "vol-0123456789abcdef0123@",
            "vol-0123456789abcdef0123@a b",
        ] {
            assert_eq!(VolumeId::parse(Kind::Volume, s), None, "{s}");
        }
    }

    #[test]
    fn unsafe_names_are_rejected_with_a_reason() {
        for (s, why) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("..", "'..'"),
            ("a\0b", "NUL"),
            ("a\nb", "control"),
        ] {
            let err = validate_name(s).unwrap_err().to_string();
            assert!(err.contains(why), "{s:?}: {err}");
        }
        assert!(validate_name(&"a".repeat(129)).is_err());
        assert!(validate_name(&"a".repeat(128)).is_ok());
        assert!(validate_node_id("node-1.example").is_ok());
        assert!(validate_node_id("bad/node").is_err());
        assert!(validate_node_id("").is_err());
    }
}
