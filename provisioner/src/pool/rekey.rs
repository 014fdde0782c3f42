//! Moving a pool to another node ID on purpose (`loopvol pool set-node-id`): every volume,
//! snapshot and group snapshot record, and every ID a record names (content sources, snapshot
//! sources, group members), is rewritten from `<kind>-<hex>@<old>` to `<kind>-<hex>@<new>`.
//! File names derive from the hex part only, so no image moves. Names stay as they are: a
//! name is what its hex was derived from (a group member's internal name embeds its source's
//! old ID, harmlessly: no request can name a member).
//!
//! Crash rules (finishable after kill -9 at any instant, by running it again):
//! 1. The intent `<pool>/.node-id.rekey` (from, to, and every ID that changes) is written
//!    atomically before any record changes; every opener refuses the pool while it exists
//!    ([`super::identity::identity`]), so no process serves a half re-keyed pool.
//! 2. Each changed record is written to a temp file, all are made durable together (syncfs),
//!    and each is renamed over its record. Rewriting is idempotent (an ID already on the new
//!    node stays as it is), so a second run redoes what the first did not get to.
//! 3. `.node-id` is written, then the intent is removed: the commit point.
//!
//! It runs with the pool's two locks held (no driver serves the pool meanwhile) and refuses
//! while the node uses any volume: a staged volume would be unstaged by the kubelet under its
//! old ID, which the pool no longer answers for.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::identity::{self, record_files, record_ids, write_node_id_file, RECORD_DIRS};
use super::{take_lock, to_json};
use crate::atomic;
use crate::error::IoContext;
use crate::group_snapshot::GroupRecord;
use crate::ids::{self, Kind, VolumeId};
use crate::record::{ContentSource, SnapshotRecord, VolumeRecord};
use crate::PoolError;

/// The plan of a re-key, kept as its journal until it is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The node IDs the pool's objects had (one, unless an earlier mistake mixed them).
    pub from: Vec<String>,
    pub to: String,
    /// Every object whose ID changes, in kind then ID order.
    pub ids: Vec<Renamed>,
}

/// One object's old and new ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renamed {
    /// `volume`, `snapshot` or `group`.
    pub kind: String,
    pub old: String,
    pub new: String,
}

/// What [`set_node_id`] did.
#[derive(Debug, Clone)]
pub struct Report {
    pub plan: Plan,
    /// An interrupted earlier run was finished.
    pub resumed: bool,
    /// Record files that did not parse and so keep their old IDs (start-up repair of the
    /// serving driver quarantines them).
    pub unreadable: Vec<PathBuf>,
}

/// Called after each record is rewritten, with its path (the driver's crash test hook).
pub type Progress<'a> = &'a mut dyn FnMut(&Path);

/// Give the pool at `dir` to node `to`, or finish an interrupted run that was doing so.
/// `in_use` answers whether a volume is staged or attached on this node (`Some(why)`); any
/// such volume refuses the whole operation, before anything changes.
pub fn set_node_id(
    dir: &Path,
    to: &str,
    in_use: &dyn Fn(&str) -> Option<String>,
    progress: Progress,
) -> Result<Report, PoolError> {
    ids::validate_node_id(to)?;
    if !dir.join("volumes").is_dir() {
        return Err(PoolError::InvalidArgument(format!(
            "{} is not a loopvol pool (it has no volumes/ directory)",
            dir.display()
        )));
    }
    let _locks = [take_lock(dir, ".lock")?, take_lock(dir, ".node.lock")?];
    let busy: Vec<String> = record_files(&dir.join("volumes"))?
        .iter()
        .filter_map(|p| p.file_stem()?.to_str().map(str::to_string))
        .filter_map(|hex| in_use(&hex).map(|why| format!("{hex} ({why})")))
        .collect();
    if !busy.is_empty() {
        return Err(PoolError::FailedPrecondition(format!(
            "volumes of {} are in use on this node: {}; their PersistentVolumes name the old IDs, \
             so drain the node (unstage them) before changing its node ID",
            dir.display(),
            busy.join(", ")
        )));
    }
    let (plan, resumed) = match read_intent(dir)? {
        Some(plan) if plan.to != to => {
            return Err(PoolError::FailedPrecondition(format!(
                "the pool {} is half-way through a move to node {:?}: finish that first with \
                 `loopvol pool set-node-id --pool-dir {} {}`",
                dir.display(),
                plan.to,
                dir.display(),
                plan.to
            )))
        }
        Some(plan) => (plan, true),
        None => (plan(dir, to)?, false),
    };
    let mut report = Report {
        plan,
        resumed,
        unreadable: Vec::new(),
    };
    let done = identity::identity(dir).is_ok_and(|i| i.recorded.as_deref() == Some(to));
    if !resumed && report.plan.ids.is_empty() && done {
        return Ok(report);
    }
    if !resumed {
        let path = intent_path(dir);
        atomic::write_file(&path, &to_json(&report.plan))
            .ctx(|| format!("write {}", path.display()))?;
    }
    // Every changed record is first written beside itself, then one syncfs makes them all
    // durable (one journal commit instead of one per record: 5000 records take 6 s so, 45 s
    // with an fsync each, on a 2-core VM's ext4), then each is renamed into place. A crash leaves temp files, which the next
    // run overwrites and a serving driver's start-up repair removes.
    let mut pending = Vec::new();
    for (kind, sub) in RECORD_DIRS {
        for path in record_files(&dir.join(sub))? {
            let rendered = match kind {
                Kind::Volume => render::<VolumeRecord>(&path, to, rekey_volume),
                Kind::Snapshot => render::<SnapshotRecord>(&path, to, rekey_snapshot),
                Kind::Group => render::<GroupRecord>(&path, to, rekey_group),
            };
            match rendered {
                None => report.unreadable.push(path),
                Some(Some(bytes)) => {
                    let tmp = temp_path(&path);
                    fs::write(&tmp, bytes).ctx(|| format!("write {}", tmp.display()))?;
                    pending.push((tmp, path));
                }
                Some(None) => {}
            }
        }
    }
    let root = fs::File::open(dir).ctx(|| format!("open {}", dir.display()))?;
    nix::unistd::syncfs(&root).ctx(|| format!("syncfs {}", dir.display()))?;
    for (tmp, path) in &pending {
        fs::rename(tmp, path).ctx(|| format!("rename {}", tmp.display()))?;
        progress(path);
    }
    for (_, sub) in RECORD_DIRS {
        let d = dir.join(sub);
        if d.is_dir() {
            atomic::sync_dir(&d).ctx(|| format!("fsync {}", d.display()))?;
        }
    }
    write_node_id_file(dir, to)?;
    let path = intent_path(dir);
    atomic::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
    Ok(report)
}

/// The journal of an unfinished re-key, if there is one.
pub fn read_intent(dir: &Path) -> Result<Option<Plan>, PoolError> {
    let path = intent_path(dir);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            PoolError::FailedPrecondition(format!(
                "{} is unreadable ({e}); it journals an unfinished `loopvol pool set-node-id`",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PoolError::io(format!("read {}", path.display()), e)),
    }
}

fn intent_path(dir: &Path) -> PathBuf {
    dir.join(identity::REKEY_INTENT_FILE)
}

/// What a fresh run will do: read every record's own ID (the references follow from them).
fn plan(dir: &Path, to: &str) -> Result<Plan, PoolError> {
    let mut from = std::collections::BTreeSet::new();
    if let Ok(s) = fs::read_to_string(identity::node_id_path(dir)) {
        from.insert(s.trim().to_string());
    }
    let mut ids = Vec::new();
    for (id, v) in record_ids(dir)? {
        from.insert(v.node.clone());
        if v.node != to {
            ids.push(Renamed {
                kind: kind_name(v.kind).into(),
                new: rekey_id(v.kind, &id, to),
                old: id,
            });
        }
    }
    // Kinds in RECORD_DIRS order (as read), IDs sorted within each kind.
    let rank = |k: &str| {
        RECORD_DIRS
            .iter()
            .position(|(kind, _)| kind_name(*kind) == k)
    };
    ids.sort_by(|a, b| (rank(&a.kind), &a.old).cmp(&(rank(&b.kind), &b.old)));
    from.remove(to);
    Ok(Plan {
        from: from.into_iter().filter(|f| !f.is_empty()).collect(),
        to: to.to_string(),
        ids,
    })
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Volume => "volume",
        Kind::Snapshot => "snapshot",
        Kind::Group => "group",
    }
}

/// `id` on node `to`; text that is not an ID of ours of this kind is kept as it is.
fn rekey_id(kind: Kind, id: &str, to: &str) -> String {
    match VolumeId::parse(kind, id) {
        Some(mut v) => {
            v.node = to.to_string();
            v.to_string()
        }
        None => id.to_string(),
    }
}

/// A record re-keyed: `Some(None)` when nothing changes, `None` when it does not parse.
fn render<T: Serialize + serde::de::DeserializeOwned>(
    path: &Path,
    to: &str,
    rekey: fn(&mut T, &str),
) -> Option<Option<Vec<u8>>> {
    let mut record = fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<T>(&b).ok())?;
    let before = to_json(&record);
    rekey(&mut record, to);
    let after = to_json(&record);
    Some((after != before).then_some(after))
}

/// `.<name>.tmp` beside `path`: the name every start-up repair removes (atomic::is_temp_name).
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()))
}

fn rekey_volume(r: &mut VolumeRecord, to: &str) {
    r.id = rekey_id(Kind::Volume, &r.id, to);
    r.source = r.source.take().map(|s| match s {
        ContentSource::Snapshot(id) => ContentSource::Snapshot(rekey_id(Kind::Snapshot, &id, to)),
        ContentSource::Volume(id) => ContentSource::Volume(rekey_id(Kind::Volume, &id, to)),
    });
}

fn rekey_snapshot(r: &mut SnapshotRecord, to: &str) {
    r.id = rekey_id(Kind::Snapshot, &r.id, to);
    r.source_volume_id = rekey_id(Kind::Volume, &r.source_volume_id, to);
    r.group_snapshot_id = r
        .group_snapshot_id
        .take()
        .map(|g| rekey_id(Kind::Group, &g, to));
}

fn rekey_group(r: &mut GroupRecord, to: &str) {
    r.id = rekey_id(Kind::Group, &r.id, to);
    for v in &mut r.source_volume_ids {
        *v = rekey_id(Kind::Volume, v, to);
    }
    for s in &mut r.snapshot_ids {
        *s = rekey_id(Kind::Snapshot, s, to);
    }
}
