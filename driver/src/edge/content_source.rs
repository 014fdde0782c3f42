//! Content sources between their CSI form and the pool's record form.

use provisioner::record::ContentSource;

use crate::csi::*;
use crate::error::{required, Error, Result};

/// The record's source as CSI reports it.
pub fn content_source(s: &ContentSource) -> VolumeContentSource {
    use volume_content_source::{SnapshotSource, Type, VolumeSource};
    VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    }
}

/// A request's source, its ID required.
pub fn source_of(s: &VolumeContentSource) -> Result<ContentSource> {
    use volume_content_source::Type;
    match &s.r#type {
        Some(Type::Snapshot(snap)) => Ok(ContentSource::Snapshot(
            required(
                "volume_content_source.snapshot.snapshot_id",
                &snap.snapshot_id,
            )?
            .to_string(),
        )),
        Some(Type::Volume(v)) => Ok(ContentSource::Volume(
            required("volume_content_source.volume.volume_id", &v.volume_id)?.to_string(),
        )),
        None => Err(Error::InvalidArgument(
            "volume_content_source names neither a snapshot nor a volume".into(),
        )),
    }
}
