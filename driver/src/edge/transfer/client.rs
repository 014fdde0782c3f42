//! The sink's end of the wire: open `Transfer/Read` on the source node's pool API (mTLS, this
//! node's certificate as the client identity) and turn the stream into frames for the pool's
//! writer. Anything that keeps the source out of reach is UNAVAILABLE (the CO retries), never
//! NOT_FOUND; a source the source node itself says does not exist stays NOT_FOUND.

use std::time::Duration;

use provisioner::transfer::{
    Chunk, ChunkDigest, Digest, Frame, FrameSource, Header, Trailer, TransferError,
};
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic::{Code, Streaming};

use crate::error::{Error, Result};
use crate::transfer_api::read_response::Frame as Wire;
use crate::transfer_api::transfer_client::TransferClient;
use crate::transfer_api::{ReadRequest, ReadResponse};

/// The longest the sink waits for the next message before it counts the source as gone.
pub const STALL: Duration = Duration::from_secs(60);
/// A chunk message is at most 4 MiB of data plus a few dozen bytes.
const MAX_MESSAGE: usize = 8 << 20;
/// HTTP/2 flow control for the stream: room for a few whole chunk messages in flight. hyper's
/// default stream window (2 MiB) is smaller than one chunk, so the source stalled on window
/// updates while the writer digested and wrote the previous chunk.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Frames the source may send: fewer, bigger DATA frames per 4 MiB chunk than the 16 KiB default.
const MAX_FRAME: u32 = 1 << 20;
/// Decoded frames queued between the network task and the writer's thread, so receiving and
/// decoding the next chunk overlaps with digesting and writing this one.
const QUEUED_FRAMES: usize = 4;

/// An open stream, its header already read.
pub struct Opened {
    pub header: Header,
    pub stream: Streaming<ReadResponse>,
}

/// Connect to `endpoint` and start streaming `source_id`.
pub async fn open(
    endpoint: &str,
    tls: Option<&ClientTlsConfig>,
    source_id: &str,
    transfer_id: &str,
) -> Result<Opened> {
    let tls = tls.ok_or_else(|| {
        Error::FailedPrecondition(
            "this node has no pool API certificates (--tls-cert/--tls-key/--tls-ca): it cannot \
             pull from another node"
                .into(),
        )
    })?;
    let unreachable = |e: String| {
        Error::Unavailable(format!(
            "the source node's pool API {endpoint} cannot be reached: {e}"
        ))
    };
    let channel = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| Error::InvalidArgument(format!("bad transfer endpoint {endpoint}: {e}")))?
        .tls_config(tls.clone())
        .map_err(|e| Error::Internal(format!("TLS setup for {endpoint}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .connect()
        .await
        .map_err(|e| unreachable(format!("{e:?}")))?;
    let mut client = TransferClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let resp = client
        .read(ReadRequest {
            source_id: source_id.to_string(),
            transfer_id: transfer_id.to_string(),
            digests: ChunkDigest::PREFERENCE
                .iter()
                .map(|d| d.as_str().to_string())
                .collect(),
        })
        .await
        .map_err(|s| status_error(endpoint, s))?;
    let mut stream = resp.into_inner();
    let first = tokio::time::timeout(STALL, stream.message())
        .await
        .map_err(|_| unreachable("no header within a minute".into()))?
        .map_err(|s| status_error(endpoint, s))?;
    match first.and_then(|m| m.frame) {
        Some(Wire::Header(h)) => Ok(Opened {
            header: Header {
                image_bytes: h.image_bytes,
                size_bytes: h.size_bytes,
                fs_type: h.fs_type.parse().map_err(|_| {
                    Error::Internal(format!(
                        "the source sent an unknown fs type {:?}",
                        h.fs_type
                    ))
                })?,
                data_bytes: h.data_bytes,
                encryption: wire_encryption(&h.encryption, &h.key_salt)?,
                digest: ChunkDigest::parse(&h.digest).ok_or_else(|| {
                    Error::Internal(format!(
                        "the source sent an unknown chunk digest {:?}",
                        h.digest
                    ))
                })?,
            },
            stream,
        }),
        _ => Err(unreachable("the stream did not start with a header".into())),
    }
}

/// A source node's refusal, as the sink passes it on: its own word for what does not exist or
/// is refused, UNAVAILABLE for everything that is about reaching it.
fn status_error(endpoint: &str, s: tonic::Status) -> Error {
    match s.code() {
        Code::NotFound
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::ResourceExhausted
        | Code::Aborted => Error::Forwarded(s),
        _ => Error::Unavailable(format!(
            "the source node {endpoint} did not stream: {}",
            s.message()
        )),
    }
}

/// The stream as a [`FrameSource`] for the pool's writer, read from a job's own thread. A task
/// on the runtime receives and decodes ahead into a small queue, so the network keeps moving
/// while the writer works; the queue's bound keeps memory at a few chunks.
pub struct RemoteSource {
    frames: tokio::sync::mpsc::Receiver<std::result::Result<Frame, TransferError>>,
}

impl RemoteSource {
    /// Start receiving `stream` on `runtime`. The task ends with the stream, at the first
    /// error, or when the writer drops this source (its queue closes).
    pub fn start(stream: Streaming<ReadResponse>, runtime: &tokio::runtime::Handle) -> Self {
        let (tx, frames) = tokio::sync::mpsc::channel(QUEUED_FRAMES);
        runtime.spawn(receive(stream, tx));
        RemoteSource { frames }
    }
}

async fn receive(
    mut stream: Streaming<ReadResponse>,
    tx: tokio::sync::mpsc::Sender<std::result::Result<Frame, TransferError>>,
) {
    loop {
        let next = match tokio::time::timeout(STALL, stream.message()).await {
            Err(_) => Err(TransferError::SourceGone("no data for a minute".into())),
            Ok(Err(s)) => Err(TransferError::SourceGone(s.message().to_string())),
            Ok(Ok(None)) => return,
            Ok(Ok(Some(m))) => frame_of(m),
        };
        let last = next.is_err() || matches!(next, Ok(Frame::Trailer(_)));
        if tx.send(next).await.is_err() || last {
            return;
        }
    }
}

fn frame_of(msg: ReadResponse) -> std::result::Result<Frame, TransferError> {
    let sha256 = |b: Vec<u8>| -> std::result::Result<[u8; 32], TransferError> {
        b.try_into()
            .map_err(|_| TransferError::Corrupt("the image digest is not 32 bytes".into()))
    };
    Ok(match msg.frame {
        Some(Wire::Chunk(c)) => Frame::Chunk(Chunk {
            offset: c.offset,
            data: c.data,
            digest: Digest::from_wire(&c.digest).ok_or_else(|| {
                TransferError::Corrupt("a chunk digest of no or 33+ bytes".into())
            })?,
        }),
        Some(Wire::Trailer(t)) => Frame::Trailer(Trailer {
            digest: sha256(t.digest)?,
            chunks: t.chunks,
            data_bytes: t.data_bytes,
        }),
        Some(Wire::Header(_)) => return Err(TransferError::Corrupt("a second header".into())),
        None => return Err(TransferError::Corrupt("an empty message".into())),
    })
}

impl FrameSource for RemoteSource {
    fn next_frame(&mut self) -> std::result::Result<Option<Frame>, TransferError> {
        // The task applies the stall timeout; a closed queue is the stream's end.
        self.frames.blocking_recv().transpose()
    }
}

/// The header's encryption fields: both empty (plaintext), or a known method with a well-formed
/// salt. Anything else is refused, since a volume recorded with a wrong salt could never be
/// opened with its Secret.
fn wire_encryption(
    method: &str,
    salt: &str,
) -> Result<Option<provisioner::encryption::Encryption>> {
    if method.is_empty() && salt.is_empty() {
        return Ok(None);
    }
    let e = provisioner::encryption::Encryption {
        method: method.parse().map_err(|_| {
            Error::Internal(format!("the source sent an unknown encryption {method:?}"))
        })?,
        key_salt: salt.to_string(),
    };
    if e.salt_bytes().is_none() {
        return Err(Error::Internal(
            "the source sent a malformed key salt for an encrypted volume".into(),
        ));
    }
    Ok(Some(e))
}
