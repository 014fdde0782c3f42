//! The transfer engine (design §2, docs/design-pools-transfer.md): every copy of an image
//! between two *pools* — two pools of one node, or pools on two nodes — is a stream of frames
//! from one [`reader`] into one [`writer`]. A copy inside one pool stays [`crate::copy`]
//! (reflink, else sparse `copy_file_range`).
//!
//! The stream: a [`Header`] (what the image is), the image's allocated data as [`Chunk`]s of at
//! most [`CHUNK`] bytes, each with its digest ([`ChunkDigest`]: XXH3-128, or SHA-256 with a peer
//! from before the choice), in ascending offset order (holes never travel), and a [`Trailer`]
//! carrying the whole-image digest: the SHA-256 of the image length and of every chunk's
//! offset, length and digest, in order. The writer checks each chunk's digest
//! before writing it and the whole-image digest before anything is committed, so a corrupt,
//! reordered or short stream never becomes a volume.
//!
//! Between two pools of one node the reader runs on a thread and feeds the writer through a
//! bounded channel ([`local`]); between nodes the driver carries the same frames over gRPC
//! (`loopvol.transfer.v1.Transfer/Read`) and runs the writer as a background job of the sink
//! pool (`pool/transfers.rs`; the source side is `pool/transfer_source.rs`). This crate stays free of gRPC: the driver adapts its stream to a
//! [`FrameSource`].

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::params::FsType;

mod direct;
pub mod local;
pub mod rate;
pub mod reader;
pub mod writer;

pub use bytes;
pub use local::Method;
pub use rate::RateLimit;
pub use reader::read_image;
pub use writer::Writer;

/// The most one chunk carries: progress is reported, a cancelled job stops and the rate limit
/// is applied at least this often, and a gRPC message stays small.
pub const CHUNK: u64 = 4 << 20;
/// The unit the writer tests for zeros: a page, the unit the filesystem allocates.
pub const BLOCK: usize = 4096;

/// How each chunk is digested. The digest guards the data on its way from the source's disk
/// to the sink's (reads, buffers, the two processes, this code): against accidental
/// corruption, not an adversary, since the peer is already authenticated by mTLS and could
/// send any data with matching digests whatever the function. So the default is XXH3-128, as
/// in rsync, which negotiates it first for the same job. Measured on this project's machine,
/// per GiB on each end: SHA-256 (with the CPU's SHA extensions) 0.80 s, BLAKE3 0.16 s,
/// XXH3-128 0.05 s; SHA-256 at both ends was once most of a cross-node copy's CPU
/// (docs/benchmarks.md, "Cross-node data movement").
///
/// SHA-256 stays for peers from before the choice: a sink names what it can check
/// (`ReadRequest.digests`), a source that does not know the field sends SHA-256, and the
/// header says which one the chunks carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChunkDigest {
    Sha256,
    #[default]
    Xxh128,
}

impl ChunkDigest {
    /// What a sink asks for, most wanted first.
    pub const PREFERENCE: [ChunkDigest; 2] = [ChunkDigest::Xxh128, ChunkDigest::Sha256];

    pub fn of(self, data: &[u8]) -> Digest {
        match self {
            ChunkDigest::Sha256 => Digest::new(&Sha256::digest(data)),
            ChunkDigest::Xxh128 => Digest::new(&xxhash_rust::xxh3::xxh3_128(data).to_be_bytes()),
        }
    }

    /// The wire name (`ReadRequest.digests`, `Header.digest`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkDigest::Sha256 => "sha256",
            ChunkDigest::Xxh128 => "xxh128",
        }
    }

    /// The wire name's digest; an empty name is SHA-256 (a peer from before the field).
    pub fn parse(name: &str) -> Option<ChunkDigest> {
        match name {
            "" | "sha256" => Some(ChunkDigest::Sha256),
            "xxh128" => Some(ChunkDigest::Xxh128),
            _ => None,
        }
    }

    /// The one a source uses for a sink that can check `wanted` (wire names, most wanted
    /// first; none named is a sink from before the field, which checks SHA-256 only).
    pub fn choose<'a>(wanted: impl IntoIterator<Item = &'a str>) -> ChunkDigest {
        wanted
            .into_iter()
            .find_map(|w| match w {
                "" => None,
                w => ChunkDigest::parse(w),
            })
            .unwrap_or(ChunkDigest::Sha256)
    }
}

/// One chunk's digest: as many bytes as its [`ChunkDigest`] gives (32 for SHA-256, 16 for
/// XXH3-128), kept inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    bytes: [u8; 32],
    len: u8,
}

impl Digest {
    fn new(b: &[u8]) -> Digest {
        let mut bytes = [0; 32];
        bytes[..b.len()].copy_from_slice(b);
        Digest {
            bytes,
            len: b.len() as u8,
        }
    }

    /// A digest as received: 1 to 32 bytes (whether it is the right one is the writer's
    /// check).
    pub fn from_wire(b: &[u8]) -> Option<Digest> {
        (1..=32).contains(&b.len()).then(|| Digest::new(b))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

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
    /// The source's encryption: the copy is ciphertext under the source's salt, so the new
    /// volume's record must carry that salt for the same Secret to open it (design §3).
    pub encryption: Option<crate::encryption::Encryption>,
    /// How the chunks are digested.
    pub digest: ChunkDigest,
}

/// One piece of allocated data. `data` is shared bytes so the driver can hand a received
/// message's payload to the writer without copying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub data: Bytes,
    /// The data's digest by the stream's [`ChunkDigest`].
    pub digest: Digest,
}

impl Chunk {
    pub fn new(kind: ChunkDigest, offset: u64, data: impl Into<Bytes>) -> Chunk {
        let data = data.into();
        let digest = kind.of(&data);
        Chunk {
            offset,
            data,
            digest,
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
    pub(crate) fn new(kind: ChunkDigest, image_bytes: u64) -> Self {
        let mut hash = Sha256::new();
        // The SHA-256 stream keeps its original prefix, so a peer from before the choice agrees.
        hash.update(match kind {
            ChunkDigest::Sha256 => &b"loopvol-transfer-v1"[..],
            ChunkDigest::Xxh128 => &b"loopvol-transfer-v1-xxh128"[..],
        });
        hash.update(image_bytes.to_le_bytes());
        ImageDigest {
            hash,
            chunks: 0,
            data_bytes: 0,
        }
    }

    pub(crate) fn add(&mut self, offset: u64, len: u64, digest: &Digest) {
        self.hash.update(offset.to_le_bytes());
        self.hash.update(len.to_le_bytes());
        self.hash.update(digest.as_bytes());
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

/// A scratch image of `len` bytes (sparse) in a temp dir of its own, for the engine's tests.
#[cfg(test)]
pub(crate) fn test_image(len: u64) -> (tempfile::TempDir, std::fs::File) {
    let t = tempfile::tempdir().unwrap();
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(t.path().join("img"))
        .unwrap();
    f.set_len(len).unwrap();
    (t, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink from before the field names nothing and gets SHA-256; names are taken in the
    /// sink's order, unknown ones skipped.
    #[test]
    fn the_source_takes_the_first_digest_it_knows() {
        assert_eq!(ChunkDigest::choose([]), ChunkDigest::Sha256);
        assert_eq!(ChunkDigest::choose([""]), ChunkDigest::Sha256);
        assert_eq!(
            ChunkDigest::choose(["md4", "xxh128", "sha256"]),
            ChunkDigest::Xxh128
        );
        assert_eq!(
            ChunkDigest::choose(["sha256", "xxh128"]),
            ChunkDigest::Sha256
        );
        assert_eq!(ChunkDigest::parse(""), Some(ChunkDigest::Sha256));
        assert_eq!(ChunkDigest::parse("blake2"), None);
        for d in ChunkDigest::PREFERENCE {
            assert_eq!(ChunkDigest::parse(d.as_str()), Some(d));
        }
    }

    /// The SHA-256 stream is the one peers from before the choice compute: chunk digests are
    /// plain SHA-256, and the image digest is SHA-256 of "loopvol-transfer-v1", the length
    /// and each chunk's offset, length and digest.
    #[test]
    fn the_sha256_stream_is_the_original_one() {
        let data = vec![5u8; 1000];
        let c = Chunk::new(ChunkDigest::Sha256, 4096, data.clone());
        assert_eq!(c.digest.as_bytes(), &Sha256::digest(&data)[..]);
        let mut d = ImageDigest::new(ChunkDigest::Sha256, 1 << 20);
        d.add(4096, 1000, &c.digest);
        let mut want = Sha256::new();
        want.update(b"loopvol-transfer-v1");
        want.update((1u64 << 20).to_le_bytes());
        want.update(4096u64.to_le_bytes());
        want.update(1000u64.to_le_bytes());
        want.update(Sha256::digest(&data));
        assert_eq!(d.finish().digest, <[u8; 32]>::from(want.finalize()));
        let x = Chunk::new(ChunkDigest::Xxh128, 4096, data.clone());
        assert_eq!(
            x.digest.as_bytes(),
            xxhash_rust::xxh3::xxh3_128(&data).to_be_bytes()
        );
        assert_eq!(Digest::from_wire(&[]), None);
        assert_eq!(Digest::from_wire(&[0; 33]), None);
    }
}
