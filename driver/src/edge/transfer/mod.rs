//! The transfer service (`loopvol.transfer.v1.Transfer`, proto/transfer.proto): how a node
//! restoring or cloning a volume from another node's snapshot or volume pulls the data. This
//! file is the source side (`Read`); `sink` runs the receiving job, `client` opens the stream.
//! Served on the pool API's mTLS port only, so only a peer holding a certificate of the
//! cluster's CA can read an image.

pub mod client;
pub mod sink;

use std::pin::Pin;
use std::sync::Arc;

use provisioner::record::ContentSource;
use provisioner::transfer::{self, Chunk, ChunkDigest, Header, Trailer};
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::state::Driver;
use crate::transfer_api::transfer_server::Transfer;
use crate::transfer_api::{self as api, read_response::Frame};

/// The CreateVolume parameter by which the router tells the target node where the content
/// source's node serves its pool API. Reserved: accepted only over the pool API (from an
/// mTLS peer), refused on the CSI socket and refused by the router in incoming requests, so a
/// StorageClass can never set it.
pub const SOURCE_ENDPOINT_PARAM: &str = "loopvol.csi.dev/transfer-source";

/// Take the reserved [`SOURCE_ENDPOINT_PARAM`] out of `parameters` (the StorageClass parser
/// refuses keys it does not know): `Some(endpoint)` on the pool API, INVALID_ARGUMENT anywhere
/// else.
pub fn take_endpoint(
    parameters: &mut std::collections::HashMap<String, String>,
    peer: bool,
) -> Result<Option<String>> {
    let Some(ep) = parameters.remove(SOURCE_ENDPOINT_PARAM) else {
        return Ok(None);
    };
    if !peer {
        return Err(Error::InvalidArgument(format!(
            "parameter {SOURCE_ENDPOINT_PARAM} is reserved for loopvol's router"
        )));
    }
    if !ep.starts_with("https://") {
        return Err(Error::InvalidArgument(format!(
            "{SOURCE_ENDPOINT_PARAM} must be an https:// pool API endpoint"
        )));
    }
    Ok(Some(ep))
}

/// Chunks buffered between the reading thread and the network: a few 4 MiB messages.
const IN_FLIGHT: usize = 4;

pub type ReadStream =
    Pin<Box<dyn futures::Stream<Item = Result<api::ReadResponse, Status>> + Send>>;

pub struct TransferService {
    driver: Arc<Driver>,
}

impl TransferService {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }
}

/// What a snapshot or volume ID names, as a content source.
fn source_of_id(id: &str) -> Result<ContentSource> {
    if id.starts_with("snap-") {
        Ok(ContentSource::Snapshot(id.to_string()))
    } else if id.starts_with("vol-") {
        Ok(ContentSource::Volume(id.to_string()))
    } else {
        Err(Error::InvalidArgument(format!(
            "{} is neither a loopvol snapshot nor a volume ID",
            crate::shared::logsafe::text(id)
        )))
    }
}

pub fn header_msg(h: &Header) -> api::ReadResponse {
    api::ReadResponse {
        frame: Some(Frame::Header(api::Header {
            image_bytes: h.image_bytes,
            size_bytes: h.size_bytes,
            fs_type: h.fs_type.to_string(),
            data_bytes: h.data_bytes,
            encryption: (h.encryption.as_ref())
                .map(|e| e.method.to_string())
                .unwrap_or_default(),
            key_salt: (h.encryption.as_ref())
                .map(|e| e.key_salt.clone())
                .unwrap_or_default(),
            digest: h.digest.as_str().to_string(),
        })),
    }
}

fn chunk_msg(c: Chunk) -> api::ReadResponse {
    api::ReadResponse {
        frame: Some(Frame::Chunk(api::Chunk {
            offset: c.offset,
            data: c.data,
            digest: c.digest.as_bytes().to_vec(),
        })),
    }
}

fn trailer_msg(t: &Trailer) -> api::ReadResponse {
    api::ReadResponse {
        frame: Some(Frame::Trailer(api::Trailer {
            digest: t.digest.to_vec(),
            chunks: t.chunks,
            data_bytes: t.data_bytes,
        })),
    }
}

#[tonic::async_trait]
impl Transfer for TransferService {
    type ReadStream = ReadStream;

    #[tracing::instrument(skip_all, name = "TransferRead", fields(source = %crate::shared::logsafe::text(&req.get_ref().source_id), transfer_id = %crate::shared::logsafe::text(&req.get_ref().transfer_id)))]
    async fn read(
        &self,
        req: Request<api::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let req = req.into_inner();
        let source = source_of_id(crate::error::required("source_id", &req.source_id)?)?;
        let transfer_id = req.transfer_id;
        let digest = ChunkDigest::choose(req.digests.iter().map(String::as_str));
        let mut image = self
            .driver
            .blocking(move |d| {
                let quiesce =
                    |r: &provisioner::VolumeRecord| crate::edge::controller::quiesce(d, r);
                Ok(d.pools.transfer_source(&source, &transfer_id, &quiesce)?)
            })
            .await?;
        image.header.digest = digest;
        let corrupt = self.driver.transfer.corrupt_chunk;
        let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
        tx.send(Ok(header_msg(&image.header)))
            .await
            .map_err(|_| Status::cancelled("the reader went away"))?;
        tokio::task::spawn_blocking(move || {
            let mut n = 0u64;
            let sent = transfer::read_image(
                &image.file,
                image.header.image_bytes,
                &image.ranges,
                image.header.digest,
                &mut |mut c| {
                    // Test-only fault injection (`--test-corrupt-transfer-chunk`): a byte
                    // flipped after the chunk was digested, as a bad link would.
                    if corrupt == Some(n) {
                        let mut data = c.data.to_vec();
                        data[0] ^= 0xff;
                        c.data = data.into();
                    }
                    n += 1;
                    tx.blocking_send(Ok(chunk_msg(c)))
                        .map_err(|_| std::io::Error::other("the reader went away"))
                },
            );
            match sent {
                Ok(t) => {
                    let _ = tx.blocking_send(Ok(trailer_msg(&t)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "transfer stream stopped");
                    let _ = tx.blocking_send(Err(Status::unavailable(format!(
                        "reading the source failed: {e}"
                    ))));
                }
            }
            // `image` drops here: a temporary snapshot of a volume source is removed.
            drop(image);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The router's endpoint parameter is taken only from a pool API peer, and never left
    /// for the StorageClass parser.
    #[test]
    fn the_endpoint_parameter_is_reserved_for_the_pool_api() {
        let with = |v: &str| HashMap::from([(SOURCE_ENDPOINT_PARAM.to_string(), v.to_string())]);
        let mut p = with("https://10.0.0.3:9820");
        assert_eq!(
            take_endpoint(&mut p, true).unwrap().as_deref(),
            Some("https://10.0.0.3:9820")
        );
        assert!(p.is_empty());
        let e = take_endpoint(&mut with("https://10.0.0.3:9820"), false).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = take_endpoint(&mut with("http://10.0.0.3:9820"), true).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(take_endpoint(&mut HashMap::new(), false).unwrap(), None);
    }
}
