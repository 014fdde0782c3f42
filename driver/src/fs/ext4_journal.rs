//! Whether the kernel aborted an ext4 filesystem's journal, read from the journal superblock.
//!
//! When a journal write fails (a thin volume whose pool is full: mkfs leaves the journal's
//! blocks unwritten with `lazy_journal_init`, so the first commit into one needs space), jbd2
//! aborts the journal and records the error in its own superblock, and nothing else changes:
//! mountinfo still says `rw` and `/sys/fs/ext4/<dev>/errors_count` stays 0 until the next
//! write into the filesystem meets the aborted journal (then ext4 records the error and stops
//! writing). `/proc/fs/jbd2/<dev>/info` has no abort flag either. The journal superblock's
//! `s_errno` is the one place that says so; jbd2 updates it in the device's page cache, so a
//! buffered read of the device sees it even when the write to the disk failed.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

const EXT4_MAGIC: u16 = 0xEF53;
const EXTENT_MAGIC: u16 = 0xF30A;
const JBD2_MAGIC: u32 = 0xC03B_3998;
const COMPAT_HAS_JOURNAL: u32 = 0x4;
/// `s_jnl_backup_type`: `s_jnl_blocks` holds a copy of the journal inode's `i_block`.
const JNL_BACKUP_BLOCKS: u8 = 1;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn read_at(dev: &mut File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    dev.seek(SeekFrom::Start(offset))?;
    dev.read_exact(&mut buf)?;
    Ok(buf)
}

/// The physical block of logical block 0 of a file, from its `i_block` (an extent tree root,
/// or a classic block map whose first entry is the first direct block). Extent trees are
/// followed down through index blocks.
fn first_block(dev: &mut File, block_size: u64, i_block: &[u8]) -> Option<u64> {
    if le16(i_block, 0) != EXTENT_MAGIC {
        return Some(u64::from(le32(i_block, 0))).filter(|b| *b != 0);
    }
    let mut node = i_block.to_vec();
    for _ in 0..5 {
        if le16(&node, 0) != EXTENT_MAGIC || le16(&node, 2) == 0 {
            return None;
        }
        let (depth, entry) = (le16(&node, 6), &node[12..24]);
        if depth == 0 {
            // ext4_extent: ee_block, ee_len, ee_start_hi, ee_start_lo.
            if le32(entry, 0) != 0 {
                return None;
            }
            return Some(u64::from(le16(entry, 6)) << 32 | u64::from(le32(entry, 8)));
        }
        // ext4_extent_idx: ei_block, ei_leaf_lo, ei_leaf_hi.
        let leaf = u64::from(le16(entry, 8)) << 32 | u64::from(le32(entry, 4));
        node = read_at(dev, leaf * block_size, block_size as usize).ok()?;
    }
    None
}

/// The errno jbd2 recorded when it aborted the internal journal of the ext4 on `device`
/// (negative, e.g. -5 for EIO), or `None`: no abort, no ext4, an external journal, or
/// anything unreadable (health reports what it knows, it does not guess).
pub fn aborted(device: &Path) -> Option<i32> {
    let mut dev = File::open(device).ok()?;
    let sb = read_at(&mut dev, 1024, 1024).ok()?;
    if le16(&sb, 0x38) != EXT4_MAGIC || le32(&sb, 0x5C) & COMPAT_HAS_JOURNAL == 0 {
        return None;
    }
    if le32(&sb, 0xE0) == 0 || sb[0xFD] != JNL_BACKUP_BLOCKS {
        return None;
    }
    let block_size = 1024u64 << le32(&sb, 0x18).min(6);
    let first = first_block(&mut dev, block_size, &sb[0x10C..0x10C + 60])?;
    let jsb = read_at(&mut dev, first * block_size, 64).ok()?;
    let be32 = |at: usize| u32::from_be_bytes(jsb[at..at + 4].try_into().expect("4 bytes"));
    if be32(0) != JBD2_MAGIC || !matches!(be32(4), 3 | 4) {
        return None;
    }
    Some(be32(0x20) as i32).filter(|e| *e != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root-only: a fresh ext4 has a journal that is not aborted, and a journal superblock
    /// whose errno field is set (as jbd2 sets it on abort) is found through the superblock's
    /// copy of the journal inode's extent tree. Not ext4: nothing.
    #[test]
    fn reads_the_journal_errno_through_the_superblock() {
        if !crate::shared::root_or_skip("reads_the_journal_errno") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        File::create(&image).unwrap().set_len(32 << 20).unwrap();
        assert_eq!(aborted(&image), None, "not ext4");
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(aborted(&image), None, "a fresh journal");
        // Find the journal superblock the way this module does, and set s_errno = -EIO.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let sb = read_at(&mut f, 1024, 1024).unwrap();
        let bs = 1024u64 << le32(&sb, 0x18);
        let first = first_block(&mut f, bs, &sb[0x10C..0x10C + 60]).unwrap();
        let jsb = read_at(&mut f, first * bs, 4).unwrap();
        assert_eq!(u32::from_be_bytes(jsb[..4].try_into().unwrap()), JBD2_MAGIC);
        use std::io::Write;
        f.seek(SeekFrom::Start(first * bs + 0x20)).unwrap();
        f.write_all(&(-5i32).to_be_bytes()).unwrap();
        drop(f);
        assert_eq!(aborted(&image), Some(-5));
        // dumpe2fs, reading the same field, agrees.
        let out = std::process::Command::new("dumpe2fs")
            .arg("-h")
            .arg(&image)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines()
                .any(|l| l.starts_with("Journal errno:") && l.trim_end().ends_with("-5")),
            "{text}"
        );
    }
}
