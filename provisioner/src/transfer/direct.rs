//! Writing a transfer's data past the page cache. A copy writes a whole image once and nobody
//! reads it back soon, so buffered writes only cost: every 4 KiB page of it is allocated in the
//! page cache, copied into by the kernel and written back at the final fsync, and the node's
//! page cache fills with a copy's dirty pages while pods are running. Measured on this
//! project's machine (a VM where fresh page-cache pages are expensive to touch), the kernel's
//! copy into the page cache was the biggest single cost of a cross-node restore's sink: 2.2 s
//! of CPU per GiB, more than TLS and the chunk digests together (docs/benchmarks.md).
//!
//! So the block-aligned middle of every write goes through a second, `O_DIRECT`, descriptor
//! of the same file, from one reused aligned buffer; the unaligned edges (rare: data ranges
//! are filesystem blocks) and filesystems that refuse `O_DIRECT` stay buffered. The caller's
//! fsync at the end still makes the allocation durable.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use super::CHUNK;

/// The alignment `O_DIRECT` needs for offsets, lengths and memory: a page covers every
/// logical block size (512 or 4096) a pool's device has.
const ALIGN: u64 = 4096;

pub(crate) struct DataWriter<'a> {
    file: &'a File,
    /// The `O_DIRECT` descriptor, or `None` where the filesystem refused it (then everything is
    /// buffered).
    direct: Option<File>,
    /// [`CHUNK`] + [`ALIGN`] bytes: an aligned window of a chunk's size inside. Allocated
    /// once, so the memory the copies go through stays the same pages.
    buf: Vec<u8>,
}

impl<'a> DataWriter<'a> {
    pub(crate) fn new(file: &'a File) -> Self {
        // Through /proc/self/fd: the same open file's inode, with other flags, whatever path
        // (or none) the caller opened it by.
        let direct = File::options()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok();
        DataWriter {
            file,
            buf: if direct.is_some() {
                vec![0; (CHUNK + ALIGN) as usize]
            } else {
                Vec::new()
            },
            direct,
        }
    }

    /// Whether writes bypass the page cache.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Write `data` (at most [`CHUNK`] bytes) at `offset`.
    pub(crate) fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let first = offset.div_ceil(ALIGN) * ALIGN;
        let last = end / ALIGN * ALIGN;
        if self.direct.is_none() || first >= last {
            return self.file.write_all_at(data, offset);
        }
        let (head, rest) = data.split_at((first - offset) as usize);
        let (middle, tail) = rest.split_at((last - first) as usize);
        if !head.is_empty() {
            self.file.write_all_at(head, offset)?;
        }
        let at = self.buf.as_ptr().align_offset(ALIGN as usize);
        let aligned = &mut self.buf[at..at + middle.len()];
        aligned.copy_from_slice(middle);
        let direct = self.direct.as_ref().expect("checked above");
        match direct.write_all_at(aligned, first) {
            Ok(()) => {}
            // A filesystem that opens O_DIRECT but refuses this write (its own alignment
            // rules): buffered from here on.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct = None;
                self.file.write_all_at(middle, first)?;
            }
            Err(e) => return Err(e),
        }
        if !tail.is_empty() {
            self.file.write_all_at(tail, last)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Aligned middles, unaligned edges and writes smaller than a block all land where they
    /// belong, through both descriptors.
    #[test]
    fn every_alignment_is_written_exactly() {
        let len = 3 * CHUNK;
        let (_t, f) = crate::transfer::test_image(len);
        let mut w = DataWriter::new(&f);
        assert!(w.is_direct(), "the test filesystem refused O_DIRECT");
        let mut want = vec![0u8; len as usize];
        let mut x = 7u8;
        for (off, n) in [
            (0u64, CHUNK as usize),
            (CHUNK + 100, 3 * 4096 + 5),
            (CHUNK + 20_000, 10),
            (2 * CHUNK - 4096, 4096),
            (2 * CHUNK + 4095, CHUNK as usize - 4095),
        ] {
            let data: Vec<u8> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(31).wrapping_add(11);
                    x
                })
                .collect();
            w.write_at(&data, off).unwrap();
            want[off as usize..off as usize + n].copy_from_slice(&data);
        }
        f.sync_all().unwrap();
        let mut back = vec![0u8; len as usize];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back == want, "the file differs from what was written");
    }
}
