//! The running kernel's version, which decides the filesystem features mkfs may enable.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// Parse the leading `major.minor` of strings like `6.18.44-fc-v669` or `mke2fs 1.47.0 (...)`.
pub fn parse_version(s: &str) -> Option<Version> {
    s.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|t| t.contains('.'))
        .find_map(|t| {
            let mut it = t.split('.');
            let major = it.next()?.parse().ok()?;
            let minor = it.next()?.parse().ok()?;
            Some(Version(major, minor))
        })
}

/// The running kernel, from uname(2).
pub fn running() -> Version {
    nix::sys::utsname::uname()
        .ok()
        .and_then(|u| parse_version(&u.release().to_string_lossy()))
        .unwrap_or(Version(0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("6.18.44-fc-v669"), Some(Version(6, 18)));
        assert_eq!(
            parse_version("mke2fs 1.47.0 (5-Feb-2023)"),
            Some(Version(1, 47))
        );
        assert_eq!(parse_version("mkfs.xfs version 6.1.0"), Some(Version(6, 1)));
        assert_eq!(
            parse_version("mkfs.btrfs, part of btrfs-progs v6.2"),
            Some(Version(6, 2))
        );
        assert_eq!(parse_version("nothing"), None);
        assert!(Version(5, 10) < Version(5, 15));
        assert!(running() > Version(3, 0));
    }
}
