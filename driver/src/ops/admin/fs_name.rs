//! Which filesystem holds a path, from statfs(2)'s `f_type` magic number. It decides what the
//! pool can do: reflink snapshots (xfs, btrfs), direct I/O for loop devices (not ramfs).

use std::path::Path;

/// The filesystem type under `path`: a name for the common ones, else the magic in hex.
pub fn of(path: &Path) -> std::io::Result<String> {
    let st = nix::sys::statfs::statfs(path)?;
    // The magic is an unsigned 32-bit value stored in a signed word on some architectures.
    Ok(name(st.filesystem_type().0 as u64 & 0xffff_ffff))
}

/// The name of a statfs magic number (see statfs(2) and linux/magic.h).
pub fn name(magic: u64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x858_458F6 => "ramfs".into(),
        0x794C_7630 => "overlay".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6969 => "nfs".into(),
        0x6573_5546 => "fuse".into(),
        0xF2F5_2010 => "f2fs".into(),
        other => format!("0x{other:x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name(0xEF53), "ext4");
        assert_eq!(name(0x58465342), "xfs");
        assert_eq!(name(0x12345), "0x12345");
        assert!(!of(Path::new("/")).unwrap().is_empty());
    }
}
