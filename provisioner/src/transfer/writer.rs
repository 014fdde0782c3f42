//! The writing end of a transfer: each chunk's digest is checked before a byte of it is
//! written, chunks must come in ascending order inside the image, all-zero blocks are skipped
//! (an allocated-but-zero block of a thin source stays a hole), and the whole-image digest of
//! what was written must equal the trailer's before the caller may commit anything.

use std::fs::File;

use super::direct::DataWriter;
use super::{Chunk, ChunkDigest, Header, ImageDigest, Trailer, TransferError, BLOCK, CHUNK};
use crate::error::IoContext;

pub struct Writer<'a> {
    file: &'a File,
    data: DataWriter<'a>,
    image_bytes: u64,
    kind: ChunkDigest,
    digest: Option<ImageDigest>,
    /// The end of the last chunk written: the next one starts at or after it.
    next: u64,
    /// Data bytes received and written so far (progress).
    pub received: u64,
}

impl<'a> Writer<'a> {
    /// A writer into `file`, which the caller sized (`size` bytes, at least the image's length).
    pub fn new(file: &'a File, size: u64, header: &Header) -> Result<Self, TransferError> {
        if header.image_bytes > size {
            return Err(TransferError::Corrupt(format!(
                "the source image is {} bytes, larger than the {size} bytes of the target",
                header.image_bytes
            )));
        }
        Ok(Writer {
            file,
            data: DataWriter::new(file),
            image_bytes: header.image_bytes,
            kind: header.digest,
            digest: Some(ImageDigest::new(header.digest, header.image_bytes)),
            next: 0,
            received: 0,
        })
    }

    /// Check and write one chunk.
    pub fn chunk(&mut self, c: &Chunk) -> Result<(), TransferError> {
        let len = c.data.len() as u64;
        let end = c.offset.checked_add(len);
        if len == 0
            || len > CHUNK
            || c.offset < self.next
            || end.is_none_or(|e| e > self.image_bytes)
        {
            return Err(TransferError::Corrupt(format!(
                "chunk of {len} bytes at offset {} is out of order or outside the {}-byte image",
                c.offset, self.image_bytes
            )));
        }
        let digest = self.kind.of(&c.data);
        if digest != c.digest {
            return Err(TransferError::Corrupt(format!(
                "the chunk at offset {} does not match its {} digest",
                c.offset,
                self.kind.as_str()
            )));
        }
        // Zero blocks (at absolute block boundaries) are skipped; each run of data blocks is
        // one write.
        let mut run: Option<usize> = None;
        let mut at = 0usize;
        loop {
            let n = match c.data.len() - at {
                0 => 0,
                left => (BLOCK - ((c.offset + at as u64) % BLOCK as u64) as usize).min(left),
            };
            let data = n > 0 && c.data[at..at + n].iter().any(|&b| b != 0);
            match (run, data) {
                (None, true) => run = Some(at),
                (Some(start), false) => {
                    self.data
                        .write_at(&c.data[start..at], c.offset + start as u64)
                        .map_err(|e| crate::error::space_error("write the transferred data", e))?;
                    run = None;
                }
                _ => {}
            }
            if n == 0 {
                break;
            }
            at += n;
        }
        if let Some(d) = self.digest.as_mut() {
            d.add(c.offset, len, &digest);
        }
        self.next = c.offset + len;
        self.received += len;
        Ok(())
    }

    /// Compare what was written with the trailer; only `Ok` makes the image committable.
    pub fn finish(mut self, t: &Trailer) -> Result<u64, TransferError> {
        let mine = self.digest.take().expect("finish runs once").finish();
        if mine != *t {
            return Err(TransferError::Corrupt(format!(
                "the image digest does not match the source's ({} chunks, {} bytes received; \
                 the source sent {} chunks, {} bytes)",
                mine.chunks, mine.data_bytes, t.chunks, t.data_bytes
            )));
        }
        self.file
            .sync_all()
            .ctx(|| "fsync the transferred image".into())?;
        Ok(mine.data_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::FsType;
    use std::os::unix::fs::{FileExt, MetadataExt};

    /// Runs of data are written, zero blocks are not, at any chunk alignment.
    #[test]
    fn data_runs_are_written_and_zero_blocks_skipped() {
        let len = 1 << 20;
        let (_t, f) = crate::transfer::test_image(len);
        let h = Header {
            image_bytes: len,
            size_bytes: len,
            fs_type: FsType::Ext4,
            data_bytes: 0,
            encryption: None,
            digest: ChunkDigest::Xxh128,
        };
        // From offset 3000: 1096 bytes to the first boundary, then blocks of data, zeros,
        // zeros, data, and a partial data tail.
        let mut data = vec![0u8; 1096 + 4 * 4096 + 100];
        data[..1096].fill(1);
        data[1096..1096 + 4096].fill(2);
        data[1096 + 3 * 4096..].fill(3);
        let mut w = Writer::new(&f, len, &h).unwrap();
        w.chunk(&Chunk::new(ChunkDigest::Xxh128, 3000, data.clone()))
            .unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 3000).unwrap();
        assert_eq!(back, data);
        f.sync_all().unwrap();
        assert_eq!(
            f.metadata().unwrap().blocks() * 512,
            4 * 4096,
            "two zero blocks skipped"
        );
    }
}
