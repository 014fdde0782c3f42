//! Start-up repair: what a crash left behind in `tmp/`, `volumes/` and `snapshots/`.

use super::*;

pub(super) fn clear_tmp(dir: &Path, repairs: &mut Vec<String>) -> Result<(), PoolError> {
    let tmp = dir.join("tmp");
    for e in fs::read_dir(&tmp)
        .ctx(|| format!("read {}", tmp.display()))?
        .flatten()
    {
        let p = e.path();
        if fs::remove_file(&p).is_ok() {
            repairs.push(format!("removed unfinished image {}", p.display()));
        }
    }
    Ok(())
}

/// Read every record of a directory (volumes or snapshots) and bring it back to the invariant
/// "record ⇔ object, image ⇔ record", describing each repair in `repairs`.
pub(super) fn load_dir<T: serde::de::DeserializeOwned>(
    dir: &Path,
    in_use: &crate::InUse,
    repairs: &mut Vec<String>,
) -> Result<BTreeMap<String, T>, PoolError> {
    let mut records = BTreeMap::new();
    let mut images = Vec::new();
    let mut digests = Vec::new();
    for e in fs::read_dir(dir)
        .ctx(|| format!("read {}", dir.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if atomic::is_temp_name(&name) {
            let _ = fs::remove_file(&path);
            repairs.push(format!(
                "removed interrupted record write {}",
                path.display()
            ));
        } else if let Some(stem) = name.strip_suffix(".json").filter(|s| is_hex_name(s)) {
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => {
                    records.insert(stem.to_string(), r);
                }
                Err(err) => {
                    // Atomic writes make this impossible short of disk corruption or a hand
                    // edit; keep the bytes for a human instead of deleting data.
                    let q = dir.join(format!("{name}.corrupt"));
                    fs::rename(&path, &q).ctx(|| format!("quarantine {}", path.display()))?;
                    repairs.push(format!(
                        "unreadable record {} moved to {} ({err})",
                        path.display(),
                        q.display()
                    ));
                }
            }
        } else if let Some(stem) = name.strip_suffix(".img").filter(|s| is_hex_name(s)) {
            images.push(stem.to_string());
        } else if let Some(stem) = name.strip_suffix(".chunks").filter(|s| is_hex_name(s)) {
            digests.push(stem.to_string());
        }
    }
    // Chunk digests (snapshot_metadata.rs) are written before their snapshot's record.
    for hex in digests.iter().filter(|h| !records.contains_key(*h)) {
        let p = dir.join(format!("{hex}.chunks"));
        fs::remove_file(&p).ctx(|| format!("remove orphan {}", p.display()))?;
        repairs.push(format!(
            "removed orphan chunk digests {} (no record: interrupted snapshot or delete)",
            p.display()
        ));
    }
    for hex in images {
        if !records.contains_key(&hex) {
            let p = dir.join(format!("{hex}.img"));
            if in_use.user_of(&p).is_none() {
                fs::remove_file(&p).ctx(|| format!("remove orphan {}", p.display()))?;
                repairs.push(format!(
                    "removed orphan image {} (no record: unacknowledged create or interrupted delete)",
                    p.display()
                ));
            } else {
                repairs.push(format!(
                    "orphan image {} is attached to a loop device; left in place",
                    p.display()
                ));
            }
        }
    }
    for hex in records.keys() {
        if !dir.join(format!("{hex}.img")).exists() {
            repairs.push(format!(
                "record {hex} in {} has no backing file; it is reported unhealthy",
                dir.display()
            ));
        }
    }
    atomic::sync_dir(dir).ctx(|| format!("fsync {}", dir.display()))?;
    Ok(records)
}
