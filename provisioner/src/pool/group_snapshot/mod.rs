//! Volume group snapshots (CSI GroupController): several volumes of one node snapshotted at one
//! instant, and kept or deleted only as a whole.
//!
//! Layout, next to the snapshots they group:
//! ```text
//! <pool>/groups/<hex>.json    group record: its members, in source-volume order (the commit point)
//! <pool>/groups/<hex>.intent  journal of a create in progress: the member snapshots it makes
//! <pool>/snapshots/<hex>.*    each member is an ordinary snapshot whose record names the group
//! ```
//! Crash rules (all-or-nothing after kill -9 at any instant):
//! 1. The intent is written (atomically, durably) before any member file exists.
//! 2. Every member image is built in `tmp/` while all sources are quiesced, then synced, renamed
//!    into `snapshots/` and given its record, as single snapshots are.
//! 3. The group record is written last: it is the commit point. Then the intent goes.
//!
//! At open ([`recover`]), an intent without its group record is a create that never committed:
//! its members are removed. An intent with its record is a finished create whose journal
//! was not yet removed. Independently, a member record whose group record is missing is removed
//! (an interrupted [`Pool::delete_group_snapshot`], which removes the group record first). So a
//! group exists after a crash only with all its members, and no member outlives its group.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::capacity::Capacity;
use crate::copy::{self, CopyMethod};
use crate::error::IoContext;
use crate::ids::{self, Kind, VolumeId};
use crate::keyed_lock::KeyGuard;
use crate::pool::{snapshot_lock_key, space_error, to_json, Pool, Quiesce, Quiesced, FULL_BYTES};
use crate::record::{SnapshotRecord, RECORD_FORMAT};
use crate::PoolError;

/// How long a group create waits for each member volume's lock before answering ABORTED. The
/// locks are taken in volume-ID order and never waited on forever, so two group snapshots (or
/// a group snapshot and a clone) sharing volumes cannot deadlock.
const MEMBER_LOCK_PATIENCE: Duration = Duration::from_secs(5);

/// A committed group snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub format: u32,
    pub id: String,
    pub name: String,
    /// The source volumes, sorted by ID (the idempotency key compares these as a set).
    pub source_volume_ids: Vec<String>,
    /// Member snapshot IDs, index for index with `source_volume_ids`.
    pub snapshot_ids: Vec<String>,
    /// The instant every member was cut (all sources were quiesced together).
    pub created_unix_nanos: u128,
}

/// The journal of a create in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Intent {
    group_id: String,
    /// Hex parts of the member snapshots this create makes.
    member_hexes: Vec<String>,
}

/// Test hooks the driver sets from its environment (fault injection for the test suite).
#[derive(Debug, Clone, Default)]
pub struct GroupTestHooks {
    /// Fail the copy of the n-th member (1-based, in volume-ID order) with an I/O error.
    pub fail_copy_of: Option<usize>,
    /// Pause this long after each member is made durable, widening the window in which a
    /// kill leaves a partly made group.
    pub step_delay: Duration,
}

/// One member while the group is being made.
struct Member {
    source_id: String,
    source_hex: String,
    snap: VolumeId,
    image: PathBuf,
    tmp: PathBuf,
    volume: crate::VolumeRecord,
}

impl Pool {
    fn groups_dir(&self) -> PathBuf {
        self.dir.join("groups")
    }

    fn group_record_path(&self, hex: &str) -> PathBuf {
        self.groups_dir().join(format!("{hex}.json"))
    }

    fn group_intent_path(&self, hex: &str) -> PathBuf {
        self.groups_dir().join(format!("{hex}.intent"))
    }

    /// Check a group snapshot ID from a request, like [`Pool::parse_volume_id`].
    pub fn parse_group_id(&self, id: &str) -> Result<Option<VolumeId>, PoolError> {
        ids::validate_id("group_snapshot_id", id)?;
        Ok(VolumeId::parse(Kind::Group, id).filter(|v| self.owns(v)))
    }

    fn read_group(&self, hex: &str) -> Result<Option<GroupRecord>, PoolError> {
        let path = self.group_record_path(hex);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                PoolError::io(format!("read {}", path.display()), std::io::Error::other(e))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PoolError::io(format!("read {}", path.display()), e)),
        }
    }

    /// A group and its member snapshots, or NOT_FOUND.
    pub fn get_group_snapshot(
        &self,
        id: &str,
    ) -> Result<(GroupRecord, Vec<SnapshotRecord>), PoolError> {
        let not_found = || {
            PoolError::NotFound(format!(
                "group snapshot {id} does not exist on node {}",
                self.node_id()
            ))
        };
        let gid = self.parse_group_id(id)?.ok_or_else(not_found)?;
        let group = self.read_group(&gid.hex)?.ok_or_else(not_found)?;
        let members = group
            .snapshot_ids
            .iter()
            .map(|s| self.get_snapshot(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((group, members))
    }

    /// Snapshot `source_volume_ids` together as group `name` (idempotent by name): every source
    /// is quiesced (in volume-ID order), then all are copied, then all are released, so every
    /// member is cut at one instant. A failure anywhere removes the members already made.
    pub fn create_group_snapshot(
        &self,
        name: &str,
        source_volume_ids: &[String],
        quiesce: Quiesce<'_>,
        hooks: &GroupTestHooks,
    ) -> Result<(GroupRecord, Vec<SnapshotRecord>), PoolError> {
        self.require_writer()?;
        ids::validate_name(name)?;
        if source_volume_ids.is_empty() {
            return Err(PoolError::InvalidArgument(
                "source_volume_ids is required and must not be empty".into(),
            ));
        }
        let mut sources: Vec<String> = source_volume_ids.to_vec();
        for s in &sources {
            ids::validate_id("source_volume_ids", s)?;
        }
        sources.sort();
        if let Some(w) = sources.windows(2).find(|w| w[0] == w[1]) {
            return Err(PoolError::InvalidArgument(format!(
                "source_volume_ids names volume {} twice",
                w[0]
            )));
        }
        let gid = self.mint(Kind::Group, name);
        let _group_guard = self.locks.lock(&group_lock_key(&gid.hex));
        if let Some(existing) = self.read_group(&gid.hex)? {
            if existing.source_volume_ids == sources {
                return self.get_group_snapshot(&existing.id);
            }
            return Err(PoolError::AlreadyExists(format!(
                "group snapshot {name:?} already exists for volumes {}",
                existing.source_volume_ids.join(", ")
            )));
        }
        // Resolve every source before anything is locked or written.
        let mut resolved = Vec::with_capacity(sources.len());
        for s in &sources {
            let v = self
                .parse_volume_id(s)?
                .ok_or_else(|| not_here(s, self.node_id()))?;
            resolved.push((s.clone(), v.hex));
        }
        // Volume locks in ID order (sources are sorted), each waited on only briefly.
        let mut guards: Vec<KeyGuard> = Vec::with_capacity(resolved.len());
        for (id, hex) in &resolved {
            guards.push(self.lock_member(id, hex)?);
        }
        let mut members = Vec::with_capacity(resolved.len());
        for (source_id, source_hex) in resolved {
            let volume = self
                .get_hex(&source_hex)
                .ok_or_else(|| not_here(&source_id, self.node_id()))?;
            let snap = self.mint(Kind::Snapshot, &member_name(name, &source_id));
            members.push(Member {
                image: self.snapshot_image_path(&snap.hex),
                tmp: self.dir.join("tmp").join(format!("group-{}.img", snap.hex)),
                source_id,
                source_hex,
                snap,
                volume,
            });
        }
        self.ensure_room_for_group(&members)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.groups_dir())
            .ctx(|| "create the groups directory".into())?;
        let intent = Intent {
            group_id: gid.to_string(),
            member_hexes: members.iter().map(|m| m.snap.hex.clone()).collect(),
        };
        atomic::write_file(&self.group_intent_path(&gid.hex), &to_json(&intent))
            .ctx(|| "write the group snapshot's intent".into())?;
        let started = Instant::now();
        let result = self.make_members(&gid, name, &members, quiesce, hooks);
        let (created, methods, frozen_ms) = match result {
            Ok(r) => r,
            Err(e) => {
                self.roll_back(&gid.hex, &members);
                return Err(e);
            }
        };
        let group = GroupRecord {
            format: RECORD_FORMAT,
            id: gid.to_string(),
            name: name.to_string(),
            source_volume_ids: sources,
            snapshot_ids: members.iter().map(|m| m.snap.to_string()).collect(),
            created_unix_nanos: created,
        };
        if let Err(e) = atomic::write_file(&self.group_record_path(&gid.hex), &to_json(&group)) {
            self.roll_back(&gid.hex, &members);
            return Err(PoolError::io("write group snapshot record", e));
        }
        // Committed. A journal left by a failure here is tidied at the next open.
        let _ = atomic::remove_file(&self.group_intent_path(&gid.hex));
        let records: Vec<SnapshotRecord> = members
            .iter()
            .zip(&methods)
            .map(|(m, method)| member_record(&group.id, name, group.created_unix_nanos, m, *method))
            .collect();
        {
            let mut snaps = self.snapshots.write().unwrap_or_else(|e| e.into_inner());
            for r in &records {
                if let Some(v) = VolumeId::parse(Kind::Snapshot, &r.id) {
                    snaps.insert(v.hex, r.clone());
                }
            }
        }
        self.changed();
        drop(guards);
        tracing::info!(group_snapshot_id = %group.id, members = records.len(),
            frozen_ms, ms = started.elapsed().as_millis() as u64, "group snapshot created");
        Ok((group, records))
    }

    /// Take one member volume's lock, waiting at most [`MEMBER_LOCK_PATIENCE`].
    fn lock_member(&self, id: &str, hex: &str) -> Result<KeyGuard, PoolError> {
        let deadline = Instant::now() + MEMBER_LOCK_PATIENCE;
        loop {
            if let Some(g) = self.try_lock_volume(hex) {
                return Ok(g);
            }
            if Instant::now() >= deadline {
                return Err(PoolError::Aborted(format!(
                    "volume {id} is busy with another operation; retry the group snapshot"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Pool::ensure_room_for_copy`], for all members at once, before anything is frozen.
    fn ensure_room_for_group(&self, members: &[Member]) -> Result<(), PoolError> {
        let available = Capacity::measure(&self.dir, 0, 1.0)?.available_bytes;
        let data: u64 = if self.reflinks() {
            0
        } else {
            members
                .iter()
                .map(|m| {
                    fs::metadata(self.image_path(&m.source_hex))
                        .map(|md| md.blocks() * 512)
                        .unwrap_or(0)
                })
                .sum()
        };
        let need = data + FULL_BYTES;
        if available < need {
            return Err(PoolError::ResourceExhausted(format!(
                "the pool on node {} has {available} bytes free; this group snapshot needs {need}",
                self.node_id()
            )));
        }
        Ok(())
    }

    /// Quiesce all, copy all, release all; then make each member durable. Returns the instant
    /// the members were cut, each member's copy method and how long the freeze lasted.
    fn make_members(
        &self,
        gid: &VolumeId,
        name: &str,
        members: &[Member],
        quiesce: Quiesce<'_>,
        hooks: &GroupTestHooks,
    ) -> Result<(u128, Vec<CopyMethod>, u64), PoolError> {
        let mut sources = Vec::with_capacity(members.len());
        let mut dests = Vec::with_capacity(members.len());
        for m in members {
            let from_path = self.image_path(&m.source_hex);
            sources.push(File::open(&from_path).ctx(|| format!("open {}", from_path.display()))?);
            // 0600 like volume images: a snapshot holds the same tenant data.
            dests.push(
                File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&m.tmp)
                    .ctx(|| format!("create {}", m.tmp.display()))?,
            );
        }
        // Every guard is dropped (thawed) on every path out of this block, error or panic.
        let freeze_started = Instant::now();
        let mut held: Vec<Box<dyn Quiesced>> = Vec::with_capacity(members.len());
        for m in members {
            held.push(quiesce(&m.volume)?);
        }
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut methods = Vec::with_capacity(members.len());
        for (i, ((from, dst), m)) in sources.iter().zip(&dests).zip(members).enumerate() {
            if hooks.fail_copy_of == Some(i + 1) {
                return Err(PoolError::io(
                    format!("copy volume {} into group snapshot {gid}", m.source_id),
                    std::io::Error::other("injected copy failure (test hook)"),
                ));
            }
            methods.push(copy::copy(from, dst).map_err(|e| {
                space_error(
                    &format!("copy volume {} into a group snapshot", m.source_id),
                    e,
                )
            })?);
        }
        // Release all before judging any: each release thaws, even after another failed.
        let released: Vec<Result<(), PoolError>> = held.into_iter().map(|g| g.release()).collect();
        let frozen_ms = freeze_started.elapsed().as_millis() as u64;
        released.into_iter().collect::<Result<Vec<()>, _>>()?;
        for (i, (dst, m)) in dests.iter().zip(members).enumerate() {
            dst.sync_all()
                .ctx(|| format!("fsync {}", m.tmp.display()))?;
            self.record_chunk_digests(&m.snap.hex, methods[i], dst, m.volume.size_bytes)?;
        }
        let group_id = gid.to_string();
        for (i, m) in members.iter().enumerate() {
            fs::rename(&m.tmp, &m.image)
                .ctx(|| format!("move group member into {}", m.image.display()))?;
            atomic::sync_dir(&self.dir.join("snapshots")).ctx(|| "fsync snapshots dir".into())?;
            let record = member_record(&group_id, name, created, m, methods[i]);
            atomic::write_file(&self.snapshot_record_path(&m.snap.hex), &to_json(&record))
                .ctx(|| format!("write the record of group member {}", record.id))?;
            if !hooks.step_delay.is_zero() {
                std::thread::sleep(hooks.step_delay);
            }
        }
        Ok((created, methods, frozen_ms))
    }

    /// Remove whatever a failed create made: temp images, member images and records, the
    /// intent last (so a crash in here is finished by [`recover`]).
    fn roll_back(&self, group_hex: &str, members: &[Member]) {
        for m in members {
            let _ = fs::remove_file(&m.tmp);
            self.remove_member_files(&m.snap.hex);
        }
        let _ = atomic::remove_file(&self.group_intent_path(group_hex));
        tracing::warn!(
            group = group_hex,
            "group snapshot failed part-way; its members were removed"
        );
    }

    /// Remove one member snapshot: record first, then image and digests (like
    /// [`Pool::delete_snapshot`], which refuses members).
    fn remove_member_files(&self, hex: &str) {
        let _guard = self.locks.lock(&snapshot_lock_key(hex));
        let _ = atomic::remove_file(&self.snapshot_record_path(hex));
        self.snapshots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(hex);
        self.changed();
        let _ = atomic::remove_file(&self.snapshot_image_path(hex));
        self.remove_chunk_digests(hex);
    }

    /// Delete a group and all its members; `Ok(false)` when it did not exist. A non-empty
    /// `snapshot_ids` must name exactly the group's members (in any order), as the spec asks of
    /// an SP that can detect a mismatch: INVALID_ARGUMENT otherwise, and nothing is deleted. An
    /// empty list is no list: csi-snapshotter sends none for a VolumeGroupSnapshotContent whose
    /// status was never written (a create whose answer was lost), and refusing it would leave
    /// that content undeletable while the ID alone names the group here.
    pub fn delete_group_snapshot(
        &self,
        id: &str,
        snapshot_ids: &[String],
    ) -> Result<bool, PoolError> {
        self.require_writer()?;
        let Some(gid) = self.parse_group_id(id)? else {
            return Ok(false);
        };
        let _guard = self.locks.lock(&group_lock_key(&gid.hex));
        let Some(group) = self.read_group(&gid.hex)? else {
            return Ok(false);
        };
        if !snapshot_ids.is_empty() {
            check_members(&group, snapshot_ids)?;
        }
        // The group record goes first: from then on recovery treats the members as orphans.
        atomic::remove_file(&self.group_record_path(&gid.hex))
            .ctx(|| format!("remove record of {id}"))?;
        for s in &group.snapshot_ids {
            if let Some(v) = VolumeId::parse(Kind::Snapshot, s) {
                self.remove_member_files(&v.hex);
            }
        }
        tracing::info!(group_snapshot_id = %id, "group snapshot deleted");
        Ok(true)
    }
}

/// Check a request's member list against the group's (when the request names one).
pub fn check_members(group: &GroupRecord, snapshot_ids: &[String]) -> Result<(), PoolError> {
    let want: BTreeSet<&String> = group.snapshot_ids.iter().collect();
    let got: BTreeSet<&String> = snapshot_ids.iter().collect();
    if want != got || got.len() != snapshot_ids.len() {
        return Err(PoolError::InvalidArgument(format!(
            "snapshot_ids [{}] do not match the members of group snapshot {}: [{}]",
            snapshot_ids.join(", "),
            group.id,
            group.snapshot_ids.join(", ")
        )));
    }
    Ok(())
}

fn not_here(id: &str, node: &str) -> PoolError {
    PoolError::NotFound(format!("source volume {id} does not exist on node {node}"))
}

fn group_lock_key(hex: &str) -> String {
    format!("group-{hex}")
}

/// The internal name a member's ID derives from. It contains '/', which no CSI name from a
/// request may (ids::validate_name), so no CreateSnapshot can ever name a group's member.
fn member_name(group_name: &str, source_volume_id: &str) -> String {
    format!("{group_name}/{source_volume_id}")
}

fn member_record(
    group_id: &str,
    group_name: &str,
    created_unix_nanos: u128,
    m: &Member,
    method: CopyMethod,
) -> SnapshotRecord {
    SnapshotRecord {
        format: RECORD_FORMAT,
        id: m.snap.to_string(),
        name: member_name(group_name, &m.source_id),
        source_volume_id: m.source_id.clone(),
        size_bytes: m.volume.size_bytes,
        fs_type: m.volume.fs_type,
        created_unix_nanos,
        method,
        group_snapshot_id: Some(group_id.to_string()),
        encryption: m.volume.encryption.clone(),
    }
}

/// Bring groups back to "whole or absent" after a crash; called by [`Pool::open`] for a
/// writer, after the snapshot records are loaded. Describes each repair in `repairs`.
pub(crate) fn recover(pool: &Pool, repairs: &mut Vec<String>) -> Result<(), PoolError> {
    let dir = pool.groups_dir();
    if !dir.exists() {
        return Ok(());
    }
    for e in fs::read_dir(&dir)
        .ctx(|| format!("read {}", dir.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if atomic::is_temp_name(&name) {
            let _ = fs::remove_file(&path);
            repairs.push(format!(
                "removed interrupted group record write {}",
                path.display()
            ));
            continue;
        }
        let Some(hex) = name.strip_suffix(".intent") else {
            continue;
        };
        let intent: Option<Intent> = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if pool.read_group(hex)?.is_some() {
            repairs.push(format!(
                "group snapshot {hex} was committed before a crash; removed its journal"
            ));
        } else {
            for m in intent.iter().flat_map(|i| i.member_hexes.iter()) {
                pool.remove_member_files(m);
                let _ = fs::remove_file(pool.dir.join("tmp").join(format!("group-{m}.img")));
            }
            repairs.push(format!(
                "group snapshot {hex} was interrupted before it was committed; its member \
                 snapshots were removed"
            ));
        }
        atomic::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
    }
    // Members whose group is gone: an interrupted group delete (or a journal lost to damage).
    let orphans: Vec<(String, String)> = pool
        .snapshots
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|(hex, r)| r.group_snapshot_id.clone().map(|g| (hex.clone(), g)))
        .collect();
    for (hex, group) in orphans {
        let alive = VolumeId::parse(Kind::Group, &group)
            .map(|g| pool.group_record_path(&g.hex))
            .is_some_and(|p| p.exists());
        if !alive {
            pool.remove_member_files(&hex);
            repairs.push(format!(
                "removed snapshot {hex}: a member of group snapshot {group}, which no longer exists"
            ));
        }
    }
    atomic::sync_dir(&dir).ctx(|| format!("fsync {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests;
