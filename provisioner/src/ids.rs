//! Names and IDs. A volume's ID is derived from its CSI name and names its owning node:
//! `vol-<20 hex>@<node-id>`. Deriving it from the name makes name lookups O(1) (the record file is
//! named by the hash) and makes concurrent creates of one name collide on one file instead of
//! racing to create two. Carrying the node lets a router find the owning node from the ID alone.
//!
//! A volume of a named pool `P` (not `default`) is `vol-<20 hex>~P@<node-id>`: `~` is outside
//! both the hex and the pool-name alphabets, so the parse is unambiguous, and the node finds the
//! owning pool from the ID alone. Default-pool IDs keep the original form, so IDs issued before
//! pools had names stay valid.

use sha2::{Digest, Sha256};
use std::fmt;

use crate::PoolError;

/// The CSI spec caps names and IDs at 128 bytes.
pub const MAX_ID_LEN: usize = 128;
/// Node IDs must leave room for the `vol-<20 hex>@` prefix inside 128 bytes.
pub const MAX_NODE_ID_LEN: usize = 100;
const HEX_LEN: usize = 20;
/// The pool `--pool-dir` serves; its IDs carry no pool part.
pub const DEFAULT_POOL: &str = "default";
/// Pool names are DNS labels of at most this many bytes, so they fit in IDs, object names and
/// metric labels unescaped.
pub const MAX_POOL_NAME_LEN: usize = 16;

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
    /// The owning pool when it is not [`DEFAULT_POOL`].
    pub pool: Option<String>,
    pub node: String,
}

/// The part of every ID (and of every file name in a pool, and of the driver's list tokens)
/// that names an object: exactly 20 lowercase hex digits.
pub fn is_hex_id(s: &str) -> bool {
    s.len() == HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl VolumeId {
    /// The ID a name gets in the default pool of `node`.
    pub fn from_name(kind: Kind, name: &str, node: &str) -> Self {
        Self::from_name_in(kind, name, DEFAULT_POOL, node)
    }

    /// The ID a name gets in pool `pool` of `node`. The hex derives from the name alone, so a
    /// name has one hex on every pool (CreateVolume relies on it to find a name in any pool).
    pub fn from_name_in(kind: Kind, name: &str, pool: &str, node: &str) -> Self {
        let digest = Sha256::digest(name.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        VolumeId {
            kind,
            hex: hex[..HEX_LEN].to_string(),
            pool: (pool != DEFAULT_POOL).then(|| pool.to_string()),
            node: node.to_string(),
        }
    }

    /// The name of the owning pool.
    pub fn pool_name(&self) -> &str {
        self.pool.as_deref().unwrap_or(DEFAULT_POOL)
    }

    /// Parse an ID of ours; `None` means "well-formed string, but not an ID we ever issued".
    pub fn parse(kind: Kind, id: &str) -> Option<Self> {
        let rest = id.strip_prefix(kind.prefix())?.strip_prefix('-')?;
        let (object, node) = rest.split_once('@')?;
        let (hex, pool) = match object.split_once('~') {
            // The default pool has only the short form: one object, one ID.
            Some((hex, pool)) if pool != DEFAULT_POOL && validate_pool_name(pool).is_ok() => {
                (hex, Some(pool.to_string()))
            }
            Some(_) => return None,
            None => (object, None),
        };
        if !is_hex_id(hex) {
            return None;
        }
        validate_node_id(node).ok()?;
        Some(VolumeId {
            kind,
            hex: hex.to_string(),
            pool,
            node: node.to_string(),
        })
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pool {
            None => write!(f, "{}-{}@{}", self.kind.prefix(), self.hex, self.node),
            Some(p) => write!(f, "{}-{}~{p}@{}", self.kind.prefix(), self.hex, self.node),
        }
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

/// Pool names: `[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?`, a DNS label of at most 16 bytes.
pub fn validate_pool_name(s: &str) -> Result<(), PoolError> {
    let inner = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok = !s.is_empty()
        && s.len() <= MAX_POOL_NAME_LEN
        && s.bytes().all(|b| inner(b) || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        return Ok(());
    }
    Err(PoolError::InvalidArgument(format!(
        "pool name {s:?} must be 1-{MAX_POOL_NAME_LEN} characters of [a-z0-9-], \
         starting and ending with a letter or digit"
    )))
}

/// A valid pool name, kept inline so the parameters holding it stay `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolName {
    len: u8,
    bytes: [u8; MAX_POOL_NAME_LEN],
}

impl PoolName {
    pub fn new(s: &str) -> Result<Self, PoolError> {
        validate_pool_name(s)?;
        let mut bytes = [0; MAX_POOL_NAME_LEN];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Ok(PoolName {
            len: s.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).expect("validated ASCII")
    }
}

impl Default for PoolName {
    fn default() -> Self {
        PoolName::new(DEFAULT_POOL).expect("the default name is valid")
    }
}

impl fmt::Debug for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest ID any object of pool `pool` gets on `node` (a group ID has the longest prefix).
pub fn longest_id_len(pool: &str, node: &str) -> usize {
    let pool_part = if pool == DEFAULT_POOL {
        0
    } else {
        1 + pool.len()
    };
    "group-".len() + HEX_LEN + pool_part + 1 + node.len()
}

/// Can pool `pool` serve on `node` without an ID over the CSI limit? The error spells out the
/// arithmetic, since the fix is a shorter node ID or pool name.
pub fn check_fits(pool: &str, node: &str) -> Result<(), PoolError> {
    let len = longest_id_len(pool, node);
    if len <= MAX_ID_LEN {
        return Ok(());
    }
    Err(PoolError::InvalidArgument(format!(
        "pool {pool:?} cannot serve on node {node:?}: its longest IDs would be \
         \"group-\" (6) + 20 hex + \"~{pool}\" ({}) + \"@\" (1) + node ID ({}) = {len} bytes, over \
         the CSI limit of {MAX_ID_LEN}; use a node ID of at most {} bytes or a shorter pool name",
        1 + pool.len(),
        node.len(),
        node.len() - (len - MAX_ID_LEN),
    )))
}

/// The position a list page ends at: `<hex>` in the default pool, `<pool>:<hex>` in a named
/// one (so tokens issued before pools had names stay valid). `None`: not a token of ours.
pub fn parse_page_token(token: &str) -> Option<(&str, &str)> {
    let (pool, hex) = match token.split_once(':') {
        Some((p, h)) if p != DEFAULT_POOL && validate_pool_name(p).is_ok() => (p, h),
        Some(_) => return None,
        None => (DEFAULT_POOL, token),
    };
    is_hex_id(hex).then_some((pool, hex))
}

/// The token [`parse_page_token`] reads back.
pub fn page_token(pool: &str, hex: &str) -> String {
    if pool == DEFAULT_POOL {
        hex.to_string()
    } else {
        format!("{pool}:{hex}")
    }
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
            "vol-0123456789abcdef0123~@n",
            "vol-0123456789abcdef0123~default@n",
            "vol-0123456789abcdef0123~Fast@n",
            "vol-0123456789abcdef0123~-fast@n",
            "vol-0123456789abcdef0123~fast-@n",
            "vol-0123456789abcdef0123~a~b@n",
            "vol-0123456789abcdef0123~abcdefghijklmnopq@n",
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

    #[test]
    fn named_pool_ids_round_trip_and_default_ids_are_unchanged() {
        let d = VolumeId::from_name(Kind::Volume, "pvc-1", "n1");
        let f = VolumeId::from_name_in(Kind::Volume, "pvc-1", "fast", "n1");
        assert_eq!(d.to_string(), format!("vol-{}@n1", d.hex));
        assert_eq!(f.to_string(), format!("vol-{}~fast@n1", d.hex));
        assert_eq!(f.hex, d.hex, "a name has one hex on every pool");
        assert_eq!(
            VolumeId::from_name_in(Kind::Volume, "pvc-1", "default", "n1"),
            d
        );
        assert_eq!(
            VolumeId::parse(Kind::Volume, &f.to_string()),
            Some(f.clone())
        );
        assert_eq!(f.pool_name(), "fast");
        assert_eq!(d.pool_name(), DEFAULT_POOL);
        let g = VolumeId::from_name_in(Kind::Group, "g", "a-0", "n.1_x");
        assert_eq!(g.to_string(), format!("group-{}~a-0@n.1_x", g.hex));
        assert_eq!(VolumeId::parse(Kind::Group, &g.to_string()), Some(g));
    }

    #[test]
    fn pool_names_are_short_dns_labels() {
        for ok in ["a", "0", "fast", "nvme-0", "a-b-c", &"x".repeat(16)] {
            assert!(validate_pool_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Fast",
            "a_b",
            "a.b",
            "a~b",
            "a:b",
            &"x".repeat(17),
        ] {
            assert!(validate_pool_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_named_pool_needs_room_in_the_id() {
        let longest = |pool: &str, node_len: usize| {
            VolumeId::from_name_in(Kind::Group, "g", pool, &"n".repeat(node_len))
                .to_string()
                .len()
        };
        let pool = "x".repeat(16);
        // 6 + 20 + 17 + 1 + 84 = 128: the longest node ID a 16-byte pool name allows.
        assert!(check_fits(&pool, &"n".repeat(84)).is_ok());
        assert_eq!(longest(&pool, 84), MAX_ID_LEN);
        let err = check_fits(&pool, &"n".repeat(85)).unwrap_err().to_string();
        assert!(
            err.contains("= 129 bytes") && err.contains("at most 84 bytes"),
            "{err}"
        );
        assert!(check_fits(DEFAULT_POOL, &"n".repeat(MAX_NODE_ID_LEN)).is_ok());
        assert!(longest(DEFAULT_POOL, MAX_NODE_ID_LEN) <= MAX_ID_LEN);
    }

    #[test]
    fn page_tokens_keep_the_default_pool_form() {
        let hex = "0123456789abcdef0123";
        assert_eq!(page_token(DEFAULT_POOL, hex), hex);
        assert_eq!(parse_page_token(hex), Some((DEFAULT_POOL, hex)));
        let t = page_token("fast", hex);
        assert_eq!(t, format!("fast:{hex}"));
        assert_eq!(parse_page_token(&t), Some(("fast", hex)));
        for bad in [
            "x",
            "default:0123456789abcdef0123",
            "Fast:0123456789abcdef0123",
            "fast:",
        ] {
            assert_eq!(parse_page_token(bad), None, "{bad}");
        }
    }
}
