//! The running kernel's version, which decides the filesystem features mkfs may enable, and
//! the capabilities this process holds, which decide what the kernel lets it do.

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

/// CAP_SYS_RESOURCE (linux/capability.h): among others, what EXT4_IOC_RESIZE_FS demands, so
/// what online growth of a mounted ext4 needs.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process holds capability `bit` in its effective set (`CapEff` of
/// /proc/self/status); `None` when that cannot be read.
pub fn has_capability(bit: u32) -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    effective_has(&status, bit)
}

/// `has_capability` over a given /proc/<pid>/status text.
fn effective_has(status: &str, bit: u32) -> Option<bool> {
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
    Some(mask & (1 << bit) != 0)
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

    #[test]
    fn effective_capabilities_parse() {
        let with = "Name:\tloopvol\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        let without = "CapEff:\t000001fffeffffff\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(effective_has(with, CAP_SYS_RESOURCE), Some(true));
        assert_eq!(effective_has(without, CAP_SYS_RESOURCE), Some(false));
        assert_eq!(effective_has(without, 23), Some(true));
        assert_eq!(effective_has("Name:\tx\n", CAP_SYS_RESOURCE), None);
        assert!(has_capability(CAP_SYS_RESOURCE).is_some());
    }
}
