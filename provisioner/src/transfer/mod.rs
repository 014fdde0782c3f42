//! The transfer engine (design §2, docs/design-pools-transfer.md): every copy of an image
//! between two *pools* — two pools of one node, or pools on two nodes — is a stream of frames
//! from one [`reader`] into one [`writer`]. A copy inside one pool stays [`crate::copy`]
//! (reflink, else sparse `copy_file_range`).
//!
//! The stream: a [`Header`] (what the image is), the image's allocated data as [`Chunk`]s of at
//! most [`CHUNK`] bytes, each with its SHA-256, in ascending offset order (holes never travel),
//! and a [`Trailer`] carrying the whole-image digest: the SHA-256 of the image length and of
//! every chunk's offset, length and digest, in order. The writer checks each chunk's digest
//! before writing it and the whole-image digest before anything is committed, so a corrupt,
//! reordered or short stream never becomes a volume.
//!
//! Between two pools of one node the reader runs on a thread and feeds the writer through a
//! bounded channel ([`local`]); between nodes the driver carries the same frames over gRPC
//! (`loopvol.transfer.v1.Transfer/Read`) and runs the writer as a background job of the sink
//! pool (`pool/transfers.rs`; the source side is `pool/transfer_source.rs`). This crate stays free of gRPC: the driver adapts its stream to a
//! [`FrameSource`].

use sha2::{Digest, Sha256};

use crate::params::FsType;

pub mod local;
pub mod rate;
pub mod reader;
pub mod writer;

pub use local::Method;
pub use rate::RateLimit;
pub use reader::read_image;
pub use writer::Writer;

/// The most one chunk carries: progress is reported, a cancelled job stops and the rate limit
/// is applied at least this often, and a gRPC message stays small.
pub const CHUNK: u64 = 4 << 20;
/// The unit the writer tests for zeros: a page, the unit the filesystem allocates.
pub const BLOCK: usize = 4096;

/// What the image is: enough for the sink to size, check and record the new volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The image file's length (the source volume's size).
    pub image_bytes: u64,
    /// The source's recorded size (a restore or clone is at least this big).
    pub size_bytes: u64,
    pub fs_type: FsType,
    /// Bytes inside the image's data ranges: what will travel (for progress).
    pub data_bytes: u64,
}

/// One piece of allocated data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub data: Vec<u8>,
    pub sha256: [u8; 32],
}

impl Chunk {
    pub fn new(offset: u64, data: Vec<u8>) -> Chunk {
        let sha256 = Sha256::digest(&data).into();
        Chunk {
            offset,
            data,
            sha256,
        }
    }
}

/// The end of a stream: without it a stream is short, whatever came before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    pub digest: [u8; 32],
    pub chunks: u64,
    pub data_bytes: u64,
}

/// One message of a transfer stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Header(Header),
    Chunk(Chunk),
    Trailer(Trailer),
}

/// Why a transfer did not produce a volume. The driver maps these to gRPC codes: a source
/// that cannot be reached is UNAVAILABLE (the CO retries), never NOT_FOUND.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// A chunk or the whole image failed verification, or the stream broke its own rules.
    #[error("transfer failed verification: {0}")]
    Corrupt(String),
    /// The source's node went away or stopped answering mid-stream.
    #[error("the source cannot be reached: {0}")]
    SourceGone(String),
    /// DeleteVolume cancelled the job.
    #[error("the transfer was cancelled")]
    Cancelled,
    #[error(transparent)]
    Pool(#[from] crate::PoolError),
}

/// Where a writer's frames come from: a local reader thread, or the driver's gRPC stream.
/// `Ok(None)` is the end of the stream (a stream that ends before its trailer is short).
pub trait FrameSource: Send {
    fn next_frame(&mut self) -> Result<Option<Frame>, TransferError>;
}

/// The running whole-image digest, computed the same way by reader and writer.
pub(crate) struct ImageDigest {
    hash: Sha256,
    chunks: u64,
    data_bytes: u64,
}

impl ImageDigest {
    pub(crate) fn new(image_bytes: u64) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"loopvol-transfer-v1");
        hash.update(image_bytes.to_le_bytes());
        ImageDigest {
            hash,
            chunks: 0,
            data_bytes: 0,
        }
    }

    pub(crate) fn add(&mut self, offset: u64, len: u64, sha256: &[u8; 32]) {
        self.hash.update(offset.to_le_bytes());
        self.hash.update(len.to_le_bytes());
        self.hash.update(sha256);
        self.chunks += 1;
        self.data_bytes += len;
    }

    pub(crate) fn finish(self) -> Trailer {
        Trailer {
            digest: self.hash.finalize().into(),
            chunks: self.chunks,
            data_bytes: self.data_bytes,
        }
    }
}

/// A transfer's ID: unique enough to name its temporary files and to tell two attempts at the
/// same volume apart in logs (time, process and a counter; no randomness needed).
pub fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let h = Sha256::digest(format!("{nanos}-{}-{n}", std::process::id()));
    h[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `id` can be a transfer ID from [`new_id`] (it names files).
pub fn valid_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}
