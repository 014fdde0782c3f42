//! The named pools of one node (design §1, docs/design-pools-transfer.md): which pool an ID
//! belongs to, which pool a request names, a name looked up in every pool, and lists that run
//! across all of them. Each [`Pool`] stays what it was (its own lock, records, capacity,
//! `tmp/` and `node/`); this only dispatches.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::ids::{self, Kind, VolumeId, DEFAULT_POOL};
use crate::keyed_lock::KeyedLocks;
use crate::pool::{CreateRequest, Quiesce};
use crate::record::ContentSource;
use crate::{Pool, PoolError, SnapshotRecord, VolumeRecord};

pub struct Pools {
    /// By name; always holds [`DEFAULT_POOL`].
    by_name: BTreeMap<String, Arc<Pool>>,
    /// Serialises creates of one name across pools, so two creates of one name asking for two
    /// pools cannot both pass the "not in another pool" check.
    names: KeyedLocks,
}

impl Pools {
    /// The node's pools: one of them the default pool, all of one node, no name twice.
    pub fn new(pools: impl IntoIterator<Item = Pool>) -> Result<Self, PoolError> {
        let mut by_name = BTreeMap::new();
        let mut node: Option<String> = None;
        for p in pools {
            if node.get_or_insert_with(|| p.node_id().to_string()) != p.node_id() {
                return Err(PoolError::InvalidArgument(format!(
                    "pool {} serves node {}, the others node {}",
                    p.name(),
                    p.node_id(),
                    node.unwrap_or_default()
                )));
            }
            let name = p.name().to_string();
            if by_name.insert(name.clone(), Arc::new(p)).is_some() {
                return Err(PoolError::InvalidArgument(format!(
                    "pool {name:?} is given twice"
                )));
            }
        }
        if !by_name.contains_key(DEFAULT_POOL) {
            return Err(PoolError::InvalidArgument(format!(
                "no pool named {DEFAULT_POOL:?}"
            )));
        }
        Ok(Pools {
            by_name,
            names: KeyedLocks::new(),
        })
    }

    /// The pool `--pool-dir` names (where IDs without a pool part live).
    pub fn default_pool(&self) -> &Arc<Pool> {
        &self.by_name[DEFAULT_POOL]
    }

    pub fn node_id(&self) -> &str {
        self.default_pool().node_id()
    }

    /// Every pool, in name order (the order lists run in).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.by_name.values()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.by_name.get(name)
    }

    /// The pool a request's `pool` parameter names: RESOURCE_EXHAUSTED when this node has no
    /// such pool (with WaitForFirstConsumer the CO then tries another node).
    pub fn requested(&self, name: &str) -> Result<&Arc<Pool>, PoolError> {
        ids::validate_pool_name(name)?;
        self.get(name).ok_or_else(|| {
            PoolError::ResourceExhausted(format!(
                "node {} has no pool {name:?} (it has {})",
                self.node_id(),
                self.names().join(", ")
            ))
        })
    }

    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }

    /// The pool owning the object `id` designates, by the ID alone. `Ok(None)`: an ID of
    /// another node, or not one of ours.
    ///
    /// An ID of this node naming a pool it does not serve (its `--pool` flag was dropped) is
    /// FAILED_PRECONDITION, not "no such volume": the volume most likely still exists on a disk
    /// this process was not told about, and answering NOT_FOUND (or OK to a delete, as the spec
    /// asks for volumes that do not exist) would unstage nothing and let the CO forget a
    /// volume whose data stays behind — the node-ID trap of issue 27 over again.
    pub fn owner(&self, kind: Kind, id: &str) -> Result<Option<&Arc<Pool>>, PoolError> {
        let what = match kind {
            Kind::Volume => "volume_id",
            Kind::Snapshot => "snapshot_id",
            Kind::Group => "group_snapshot_id",
        };
        ids::validate_id(what, id)?;
        let Some(v) = VolumeId::parse(kind, id).filter(|v| v.node == self.node_id()) else {
            return Ok(None);
        };
        match self.get(v.pool_name()) {
            Some(pool) => Ok(Some(pool)),
            None => Err(PoolError::FailedPrecondition(format!(
                "{id} is in pool {:?}, which this node does not serve (it has {}): start \
                 loopvol with --pool {}=DIR again",
                v.pool_name(),
                self.names().join(", "),
                v.pool_name()
            ))),
        }
    }

    /// The pool that answers for `id`: its owner, or the default pool, whose answer for an ID
    /// it does not own is the usual NOT_FOUND (or OK for a delete).
    pub fn for_id(&self, kind: Kind, id: &str) -> Result<&Arc<Pool>, PoolError> {
        Ok(self.owner(kind, id)?.unwrap_or(self.default_pool()))
    }

    /// The volume record for an ID in whichever pool owns it, or NOT_FOUND.
    pub fn get_volume(&self, id: &str) -> Result<VolumeRecord, PoolError> {
        self.for_id(Kind::Volume, id)?.get(id)
    }

    pub fn get_snapshot(&self, id: &str) -> Result<SnapshotRecord, PoolError> {
        self.for_id(Kind::Snapshot, id)?.get_snapshot(id)
    }

    /// Create a volume in pool `pool` (the request's parameter), its content source found in
    /// whichever pool of this node holds it. A name lives in one pool: the same name in
    /// another pool is ALREADY_EXISTS (same name, incompatible parameters).
    pub fn create_volume(
        &self,
        pool: &str,
        req: &CreateRequest,
        quiesce: Quiesce<'_>,
    ) -> Result<VolumeRecord, PoolError> {
        ids::validate_name(&req.name)?;
        let target = self.requested(pool)?;
        let hex = VolumeId::from_name(Kind::Volume, &req.name, self.node_id()).hex;
        let _name = self.names.lock(&hex);
        self.refuse_elsewhere(target, &req.name, &hex, |p| p.has_volume(&hex), "volume")?;
        let source_pool = match &req.source {
            Some(ContentSource::Snapshot(id)) => self.for_id(Kind::Snapshot, id)?,
            Some(ContentSource::Volume(id)) => self.for_id(Kind::Volume, id)?,
            None => target,
        };
        target.create_volume_from(req, quiesce, source_pool)
    }

    /// The pool a CreateVolume with a content source on another node goes to, and what it
    /// finds there (transfer/sink.rs). A name lives in one pool, as for [`Pools::create_volume`].
    pub fn transfer_state(
        &self,
        pool: &str,
        req: &CreateRequest,
    ) -> Result<(Arc<Pool>, crate::pool::transfers::TransferState), PoolError> {
        ids::validate_name(&req.name)?;
        let target = self.requested(pool)?;
        let hex = VolumeId::from_name(Kind::Volume, &req.name, self.node_id()).hex;
        let _name = self.names.lock(&hex);
        self.refuse_elsewhere(target, &req.name, &hex, |p| p.has_volume(&hex), "volume")?;
        Ok((target.clone(), target.transfer_state(req)?))
    }

    /// Open a snapshot or volume of this node for streaming to another node.
    pub fn transfer_source(
        &self,
        source: &ContentSource,
        transfer_id: &str,
        quiesce: Quiesce<'_>,
    ) -> Result<crate::pool::SourceImage, PoolError> {
        let pool = match source {
            ContentSource::Snapshot(id) => self.for_id(Kind::Snapshot, id)?,
            ContentSource::Volume(id) => self.for_id(Kind::Volume, id)?,
        };
        pool.transfer_source(source, transfer_id, quiesce)
    }

    /// Snapshot a volume into its own pool (snapshots live with their source).
    pub fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        quiesce: Quiesce<'_>,
    ) -> Result<SnapshotRecord, PoolError> {
        ids::validate_name(name)?;
        let pool = self.for_id(Kind::Volume, source_volume_id)?;
        let hex = VolumeId::from_name(Kind::Snapshot, name, self.node_id()).hex;
        let _name = self.names.lock(&format!("snap-{hex}"));
        let has = |p: &Pool| p.snapshot_record_path(&hex).exists();
        self.refuse_elsewhere(pool, name, &hex, has, "snapshot")?;
        pool.create_snapshot(name, source_volume_id, quiesce)
    }

    fn refuse_elsewhere(
        &self,
        target: &Pool,
        name: &str,
        hex: &str,
        has: impl Fn(&Pool) -> bool,
        what: &str,
    ) -> Result<(), PoolError> {
        match self.iter().find(|p| p.name() != target.name() && has(p)) {
            Some(other) => Err(PoolError::AlreadyExists(format!(
                "{what} {name:?} already exists in pool {:?} of node {}, not in the requested \
                 pool {:?} ({what} {hex})",
                other.name(),
                self.node_id(),
                target.name()
            ))),
            None => Ok(()),
        }
    }

    /// One page of volumes across all pools, in pool-name then ID order. The token is a
    /// position ([`ids::page_token`]), valid across deletes and pools coming or going.
    pub fn list_page(
        &self,
        after: Option<&str>,
        max: usize,
    ) -> Result<(Vec<VolumeRecord>, Option<String>), PoolError> {
        self.paged(after, max, |p, a, m| p.list_page(a, m), volume_hex)
    }

    /// One page of snapshots across all pools, optionally of one source volume.
    pub fn list_snapshots(
        &self,
        source_volume_id: Option<&str>,
        after: Option<&str>,
        max: usize,
    ) -> Result<(Vec<SnapshotRecord>, Option<String>), PoolError> {
        let page = |p: &Pool, a: Option<&str>, m| p.list_snapshots(source_volume_id, a, m);
        self.paged(after, max, page, snapshot_hex)
    }

    fn paged<T>(
        &self,
        after: Option<&str>,
        max: usize,
        page_of: impl Fn(&Pool, Option<&str>, usize) -> (Vec<T>, Option<String>),
        hex_of: impl Fn(&T) -> Option<String>,
    ) -> Result<(Vec<T>, Option<String>), PoolError> {
        let start = match after {
            None => None,
            Some(t) => Some(ids::parse_page_token(t).ok_or_else(|| {
                PoolError::Aborted(format!(
                    "starting_token {t:?} is not a token this driver issued"
                ))
            })?),
        };
        let mut out = Vec::new();
        let pools: Vec<&Arc<Pool>> = self
            .iter()
            .filter(|p| start.is_none_or(|(name, _)| p.name() >= name))
            .collect();
        for (i, pool) in pools.iter().enumerate() {
            let inner = start
                .filter(|(name, _)| *name == pool.name())
                .map(|(_, hex)| hex);
            let want = if max == 0 { 0 } else { max - out.len() };
            let (page, next) = page_of(pool, inner, want);
            out.extend(page);
            if let Some(hex) = next {
                return Ok((out, Some(ids::page_token(pool.name(), &hex))));
            }
            if max != 0 && out.len() >= max {
                // The page ends exactly at this pool's end: go on after its last entry, if
                // any later pool has one.
                let more = pools[i + 1..]
                    .iter()
                    .any(|p| !page_of(p, None, 1).0.is_empty());
                let next = out.last().and_then(&hex_of).filter(|_| more);
                return Ok((out, next.map(|h| ids::page_token(pool.name(), &h))));
            }
        }
        Ok((out, None))
    }
}

fn volume_hex(r: &VolumeRecord) -> Option<String> {
    VolumeId::parse(Kind::Volume, &r.id).map(|v| v.hex)
}

fn snapshot_hex(r: &SnapshotRecord) -> Option<String> {
    VolumeId::parse(Kind::Snapshot, &r.id).map(|v| v.hex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::VolumeParams;
    use crate::PoolOptions;

    fn open(dir: &std::path::Path, name: &str) -> Pool {
        let opts = PoolOptions {
            name: name.into(),
            ..PoolOptions::all(dir.join(name), "n1")
        };
        Pool::open(opts).unwrap().0
    }

    fn req(name: &str) -> CreateRequest {
        CreateRequest {
            name: name.into(),
            required_bytes: 1 << 20,
            limit_bytes: 0,
            params: VolumeParams::default(),
            needs_filesystem: false,
            source: None,
        }
    }

    fn no_quiesce(_: &VolumeRecord) -> Result<Box<dyn crate::pool::Quiesced>, PoolError> {
        Ok(Box::new(()))
    }

    #[test]
    fn ids_dispatch_names_are_unique_and_pages_cover_every_pool() {
        let t = tempfile::tempdir().unwrap();
        let pools = Pools::new(["default", "a", "b"].map(|n| open(t.path(), n))).unwrap();
        let mut made = Vec::new();
        for (i, pool) in ["default", "a", "b", "a", "default", "b", "b"]
            .iter()
            .enumerate()
        {
            let v = pools
                .create_volume(pool, &req(&format!("v{i}")), &no_quiesce)
                .unwrap();
            assert_eq!(
                pools.owner(Kind::Volume, &v.id).unwrap().unwrap().name(),
                *pool
            );
            made.push(v.id);
        }
        // One name, one pool.
        let err = pools
            .create_volume("a", &req("v0"), &no_quiesce)
            .unwrap_err();
        assert!(matches!(err, PoolError::AlreadyExists(_)), "{err}");
        assert!(matches!(
            pools.create_volume("zz", &req("new"), &no_quiesce),
            Err(PoolError::ResourceExhausted(_))
        ));
        assert!(matches!(
            pools.create_volume("Z", &req("new"), &no_quiesce),
            Err(PoolError::InvalidArgument(_))
        ));
        // Every page size lists every volume exactly once, across pools.
        for max in 0..=8 {
            let (mut seen, mut token) = (Vec::new(), None::<String>);
            loop {
                let (page, next) = pools.list_page(token.as_deref(), max).unwrap();
                assert!(max == 0 || page.len() <= max);
                seen.extend(page.into_iter().map(|r| r.id));
                match next {
                    Some(n) => token = Some(n),
                    None => break,
                }
            }
            seen.sort();
            let mut want = made.clone();
            want.sort();
            assert_eq!(seen, want, "max {max}");
        }
        assert!(matches!(
            pools.list_page(Some("x:0123"), 1),
            Err(PoolError::Aborted(_))
        ));
        // An ID of this node in a pool it does not serve is refused, never NOT_FOUND: the
        // volume is on a disk this process was not given.
        let unserved = VolumeId::from_name_in(Kind::Volume, "v1", "c", "n1").to_string();
        for r in [
            pools.owner(Kind::Volume, &unserved).map(|_| ()),
            pools.get_volume(&unserved).map(|_| ()),
        ] {
            assert!(
                matches!(&r, Err(PoolError::FailedPrecondition(m)) if m.contains("--pool c=DIR")),
                "{r:?}"
            );
        }
        // Another node's ID is nobody's here: NOT_FOUND from the default pool.
        let foreign = VolumeId::from_name_in(Kind::Volume, "v1", "a", "n2").to_string();
        assert!(pools.owner(Kind::Volume, &foreign).unwrap().is_none());
        assert!(matches!(
            pools.get_volume(&foreign),
            Err(PoolError::NotFound(_))
        ));
    }

    #[test]
    fn the_pools_must_include_default_and_share_a_node() {
        let t = tempfile::tempdir().unwrap();
        assert!(Pools::new([open(t.path(), "a")]).is_err());
        let other = Pool::open(PoolOptions {
            name: "b".into(),
            ..PoolOptions::all(t.path().join("b"), "n2")
        })
        .unwrap()
        .0;
        assert!(Pools::new([open(t.path(), "default"), other]).is_err());
    }
}
