//! The source side of a transfer between nodes: the image to stream for a snapshot or volume
//! ID. A snapshot's image is immutable and is read through an open descriptor (a
//! DeleteSnapshot meanwhile unlinks it without disturbing the stream). A volume is first copied
//! into a hidden temporary snapshot, taken as CreateSnapshot takes one (quiesced: frozen and
//! consistent when it is mounted), streamed, and removed when the stream ends.
//!
//! The temporary snapshot lives in the pool's `tmp/` as `xfer-<transfer id>.img`: its lease is
//! the stream's life in this process (the guard removes it when the stream ends, however it
//! ends), and the start-up repair clears `tmp/`, so one left by a killed process never
//! outlives the next start. It is not a snapshot record: no CO ever sees it.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::error::IoContext;
use crate::extents::Range;
use crate::ids::{Kind, VolumeId};
use crate::pool::{copy_quiesced, snapshot_lock_key, Quiesce};
use crate::record::ContentSource;
use crate::transfer::{reader, Header};
use crate::{Pool, PoolError};

/// An image open for streaming, with its header and data ranges.
pub struct SourceImage {
    pub file: File,
    pub header: Header,
    pub ranges: Vec<Range>,
    temp: Option<PathBuf>,
}

impl Drop for SourceImage {
    fn drop(&mut self) {
        if let Some(p) = self.temp.take() {
            let _ = std::fs::remove_file(&p);
            tracing::debug!(path = %p.display(), "temporary transfer snapshot removed");
        }
    }
}

impl Pool {
    /// Open `source` (an object of this pool) for a transfer named `transfer_id`.
    pub fn transfer_source(
        &self,
        source: &ContentSource,
        transfer_id: &str,
        quiesce: Quiesce<'_>,
    ) -> Result<SourceImage, PoolError> {
        if !crate::transfer::valid_id(transfer_id) {
            return Err(PoolError::InvalidArgument(format!(
                "{transfer_id:?} is not a transfer ID"
            )));
        }
        let (file, size_bytes, fs_type, encryption, temp) = match source {
            ContentSource::Snapshot(id) => {
                let snap = self.get_snapshot(id)?;
                let hex = VolumeId::parse(Kind::Snapshot, id)
                    .map(|v| v.hex)
                    .unwrap_or_default();
                let _held = self.locks.lock(&snapshot_lock_key(&hex));
                let path = self.snapshot_image_path(&hex);
                let f = File::open(&path).ctx(|| format!("open {}", path.display()))?;
                (
                    f,
                    snap.size_bytes,
                    snap.fs_type,
                    snap.encryption.clone(),
                    None,
                )
            }
            ContentSource::Volume(id) => {
                let vid = self.parse_volume_id(id)?.ok_or_else(|| {
                    PoolError::NotFound(format!("volume {id} does not exist on this node"))
                })?;
                let _held = self.lock_volume(&vid.hex);
                let vol = self.get(id)?;
                let from_path = self.image_path(&vid.hex);
                let from =
                    File::open(&from_path).ctx(|| format!("open {}", from_path.display()))?;
                let tmp = self.dir.join("tmp").join(format!("xfer-{transfer_id}.img"));
                let guard = TempFile(Some(tmp.clone()));
                let dst = File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .ctx(|| format!("create {}", tmp.display()))?;
                self.ensure_room_for_copy(&from_path, true)?;
                copy_quiesced(
                    quiesce,
                    Some(&vol),
                    &from,
                    &dst,
                    "copy the volume into a temporary transfer snapshot",
                )?;
                (
                    dst,
                    vol.size_bytes,
                    vol.fs_type,
                    vol.encryption.clone(),
                    guard.keep(),
                )
            }
        };
        let image_bytes = file
            .metadata()
            .ctx(|| "stat the source image".into())?
            .len();
        let (ranges, data_bytes) =
            reader::data_of(&file, image_bytes).ctx(|| "map the source image".into())?;
        Ok(SourceImage {
            file,
            header: Header {
                image_bytes,
                size_bytes,
                fs_type,
                data_bytes,
                encryption,
                // The driver sets what its peer asked for before the first chunk.
                digest: Default::default(),
            },
            ranges,
            temp,
        })
    }
}

/// Removes a temporary file on an error path; `keep` hands the path on.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
