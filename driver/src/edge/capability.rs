//! Checking volume capabilities and mount flags. Everything a capability can ask for is decided
//! here once, for CreateVolume, ValidateVolumeCapabilities, NodeStage and NodePublish alike.

use crate::csi::volume_capability::access_mode::Mode;
use crate::csi::volume_capability::AccessType;
use crate::csi::VolumeCapability;
use crate::error::{Error, Result};
use provisioner::FsType;

/// What one capability asks for, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Mount {
        fs_type: Option<FsType>,
        flags: Vec<String>,
    },
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub access: Access,
    pub mode: Mode,
}

impl Checked {
    /// Only a reader-only mode stages a volume read-only.
    pub fn read_only(&self) -> bool {
        self.mode == Mode::SingleNodeReaderOnly
    }
}

/// Validate one capability; any problem is INVALID_ARGUMENT with the reason.
pub fn check(cap: &VolumeCapability) -> Result<Checked> {
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume capability has no access_mode".into()))?
        .mode();
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        Mode::Unknown => {
            return Err(Error::InvalidArgument(
                "volume capability access_mode is UNKNOWN".into(),
            ))
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "access mode {} is not supported: loopvol volumes are local to one node",
                other.as_str_name()
            )))
        }
    }
    let access = match &cap.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() {
                None
            } else {
                Some(m.fs_type.parse::<FsType>()?)
            };
            for f in &m.mount_flags {
                check_mount_flag(f)?;
            }
            if !m.volume_mount_group.is_empty() {
                return Err(Error::InvalidArgument(
                    "volume_mount_group is not supported (VOLUME_MOUNT_GROUP is not advertised)"
                        .into(),
                ));
            }
            Access::Mount {
                fs_type,
                flags: m.mount_flags.clone(),
            }
        }
        None => {
            return Err(Error::InvalidArgument(
                "volume capability needs an access_type (mount or block)".into(),
            ))
        }
    };
    Ok(Checked { access, mode })
}

/// Validate a non-empty list of capabilities.
pub fn check_all(caps: &[VolumeCapability]) -> Result<Vec<Checked>> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument(
            "volume_capabilities is required".into(),
        ));
    }
    caps.iter().map(check).collect()
}

/// The single fs type the mount capabilities name, if any; two different ones is an error.
pub fn fs_type_of(checked: &[Checked]) -> Result<Option<FsType>> {
    let mut found: Option<FsType> = None;
    for c in checked {
        if let Access::Mount {
            fs_type: Some(t), ..
        } = c.access
        {
            match found {
                Some(f) if f != t => {
                    return Err(Error::InvalidArgument(format!(
                        "capabilities ask for two filesystems ({f} and {t})"
                    )))
                }
                _ => found = Some(t),
            }
        }
    }
    Ok(found)
}

/// Mount flags are passed to mount(2); only a reviewed list is accepted. Flags that change what
/// mount(2) does (bind, move, remount, propagation), that enable device files or set-uid
/// binaries, or that would smuggle extra options through commas are refused.
const PLAIN_FLAGS: &[&str] = &[
    "ro",
    "rw",
    "noatime",
    "atime",
    "relatime",
    "strictatime",
    "nodiratime",
    "lazytime",
    "nodev",
    "nosuid",
    "noexec",
    "sync",
    "dirsync",
    "discard",
    "nodiscard",
    "barrier",
    "nobarrier",
    "noquota",
    "quota",
    "usrquota",
    "grpquota",
    "prjquota",
    "uquota",
    "gquota",
    "pquota",
    "inode64",
    "largeio",
    "nouuid",
    "user_xattr",
    "acl",
    "noacl",
    "ssd",
    "nossd",
    "autodefrag",
    "noautodefrag",
    "norecovery",
    "dax=never",
];

/// `key=value` options and the values each accepts.
fn valued_flag_ok(key: &str, value: &str) -> bool {
    let number = |max: u64| value.parse::<u64>().map(|n| n <= max).unwrap_or(false);
    match key {
        "data" => matches!(value, "ordered" | "writeback" | "journal"),
        "commit" => number(300),
        "errors" => matches!(value, "remount-ro" | "continue"),
        "logbufs" => number(8),
        "logbsize" => matches!(value, "16k" | "32k" | "64k" | "128k" | "256k"),
        "compress" | "compress-force" => {
            let (alg, level) = value.split_once(':').unwrap_or((value, "1"));
            matches!(alg, "zlib" | "lzo" | "zstd" | "no")
                && level.parse::<u8>().is_ok_and(|l| l <= 15)
        }
        "space_cache" => matches!(value, "v2"),
        _ => false,
    }
}

pub fn check_mount_flag(flag: &str) -> Result<()> {
    let refuse = |why: &str| Err(Error::InvalidArgument(format!("mount flag {flag:?} {why}")));
    if flag.is_empty() {
        return refuse("is empty");
    }
    if flag.contains([',', ' ', '\0', '\n', '\t']) {
        return refuse("must be a single option (no commas, spaces or NUL)");
    }
    if PLAIN_FLAGS.contains(&flag) {
        return Ok(());
    }
    match flag.split_once('=') {
        Some((k, v)) if valued_flag_ok(k, v) => Ok(()),
        _ => refuse("is not in loopvol's list of allowed mount options (see README)"),
    }
}

/// Filesystem options (the data string, not mount(2) bits) each filesystem understands, so a
/// flag the chosen filesystem would reject is INVALID_ARGUMENT at NodeStage, not a failed mount.
fn fs_accepts(fs: FsType, option: &str) -> bool {
    let key = option.split_once('=').map_or(option, |(k, _)| k);
    let common = ["discard", "nodiscard", "dax"];
    let own: &[&str] = match fs {
        FsType::Ext4 => &[
            "data",
            "commit",
            "errors",
            "barrier",
            "nobarrier",
            "noquota",
            "quota",
            "usrquota",
            "grpquota",
            "prjquota",
            "user_xattr",
            "acl",
            "noacl",
            "norecovery",
        ],
        FsType::Xfs => &[
            "noquota",
            "usrquota",
            "grpquota",
            "prjquota",
            "uquota",
            "gquota",
            "pquota",
            "inode64",
            "largeio",
            "nouuid",
            "logbufs",
            "logbsize",
            "norecovery",
        ],
        FsType::Btrfs => &[
            "commit",
            "barrier",
            "nobarrier",
            "acl",
            "noacl",
            "compress",
            "compress-force",
            "ssd",
            "nossd",
            "autodefrag",
            "noautodefrag",
            "space_cache",
        ],
    };
    common.contains(&key) || own.contains(&key)
}

/// Check already allowlisted flags against the filesystem they will be given to.
pub fn check_flags_for(fs: FsType, flags: &[String]) -> Result<()> {
    let (_, data) = split_flags(flags);
    match data
        .split(',')
        .filter(|o| !o.is_empty())
        .find(|o| !fs_accepts(fs, o))
    {
        Some(o) => Err(Error::InvalidArgument(format!(
            "mount flag {o:?} is not an option {fs} understands"
        ))),
        None => Ok(()),
    }
}

/// Split validated flags into mount(2) flag bits and the filesystem's data string.
pub fn split_flags(flags: &[String]) -> (nix::mount::MsFlags, String) {
    use nix::mount::MsFlags;
    let mut bits = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for f in flags {
        match f.as_str() {
            "ro" => bits |= MsFlags::MS_RDONLY,
            "rw" => bits &= !MsFlags::MS_RDONLY,
            "noatime" => bits |= MsFlags::MS_NOATIME,
            "atime" => bits &= !MsFlags::MS_NOATIME,
            "relatime" => bits |= MsFlags::MS_RELATIME,
            "strictatime" => bits |= MsFlags::MS_STRICTATIME,
            "nodiratime" => bits |= MsFlags::MS_NODIRATIME,
            "lazytime" => bits |= MsFlags::MS_LAZYTIME,
            "nodev" => bits |= MsFlags::MS_NODEV,
            "nosuid" => bits |= MsFlags::MS_NOSUID,
            "noexec" => bits |= MsFlags::MS_NOEXEC,
            "sync" => bits |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => bits |= MsFlags::MS_DIRSYNC,
            other => data.push(other),
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
