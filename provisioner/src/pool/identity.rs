//! Which node a pool belongs to. Every ID a pool issues names its node (`vol-<hex>@<node>`), and
//! a process serving the pool answers only for IDs of its own node: served under another node
//! ID, a pool still lists its volumes but answers NOT_FOUND to an unstage of a mounted one and
//! OK to a delete that deletes nothing. So a pool belongs to one node ID, kept in
//! `<pool>/.node-id`, and [`check_owner`] refuses every opener that names another one. Moving a
//! pool to another node ID is the deliberate operation of [`super::rekey`].

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use crate::atomic;
use crate::error::IoContext;
use crate::ids::{self, Kind, VolumeId};
use crate::PoolError;

/// `<pool>/.node-id`: the node ID the pool belongs to.
pub const NODE_ID_FILE: &str = ".node-id";
/// `<pool>/.node-id.rekey`: the journal of a `set-node-id` in progress (see [`super::rekey`]).
pub const REKEY_INTENT_FILE: &str = ".node-id.rekey";

/// Where each kind of record lives, by ID kind.
pub(crate) const RECORD_DIRS: [(Kind, &str); 3] = [
    (Kind::Volume, "volumes"),
    (Kind::Snapshot, "snapshots"),
    (Kind::Group, "groups"),
];

/// What the pool directory says about its node, read without changing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The content of `.node-id`, when the file exists.
    pub recorded: Option<String>,
    /// The node the pool belongs to: `.node-id`, or for a pool from before that file existed,
    /// the one node its records name; `None` for a pool without either (a new one).
    pub owner: Option<String>,
}

/// Read the pool's identity. Refuses (FAILED_PRECONDITION, saying what to run) a pool with an
/// unfinished re-key, and one whose `.node-id` and records, or whose records among
/// themselves, name different nodes: no node ID can serve all of such a pool's objects.
pub fn identity(dir: &Path) -> Result<Identity, PoolError> {
    if let Some(plan) = super::rekey::read_intent(dir)? {
        return Err(PoolError::FailedPrecondition(format!(
            "the pool {} is half-way through `loopvol pool set-node-id` (from {} to {:?}): \
             run `loopvol pool set-node-id --pool-dir {} {}` again to finish it",
            dir.display(),
            quoted(&plan.from),
            plan.to,
            dir.display(),
            plan.to
        )));
    }
    let recorded = read_node_id_file(dir)?;
    let named = record_nodes(dir)?;
    let mut all: BTreeSet<String> = named.clone();
    all.extend(recorded.clone());
    if all.len() > 1 {
        let what = match &recorded {
            Some(r) => format!("its {NODE_ID_FILE} says {r:?} but its records name"),
            None => "its records name".to_string(),
        };
        let names: Vec<String> = named.into_iter().collect();
        return Err(PoolError::FailedPrecondition(format!(
            "the pool {} does not belong to one node: {what} {}; give every object one \
             node ID with `loopvol pool set-node-id --pool-dir {} <node-id>` (docs/operations.md)",
            dir.display(),
            quoted(&names),
            dir.display()
        )));
    }
    Ok(Identity {
        recorded,
        owner: all.pop_first(),
    })
}

/// The check every opener makes (in [`super::Pool::open`], under the pool's lock, before any
/// repair): a pool of another node is refused with the way out; a new pool, or one from before
/// `.node-id` existed, is given `node_id`.
pub(crate) fn check_owner(dir: &Path, node_id: &str) -> Result<(), PoolError> {
    let id = identity(dir)?;
    if let Some(why) = refusal(dir, &id, node_id) {
        return Err(PoolError::FailedPrecondition(why));
    }
    if id.recorded.is_some() {
        // It names node_id (the refusal above checked), as do the records.
        return Ok(());
    }
    // A new pool, or one from before `.node-id` whose records name node_id.
    claim(dir, node_id)
}

/// Create `.node-id` for a pool that has none, unless another opener (a controller and a node
/// process starting together on a new pool) created it first: then its word is checked like
/// any other. Linking a complete temp file into place makes "first one wins" atomic.
fn claim(dir: &Path, node_id: &str) -> Result<(), PoolError> {
    static CLAIMS: AtomicU64 = AtomicU64::new(0);
    let path = node_id_path(dir);
    let n = CLAIMS.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("{NODE_ID_FILE}.{}-{n}.tmp", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{node_id}\n").as_bytes())?;
            f.sync_all()
        });
    let linked = written.and_then(|()| fs::hard_link(&tmp, &path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => atomic::sync_dir(dir).ctx(|| format!("fsync {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            match refusal(dir, &identity(dir)?, node_id) {
                Some(why) => Err(PoolError::FailedPrecondition(why)),
                None => Ok(()),
            }
        }
        Err(e) => Err(PoolError::io(format!("create {}", path.display()), e)),
    }
}

/// Why a pool of identity `id` must not be opened as `node_id` (with the way out), if it must
/// not; shared by the openers' check and `loopvol doctor`.
pub fn refusal(dir: &Path, id: &Identity, node_id: &str) -> Option<String> {
    let owner = id.owner.as_deref().filter(|o| *o != node_id)?;
    Some(format!(
        "the pool {dir} belongs to node {owner:?} (its IDs end in @{owner}), not to {node_id:?}: \
         serve it with --node-id {owner}; or, to move the pool to {node_id:?} on purpose, stop \
         every loopvol serving it, unstage its volumes and run \
         `loopvol pool set-node-id --pool-dir {dir} {node_id}` (existing PersistentVolumes \
         then need recreating: docs/operations.md)",
        dir = dir.display(),
    ))
}

pub(crate) fn node_id_path(dir: &Path) -> PathBuf {
    dir.join(NODE_ID_FILE)
}

pub(crate) fn write_node_id_file(dir: &Path, node_id: &str) -> Result<(), PoolError> {
    let path = node_id_path(dir);
    atomic::write_file(&path, format!("{node_id}\n").as_bytes())
        .ctx(|| format!("write {}", path.display()))
}

fn read_node_id_file(dir: &Path) -> Result<Option<String>, PoolError> {
    let path = node_id_path(dir);
    match fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim();
            ids::validate_node_id(id)
                .map_err(|e| PoolError::FailedPrecondition(format!("{}: {e}", path.display())))?;
            Ok(Some(id.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PoolError::io(format!("read {}", path.display()), e)),
    }
}

/// Every node the pool's volume, snapshot and group records name in their own IDs.
fn record_nodes(dir: &Path) -> Result<BTreeSet<String>, PoolError> {
    Ok(record_ids(dir)?.into_iter().map(|(_, v)| v.node).collect())
}

/// Every record's own ID, by kind, in record-directory then file-name order. Records that do
/// not parse, or whose ID is not one of ours, are skipped: the writer's start-up repair
/// quarantines them.
pub(crate) fn record_ids(dir: &Path) -> Result<Vec<(String, VolumeId)>, PoolError> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: String,
    }
    let mut out = Vec::new();
    for (kind, sub) in RECORD_DIRS {
        for path in record_files(&dir.join(sub))? {
            let Some(r) = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<IdOnly>(&b).ok())
            else {
                continue;
            };
            if let Some(v) = VolumeId::parse(kind, &r.id) {
                out.push((r.id, v));
            }
        }
    }
    Ok(out)
}

/// The `<hex>.json` record files of one record directory (none when it does not exist).
pub(crate) fn record_files(dir: &Path) -> Result<Vec<PathBuf>, PoolError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(PoolError::io(format!("read {}", dir.display()), e)),
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".json").is_some_and(ids::is_hex_id)
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
