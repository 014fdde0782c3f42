//! Mount options a capability may carry, in one table: for each, what it does to mount(2) (a
//! flag bit) or which filesystems take it in their data string. Validation (`check_mount_flag`,
//! `check_flags_for`) and mounting (`split_flags`) read the same table, so an option cannot be
//! allowed in one place and unknown in another.

use nix::mount::MsFlags;
use provisioner::FsType;

use crate::error::{Error, Result};

/// What an option means.
#[derive(Clone, Copy)]
enum Meaning {
    /// A mount(2) flag bit set or cleared.
    Set(MsFlags),
    Clear(MsFlags),
    /// A filesystem option (the data string), understood by these filesystems.
    Data(&'static [FsType]),
}

use FsType::{Btrfs, Ext4, Xfs};
use Meaning::{Clear, Data, Set};

const ALL: &[FsType] = &[Ext4, Xfs, Btrfs];

/// Mount flags are passed to mount(2); only this reviewed list is accepted. Options that change
/// what mount(2) does (bind, move, remount, propagation), that enable device files or set-uid
/// binaries, or that would smuggle extra options through commas are not in it.
const OPTIONS: &[(&str, Meaning)] = &[
    ("ro", Set(MsFlags::MS_RDONLY)),
    ("rw", Clear(MsFlags::MS_RDONLY)),
    ("noatime", Set(MsFlags::MS_NOATIME)),
    ("atime", Clear(MsFlags::MS_NOATIME)),
    ("relatime", Set(MsFlags::MS_RELATIME)),
    ("strictatime", Set(MsFlags::MS_STRICTATIME)),
    ("nodiratime", Set(MsFlags::MS_NODIRATIME)),
    ("lazytime", Set(MsFlags::MS_LAZYTIME)),
    ("nodev", Set(MsFlags::MS_NODEV)),
    ("nosuid", Set(MsFlags::MS_NOSUID)),
    ("noexec", Set(MsFlags::MS_NOEXEC)),
    ("sync", Set(MsFlags::MS_SYNCHRONOUS)),
    ("dirsync", Set(MsFlags::MS_DIRSYNC)),
    ("discard", Data(ALL)),
    ("nodiscard", Data(ALL)),
    ("barrier", Data(&[Ext4, Btrfs])),
    ("nobarrier", Data(&[Ext4, Btrfs])),
    ("noquota", Data(&[Ext4, Xfs])),
    ("quota", Data(&[Ext4])),
    ("usrquota", Data(&[Ext4, Xfs])),
    ("grpquota", Data(&[Ext4, Xfs])),
    ("prjquota", Data(&[Ext4, Xfs])),
    ("uquota", Data(&[Xfs])),
    ("gquota", Data(&[Xfs])),
    ("pquota", Data(&[Xfs])),
    ("inode64", Data(&[Xfs])),
    ("largeio", Data(&[Xfs])),
    ("nouuid", Data(&[Xfs])),
    ("user_xattr", Data(&[Ext4])),
    ("acl", Data(&[Ext4, Btrfs])),
    ("noacl", Data(&[Ext4, Btrfs])),
    ("ssd", Data(&[Btrfs])),
    ("nossd", Data(&[Btrfs])),
    ("autodefrag", Data(&[Btrfs])),
    ("noautodefrag", Data(&[Btrfs])),
    ("norecovery", Data(&[Ext4, Xfs])),
    ("dax=never", Data(ALL)),
];

/// A `key=value` option: its key, the values it accepts, the filesystems that understand it.
type Valued = (&'static str, fn(&str) -> bool, &'static [FsType]);

/// `key=value` options: the values each accepts, and the filesystems that understand it.
const VALUED: &[Valued] = &[
    (
        "data",
        |v| matches!(v, "ordered" | "writeback" | "journal"),
        &[Ext4],
    ),
    ("commit", |v| at_most(v, 300), &[Ext4, Btrfs]),
    (
        "errors",
        |v| matches!(v, "remount-ro" | "continue"),
        &[Ext4],
    ),
    ("logbufs", |v| at_most(v, 8), &[Xfs]),
    (
        "logbsize",
        |v| matches!(v, "16k" | "32k" | "64k" | "128k" | "256k"),
        &[Xfs],
    ),
    ("compress", compression, &[Btrfs]),
    ("compress-force", compression, &[Btrfs]),
    ("space_cache", |v| v == "v2", &[Btrfs]),
];

fn at_most(value: &str, max: u64) -> bool {
    value.parse::<u64>().is_ok_and(|n| n <= max)
}

fn compression(value: &str) -> bool {
    let (alg, level) = value.split_once(':').unwrap_or((value, "1"));
    matches!(alg, "zlib" | "lzo" | "zstd" | "no") && level.parse::<u8>().is_ok_and(|l| l <= 15)
}

fn meaning(option: &str) -> Option<Meaning> {
    if let Some((_, m)) = OPTIONS.iter().find(|(name, _)| *name == option) {
        return Some(*m);
    }
    let (key, value) = option.split_once('=')?;
    VALUED
        .iter()
        .find(|(k, ok, _)| *k == key && ok(value))
        .map(|(_, _, fs)| Data(fs))
}

pub fn check_mount_flag(flag: &str) -> Result<()> {
    let refuse = |why: &str| Err(Error::InvalidArgument(format!("mount flag {flag:?} {why}")));
    if flag.is_empty() {
        return refuse("is empty");
    }
    if flag.contains([',', ' ', '\0', '\n', '\t']) {
        return refuse("must be a single option (no commas, spaces or NUL)");
    }
    match meaning(flag) {
        Some(_) => Ok(()),
        None => refuse("is not in loopvol's list of allowed mount options (see README)"),
    }
}

/// Check already allowlisted flags against the filesystem they will be given to, so a flag the
/// chosen filesystem would reject is INVALID_ARGUMENT at NodeStage, not a failed mount.
pub fn check_flags_for(fs: FsType, flags: &[String]) -> Result<()> {
    let (_, data) = split_flags(flags);
    let understood = |o: &str| matches!(meaning(o), Some(Data(takers)) if takers.contains(&fs));
    match data
        .split(',')
        .filter(|o| !o.is_empty())
        .find(|o| !understood(o))
    {
        Some(o) => Err(Error::InvalidArgument(format!(
            "mount flag {o:?} is not an option {fs} understands"
        ))),
        None => Ok(()),
    }
}

/// Split validated flags into mount(2) flag bits and the filesystem's data string.
pub fn split_flags(flags: &[String]) -> (MsFlags, String) {
    let mut bits = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for f in flags {
        match meaning(f) {
            Some(Set(b)) => bits |= b,
            Some(Clear(b)) => bits &= !b,
            _ => data.push(f),
        }
    }
    (bits, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_flags_pass_hostile_ones_do_not() {
        for ok in [
            "noatime",
            "data=ordered",
            "commit=30",
            "compress=zstd:3",
            "nosuid",
        ] {
            check_mount_flag(ok).unwrap();
        }
        for bad in [
            "bind",
            "rbind",
            "remount",
            "shared",
            "suid",
            "dev",
            "loop",
            "errors=panic",
            "noatime,suid",
            "data=ordered,dev",
            "commit=9999",
            "",
            "x-mount.mkdir",
            "context=system_u:object_r:foo",
            "offset=4096",
        ] {
            assert!(check_mount_flag(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn options_are_checked_per_filesystem() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        check_flags_for(FsType::Ext4, &f(&["noatime", "data=ordered", "commit=5"])).unwrap();
        check_flags_for(FsType::Xfs, &f(&["inode64", "nouuid", "ro"])).unwrap();
        check_flags_for(FsType::Btrfs, &f(&["compress=zstd:3", "ssd"])).unwrap();
        for (fs, bad) in [
            (FsType::Ext4, "inode64"),
            (FsType::Ext4, "compress=zstd:3"),
            (FsType::Xfs, "data=ordered"),
            (FsType::Btrfs, "prjquota"),
        ] {
            assert!(
                check_flags_for(fs, &f(&[bad])).is_err(),
                "{fs} accepted {bad}"
            );
        }
    }

    #[test]
    fn flags_split_into_bits_and_data() {
        use nix::mount::MsFlags;
        let (bits, data) = split_flags(&["ro".into(), "noatime".into(), "data=journal".into()]);
        assert!(bits.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOATIME));
        assert_eq!(data, "data=journal");
    }
}
