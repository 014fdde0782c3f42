//! Group snapshots' own tests: real pools in temp directories.

use super::*;
use crate::params::{Allocation, FsType, VolumeParams};
use crate::pool::{CreateRequest, PoolOptions};
use crate::size::MIB;

fn no_quiesce(_: &crate::VolumeRecord) -> Result<Box<dyn Quiesced>, PoolError> {
    Ok(Box::new(()))
}

fn open(dir: &std::path::Path) -> (Pool, Vec<String>) {
    Pool::open(PoolOptions::all(dir, "n1")).unwrap()
}

fn volume(pool: &Pool, name: &str) -> String {
    pool.create_volume(&CreateRequest {
        name: name.into(),
        required_bytes: (8 * MIB) as i64,
        limit_bytes: 0,
        params: VolumeParams {
            fs_type: FsType::Ext4,
            allocation: Allocation::Thin,
            ..Default::default()
        },
        needs_filesystem: true,
        source: None,
    })
    .unwrap()
    .id
}

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn create_get_delete_and_the_rules_on_members() {
    let t = tempfile::tempdir().unwrap();
    let (pool, _) = open(t.path());
    let (a, b) = (volume(&pool, "a"), volume(&pool, "b"));
    let hooks = GroupTestHooks::default();
    let (g, members) = pool
        .create_group_snapshot("g", &[b.clone(), a.clone()], &no_quiesce, &hooks)
        .unwrap();
    assert_eq!(g.source_volume_ids, {
        let mut v = vec![a.clone(), b.clone()];
        v.sort();
        v
    });
    assert!(members
        .iter()
        .all(|m| m.group_snapshot_id.as_deref() == Some(g.id.as_str())));
    assert_eq!(pool.list_snapshots(None, None, 0).0.len(), 2);
    // Idempotent by name; another member set under the name is ALREADY_EXISTS.
    let (again, _) = pool
        .create_group_snapshot("g", &[a.clone(), b.clone()], &no_quiesce, &hooks)
        .unwrap();
    assert_eq!(again, g);
    assert!(matches!(
        pool.create_group_snapshot("g", std::slice::from_ref(&a), &no_quiesce, &hooks),
        Err(PoolError::AlreadyExists(_))
    ));
    // A member is not deleted on its own.
    assert!(matches!(
        pool.delete_snapshot(&members[0].id),
        Err(PoolError::InvalidArgument(_))
    ));
    // A mismatching list deletes nothing.
    assert!(matches!(
        pool.delete_group_snapshot(&g.id, &g.snapshot_ids[..1]),
        Err(PoolError::InvalidArgument(_))
    ));
    assert!(pool.get_group_snapshot(&g.id).is_ok());
    assert!(pool.delete_group_snapshot(&g.id, &g.snapshot_ids).unwrap());
    assert!(!pool.delete_group_snapshot(&g.id, &g.snapshot_ids).unwrap());
    assert!(matches!(
        pool.get_group_snapshot(&g.id),
        Err(PoolError::NotFound(_))
    ));
    assert!(files(&t.path().join("snapshots")).is_empty());
    assert!(files(&t.path().join("groups")).is_empty());
}

#[test]
fn an_injected_copy_failure_removes_every_member() {
    let t = tempfile::tempdir().unwrap();
    let (pool, _) = open(t.path());
    let (a, b) = (volume(&pool, "a"), volume(&pool, "b"));
    let hooks = GroupTestHooks {
        fail_copy_of: Some(2),
        ..Default::default()
    };
    assert!(matches!(
        pool.create_group_snapshot("g", &[a, b], &no_quiesce, &hooks),
        Err(PoolError::Io { .. })
    ));
    assert!(pool.list_snapshots(None, None, 0).0.is_empty());
    assert!(files(&t.path().join("snapshots")).is_empty());
    assert!(files(&t.path().join("groups")).is_empty());
    assert!(files(&t.path().join("tmp")).is_empty());
}

/// What a kill at each step leaves, and what the next open makes of it.
#[test]
fn recovery_completes_or_rolls_back() {
    let t = tempfile::tempdir().unwrap();
    let groups = t.path().join("groups");
    let (pool, _) = open(t.path());
    let (a, b) = (volume(&pool, "a"), volume(&pool, "b"));
    let hooks = GroupTestHooks::default();
    let (g, _) = pool
        .create_group_snapshot("g", &[a.clone(), b.clone()], &no_quiesce, &hooks)
        .unwrap();
    let hex = VolumeId::parse(Kind::Group, &g.id).unwrap().hex;
    let intent = to_json(&Intent {
        group_id: g.id.clone(),
        member_hexes: g
            .snapshot_ids
            .iter()
            .map(|s| VolumeId::parse(Kind::Snapshot, s).unwrap().hex)
            .collect(),
    });
    drop(pool);

    // Killed after the commit, before the journal was removed: the group stays whole.
    fs::write(groups.join(format!("{hex}.intent")), &intent).unwrap();
    let (pool, repairs) = open(t.path());
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert_eq!(pool.get_group_snapshot(&g.id).unwrap().1.len(), 2);
    drop(pool);

    // Killed after the members were made, before the commit: all of them go.
    let record = fs::read(groups.join(format!("{hex}.json"))).unwrap();
    fs::remove_file(groups.join(format!("{hex}.json"))).unwrap();
    fs::write(groups.join(format!("{hex}.intent")), &intent).unwrap();
    let (pool, repairs) = open(t.path());
    assert!(
        repairs
            .iter()
            .any(|r| r.contains("interrupted before it was committed")),
        "{repairs:?}"
    );
    assert!(pool.list_snapshots(None, None, 0).0.is_empty());
    assert!(files(&t.path().join("snapshots")).is_empty());
    assert!(files(&groups).is_empty());
    drop(pool);

    // Killed in a delete, after the group record went: the members are orphans and go.
    let (pool, _) = open(t.path());
    let (g, _) = pool
        .create_group_snapshot("g", &[a, b], &no_quiesce, &hooks)
        .unwrap();
    drop(pool);
    assert_eq!(
        fs::read(groups.join(format!("{hex}.json"))).unwrap().len(),
        record.len()
    );
    fs::remove_file(groups.join(format!("{hex}.json"))).unwrap();
    let (pool, repairs) = open(t.path());
    assert_eq!(repairs.len(), 2, "{repairs:?}");
    assert!(pool.list_snapshots(None, None, 0).0.is_empty());
    assert!(files(&t.path().join("snapshots")).is_empty());
    assert!(matches!(
        pool.get_group_snapshot(&g.id),
        Err(PoolError::NotFound(_))
    ));
}
