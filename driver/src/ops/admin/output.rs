//! Output for people and scripts, after kubectl's conventions: aligned columns with a header,
//! human sizes, RFC 3339 times, and `--output json|yaml|wide`.

use std::path::Path;

use serde::Serialize;

use crate::ops::pool_args::PoolArgs;
use crate::shared::units::bytes;

/// `--output` of list commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ListOutput {
    /// Aligned columns with human sizes.
    #[default]
    Table,
    /// The table with more columns (bytes on disk, creation time, source).
    Wide,
    /// One JSON document, sizes in bytes.
    Json,
    /// The same as YAML.
    Yaml,
}

/// Columns padded to their widest cell, three spaces apart (as kubectl prints).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, (c, w)) in cells.into_iter().zip(&widths).enumerate() {
            s.push_str(c);
            if i + 1 < n {
                s.push_str(&" ".repeat(w - c.chars().count() + 3));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Seconds since the epoch as RFC 3339 in UTC, e.g. `2026-12-01T18:46:03Z`.
pub fn rfc3339(unix_seconds: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds.min(i64::MAX as u64) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_seconds.to_string())
}

pub fn print(value: &impl Serialize, output: ListOutput) -> anyhow::Result<bool> {
    match output {
        ListOutput::Json => println!("{}", serde_json::to_string_pretty(value)?),
        ListOutput::Yaml => print!("{}", serde_norway::to_string(value)?),
        _ => return Ok(false),
    }
    Ok(true)
}

/// The pool a volume belongs to, from its ID (`vol-<hex>~<pool>@node`; the short form is the
/// pool `default`): a directory does not know the name the driver serves it under.
pub fn pool_of(volume_id: &str) -> String {
    provisioner::VolumeId::parse(provisioner::ids::Kind::Volume, volume_id)
        .map(|v| v.pool_name().to_string())
        .unwrap_or_else(|| provisioner::ids::DEFAULT_POOL.to_string())
}

#[derive(Serialize)]
struct ListedVolume<'a> {
    #[serde(flatten)]
    record: &'a provisioner::VolumeRecord,
    /// The pool named in the ID (`default` for the short form).
    pool: String,
    created: String,
    allocated_bytes: Option<u64>,
    /// On this node: staged, published, frozen... as `status` says it; `-` when not staged.
    state: String,
}

/// `loopvol volume list`: reads the records without the pool's lock, so it also works while a
/// driver serves the pool.
pub fn volume_list(pool: &PoolArgs, output: ListOutput) -> anyhow::Result<()> {
    volume_list_in(&pool.pool_dir, output)
}

fn volume_list_in(dir: &Path, output: ListOutput) -> anyhow::Result<()> {
    let listing = provisioner::listing::read_records(dir)?;
    let filling = provisioner::pool::transfers::filling(dir);
    let items: Vec<ListedVolume> = listing
        .volumes
        .iter()
        .map(|v| ListedVolume {
            record: &v.record,
            pool: pool_of(&v.record.id),
            created: rfc3339(v.record.created_unix),
            allocated_bytes: v.allocated_bytes(),
            state: super::status::volume_state(&listing, &dir.join("node"), &v.hex),
        })
        // Volumes a restore or clone from another node is still filling.
        .chain(filling.iter().map(|f| ListedVolume {
            record: &f.record.volume,
            pool: pool_of(&f.record.volume.id),
            created: rfc3339(f.record.volume.created_unix),
            allocated_bytes: Some(f.allocated_bytes),
            state: super::status::filling_state(f),
        }))
        .collect();
    if print(&serde_json::json!({ "volumes": items }), output)? {
        return Ok(());
    }
    let wide = output == ListOutput::Wide;
    let mut header = vec!["ID", "NAME", "POOL", "SIZE", "FS", "ALLOCATION", "STATE"];
    if wide {
        header.extend(["ON DISK", "CREATED", "SOURCE"]);
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|v| {
            let r = v.record;
            let mut row = vec![
                r.id.clone(),
                r.name.clone(),
                v.pool.clone(),
                bytes(r.size_bytes),
                r.fs_label(),
                r.allocation.as_str().to_string(),
                v.state.clone(),
            ];
            if wide {
                row.push(v.allocated_bytes.map(bytes).unwrap_or_else(|| "-".into()));
                row.push(v.created.clone());
                row.push(match &r.source {
                    Some(s) => s.to_string(),
                    None => "-".into(),
                });
            }
            row
        })
        .collect();
    if rows.is_empty() {
        eprintln!("no volumes in {}", dir.display());
        return Ok(());
    }
    print!("{}", table(&header, &rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let t = table(
            &["ID", "SIZE"],
            &[
                vec!["vol-1".into(), "1.0 GiB".into()],
                vec!["v".into(), "10.0 GiB".into()],
            ],
        );
        assert_eq!(t, "ID      SIZE\nvol-1   1.0 GiB\nv       10.0 GiB\n");
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_614_763), "2025-12-01T18:46:03Z");
    }

    #[test]
    fn the_pool_comes_from_the_id() {
        assert_eq!(pool_of("vol-0123456789abcdef0123~fast@n1"), "fast");
        assert_eq!(pool_of("vol-0123456789abcdef0123@n1"), "default");
    }
}
