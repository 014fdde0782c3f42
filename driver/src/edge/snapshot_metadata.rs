//! CSI SnapshotMetadata over the local pool: the allocated ranges of a snapshot and the ranges
//! that changed between two, for incremental backups (external-snapshot-metadata).
//!
//! Ranges are VARIABLE_LENGTH: they are the images' own extents (or runs of changed 1 MiB
//! chunks), merged where they touch, so a volume with a few large changes streams a few
//! ranges instead of one tuple per block, and a backup tool reads each range in one request.

use std::pin::Pin;
use std::sync::Arc;

use provisioner::extents::{self, Range};
use provisioner::ids::Kind;
use tonic::{Request, Response, Status};

use crate::csi::snapshot_metadata_server::SnapshotMetadata;
use crate::csi::*;
use crate::error::{required, Error, Result};
use crate::state::Driver;

/// Ranges per message when the client leaves `max_results` at 0: 16 bytes each on the wire,
/// so a message stays near 16 KiB.
pub const DEFAULT_MAX_RESULTS: usize = 1024;

pub type MetadataStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

pub struct SnapshotMetadataService {
    driver: Arc<Driver>,
}

impl SnapshotMetadataService {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }
}

/// Check the resume point and page size; `capacity` is the snapshot's size. An offset beyond
/// the end is OUT_OF_RANGE, as the spec says; an offset right at the end is an empty stream.
pub fn paginate(
    capacity: u64,
    ranges: &[Range],
    starting_offset: i64,
    max_results: i32,
) -> Result<Vec<Vec<BlockMetadata>>> {
    if max_results < 0 {
        return Err(Error::InvalidArgument(format!(
            "max_results must not be negative, got {max_results}"
        )));
    }
    if starting_offset < 0 || starting_offset as u64 > capacity {
        return Err(Error::OutOfRange(format!(
            "starting_offset {starting_offset} is outside the snapshot's {capacity} bytes"
        )));
    }
    let per = if max_results == 0 {
        DEFAULT_MAX_RESULTS
    } else {
        max_results as usize
    };
    let blocks: Vec<BlockMetadata> = extents::from_offset(ranges, starting_offset as u64)
        .into_iter()
        .map(|r| BlockMetadata {
            byte_offset: r.offset as i64,
            size_bytes: r.len as i64,
        })
        .collect();
    if blocks.is_empty() {
        // One empty message still tells the client the volume's capacity.
        return Ok(vec![Vec::new()]);
    }
    Ok(blocks.chunks(per).map(<[_]>::to_vec).collect())
}

/// The stream both RPCs answer with: `ranges` paginated from `starting_offset`, each page
/// made into a response by `message(volume_capacity_bytes, block_metadata)`.
fn respond<T: Send + 'static>(
    capacity: u64,
    ranges: &[Range],
    starting_offset: i64,
    max_results: i32,
    message: impl Fn(i64, Vec<BlockMetadata>) -> T,
) -> std::result::Result<Response<MetadataStream<T>>, Status> {
    let pages = paginate(capacity, ranges, starting_offset, max_results)?;
    let messages: Vec<T> = pages
        .into_iter()
        .map(|page| message(capacity as i64, page))
        .collect();
    Ok(Response::new(Box::pin(futures::stream::iter(
        messages.into_iter().map(Ok),
    ))))
}

#[tonic::async_trait]
impl SnapshotMetadata for SnapshotMetadataService {
    type GetMetadataAllocatedStream = MetadataStream<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = MetadataStream<GetMetadataDeltaResponse>;

    #[tracing::instrument(skip_all, name = "GetMetadataAllocated", fields(snapshot_id = %req.get_ref().snapshot_id))]
    async fn get_metadata_allocated(
        &self,
        req: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = req.into_inner();
        let id = required("snapshot_id", &req.snapshot_id)?.to_string();
        let map = self
            .driver
            .blocking(move |d| {
                Ok(d.pools
                    .for_id(Kind::Snapshot, &id)?
                    .snapshot_allocated(&id)?)
            })
            .await?;
        respond(
            map.capacity,
            &map.ranges,
            req.starting_offset,
            req.max_results,
            |volume_capacity_bytes, block_metadata| GetMetadataAllocatedResponse {
                block_metadata_type: BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes,
                block_metadata,
            },
        )
    }

    #[tracing::instrument(skip_all, name = "GetMetadataDelta", fields(
        base = %req.get_ref().base_snapshot_id, target = %req.get_ref().target_snapshot_id))]
    async fn get_metadata_delta(
        &self,
        req: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = req.into_inner();
        let base = required("base_snapshot_id", &req.base_snapshot_id)?.to_string();
        let target = required("target_snapshot_id", &req.target_snapshot_id)?.to_string();
        let started = std::time::Instant::now();
        let (map, method) = self
            .driver
            .blocking(move |d| {
                let pool = d.pools.for_id(Kind::Snapshot, &target)?;
                Ok(pool.snapshot_delta(&base, &target)?)
            })
            .await?;
        let changed: u64 = map.ranges.iter().map(|r| r.len).sum();
        tracing::info!(
            method = method.as_str(),
            ranges = map.ranges.len(),
            changed_bytes = changed,
            capacity = map.capacity,
            ms = started.elapsed().as_millis() as u64,
            "delta computed"
        );
        respond(
            map.capacity,
            &map.ranges,
            req.starting_offset,
            req.max_results,
            |volume_capacity_bytes, block_metadata| GetMetadataDeltaResponse {
                block_metadata_type: BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes,
                block_metadata,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn pages_resume_and_refuse_bad_bounds() {
        let r = [
            Range { offset: 0, len: 10 },
            Range {
                offset: 20,
                len: 10,
            },
            Range {
                offset: 40,
                len: 10,
            },
        ];
        let p = paginate(100, &r, 0, 2).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1][0].byte_offset, 40);
        let p = paginate(100, &r, 25, 0).unwrap();
        assert_eq!(p[0][0].byte_offset, 25);
        assert_eq!(p[0][0].size_bytes, 5);
        assert!(paginate(100, &r, 100, 0).unwrap()[0].is_empty());
        let code = |e: Error| Status::from(e).code();
        assert_eq!(
            code(paginate(100, &r, 101, 0).unwrap_err()),
            Code::OutOfRange
        );
        assert_eq!(
            code(paginate(100, &r, -1, 0).unwrap_err()),
            Code::OutOfRange
        );
        assert_eq!(
            code(paginate(100, &r, 0, -1).unwrap_err()),
            Code::InvalidArgument
        );
    }
}
