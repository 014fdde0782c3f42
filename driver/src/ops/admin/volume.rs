//! `loopvol volume inspect <id>`: one volume's record, image and node state, read without the
//! pool's lock.

use std::path::{Path, PathBuf};

use crate::datapath::default_path;
use anyhow::anyhow;
use provisioner::ids::Kind;
use provisioner::listing;
use provisioner::{VolumeId, VolumeRecord};
use serde::Serialize;

use super::status::{loop_view, staged_view, volumes_by_file, yes_no, LoopView, StagedView};
use super::{print_json, Output};
use crate::node_state;
use crate::shared::units::bytes;

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub record: VolumeRecord,
    /// The pool named in the ID (`default` for the short form).
    pub pool: String,
    /// `record.created_unix` as RFC 3339.
    pub created: String,
    pub image: PathBuf,
    pub image_present: bool,
    /// Bytes the image occupies on disk (less than the size for a thin volume).
    pub allocated_bytes: Option<u64>,
    /// This node's staging record, checked against the kernel; `None` when not staged here.
    pub staged: Option<StagedView>,
    pub loop_devices: Vec<LoopView>,
    /// Snapshots taken of this volume.
    pub snapshots: Vec<String>,
}

pub fn inspect(pool_dir: &Path, id: &str, output: Output) -> anyhow::Result<()> {
    let i = collect(pool_dir, id)?;
    match output {
        Output::Json => print_json(&i),
        Output::Table => {
            print_table(&i);
            Ok(())
        }
    }
}

/// `id_or_name` is a volume ID or a volume's name: names are unique in a pool and an ID's hex
/// part is derived from the name alone (`VolumeId::from_name`), so a name finds its record
/// the same way an ID does, whichever node the pool serves as.
pub fn collect(pool_dir: &Path, id_or_name: &str) -> anyhow::Result<Inspection> {
    let l = listing::read_records(pool_dir)?;
    let v = match VolumeId::parse(Kind::Volume, id_or_name) {
        Some(vid) => l.volume(&vid.hex).filter(|v| v.record.id == id_or_name),
        None => {
            let hex = VolumeId::from_name(Kind::Volume, id_or_name, "").hex;
            l.volume(&hex).filter(|v| v.record.name == id_or_name)
        }
    }
    .ok_or_else(|| {
        anyhow!(
            "no volume with the ID or name {id_or_name:?} in {}",
            pool_dir.display()
        )
    })?;
    let id = v.record.id.as_str();
    let staged = node_state::load(&pool_dir.join("node"), &v.hex)
        .map_err(|e| anyhow!("{e}"))?
        .map(|s| staged_view(&l, &pool_dir.join("node"), &v.hex, s));
    Ok(Inspection {
        record: v.record.clone(),
        pool: super::output::pool_of(id),
        created: super::output::rfc3339(v.record.created_unix),
        image: v.image.clone(),
        image_present: v.image.exists(),
        allocated_bytes: v.allocated_bytes(),
        staged,
        loop_devices: {
            let by_file = volumes_by_file(&l);
            default_path()
                .find_all(&v.image)
                .into_iter()
                .map(|li| loop_view(&by_file, li))
                .collect()
        },
        snapshots: l
            .snapshots
            .iter()
            .filter(|s| s.record.source_volume_id == id)
            .map(|s| s.record.id.clone())
            .collect(),
    })
}

fn print_table(i: &Inspection) {
    let r = &i.record;
    println!("id           {}", r.id);
    println!("name         {}", r.name);
    println!("pool         {}", i.pool);
    println!(
        "size         {} ({} bytes)",
        bytes(r.size_bytes),
        r.size_bytes
    );
    println!("filesystem   {}", r.fs_label());
    println!("allocation   {}", r.allocation.as_str());
    println!("encryption   {}", r.encryption_label());
    println!("io limits    {}", r.io_limits.describe());
    println!("created      {}", super::output::rfc3339(r.created_unix));
    if let Some(src) = &r.source {
        println!("source       {src}");
    }
    match (i.image_present, i.allocated_bytes) {
        (true, Some(a)) => println!(
            "image        {} ({} allocated)",
            i.image.display(),
            bytes(a)
        ),
        _ => println!("image        {} MISSING", i.image.display()),
    }
    match &i.staged {
        Some(s) => println!(
            "staged       {} at {} ({}, read-only {})",
            s.summary(),
            s.staging_path.display(),
            s.access,
            yes_no(s.read_only)
        ),
        None => println!("staged       no"),
    }
    for d in &i.loop_devices {
        println!(
            "loop device  {} (direct I/O {}, read-only {})",
            d.device.display(),
            yes_no(d.direct_io),
            yes_no(d.read_only)
        );
    }
    for s in &i.snapshots {
        println!("snapshot     {s}");
    }
}
