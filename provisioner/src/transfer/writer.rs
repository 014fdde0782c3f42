//! The writing end of a transfer: each chunk's digest is checked before a byte of it is
//! written, chunks must come in ascending order inside the image, all-zero blocks are skipped
//! (an allocated-but-zero block of a thin source stays a hole), and the whole-image digest of
//! what was written must equal the trailer's before the caller may commit anything.

use std::fs::File;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use super::{Chunk, Header, ImageDigest, Trailer, TransferError, BLOCK, CHUNK};
use crate::error::IoContext;

pub struct Writer<'a> {
    file: &'a File,
    image_bytes: u64,
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
            image_bytes: header.image_bytes,
            digest: Some(ImageDigest::new(header.image_bytes)),
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
        let sha: [u8; 32] = Sha256::digest(&c.data).into();
        if sha != c.sha256 {
            return Err(TransferError::Corrupt(format!(
                "the chunk at offset {} does not match its SHA-256",
                c.offset
            )));
        }
        // Zero blocks are skipped at absolute block boundaries.
        let mut at = 0usize;
        while at < c.data.len() {
            let abs = c.offset + at as u64;
            let n = (BLOCK - (abs % BLOCK as u64) as usize).min(c.data.len() - at);
            let block = &c.data[at..at + n];
            if block.iter().any(|&b| b != 0) {
                self.file
                    .write_all_at(block, abs)
                    .map_err(|e| crate::error::space_error("write the transferred data", e))?;
            }
            at += n;
        }
        if let Some(d) = self.digest.as_mut() {
            d.add(c.offset, len, &sha);
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
