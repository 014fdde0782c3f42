//! The external programs the node side runs, and the package each comes from. One list, shared
//! by the node operations (a missing program is FAILED_PRECONDITION naming its package, not an
//! INTERNAL OS error), CreateVolume (a blank volume whose mkfs is missing is refused before
//! anything is made) and `loopvol doctor`.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use provisioner::FsType;

use crate::error::{Error, Result};

/// The Debian package that ships `program`, for the programs loopvol runs.
pub fn package_of(program: &str) -> Option<&'static str> {
    Some(match program {
        "mkfs.ext4" | "e2fsck" | "resize2fs" => "e2fsprogs",
        "mkfs.xfs" | "xfs_growfs" => "xfsprogs",
        "mkfs.btrfs" | "btrfs" => "btrfs-progs",
        "blkid" => "util-linux",
        _ => return None,
    })
}

/// What each filesystem needs (mkfs, check, grow).
pub fn needs(fs: FsType) -> &'static [&'static str] {
    match fs {
        FsType::Ext4 => &["mkfs.ext4", "e2fsck", "resize2fs"],
        FsType::Xfs => &["mkfs.xfs", "xfs_growfs"],
        FsType::Btrfs => &["mkfs.btrfs", "btrfs"],
    }
}

/// The mkfs program for `fs`.
pub fn mkfs_of(fs: FsType) -> &'static str {
    needs(fs)[0]
}

/// The error for a program that is not installed: the node cannot do this until an operator
/// installs the package, which is what FAILED_PRECONDITION tells the CO.
pub fn missing(program: &str) -> Error {
    let package = package_of(program).unwrap_or("the package that provides it");
    Error::MissingTool {
        program: program.to_string(),
        package: package.to_string(),
    }
}

/// Refuse early when `program` is not in PATH (the search `Command` itself will make).
pub fn require(program: &str) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    match find(program, &path) {
        Some(_) => Ok(()),
        None => Err(missing(program)),
    }
}

/// The first executable file named `program` in the `PATH` list.
pub fn find(program: &str, path: &OsString) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_has_its_package() {
        for fs in [FsType::Ext4, FsType::Xfs, FsType::Btrfs] {
            for p in needs(fs) {
                assert!(package_of(p).is_some(), "{p}");
            }
        }
        assert_eq!(package_of("blkid"), Some("util-linux"));
        let e = missing("mkfs.xfs");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("xfsprogs"), "{e}");
        assert!(find("sh", &OsString::from("/nonexistent:/bin:/usr/bin")).is_some());
        assert!(find("sh", &OsString::from("/nonexistent")).is_none());
    }
}
