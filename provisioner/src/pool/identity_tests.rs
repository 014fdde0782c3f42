//! A pool belongs to one node ID (identity.rs) and moves to another only through a re-key
//! (rekey.rs): real pools in temp directories.

use super::*;
use crate::group_snapshot::GroupTestHooks;
use crate::params::FsType;
use crate::size::MIB;

fn open_as(dir: &Path, node: &str) -> Result<Pool, PoolError> {
    Pool::open(PoolOptions::all(dir, node)).map(|(p, _)| p)
}

fn no_quiesce(_: &VolumeRecord) -> Result<Box<dyn Quiesced>, PoolError> {
    Ok(Box::new(()))
}

fn create(pool: &Pool, name: &str, source: Option<ContentSource>) -> VolumeRecord {
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
        source,
    })
    .unwrap()
}

/// Every file of the pool (but the lock files) and its bytes, to show that nothing changed.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if !p.to_string_lossy().ends_with(".lock") {
                out.insert(p.clone(), fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

fn nothing_in_use(_: &str) -> Option<String> {
    None
}

fn node_id_file(dir: &Path) -> String {
    fs::read_to_string(dir.join(".node-id")).unwrap()
}

/// A pool of node-a with a volume, a clone of it, a snapshot, a restore and a group snapshot:
/// every kind of ID and every kind of reference a record can hold.
fn populated(dir: &Path) -> (VolumeRecord, VolumeRecord, SnapshotRecord, VolumeRecord) {
    let pool = open_as(dir, "node-a").unwrap();
    let v = create(&pool, "v", None);
    let clone = create(&pool, "clone", Some(ContentSource::Volume(v.id.clone())));
    let snap = pool.create_snapshot("s", &v.id, &no_quiesce).unwrap();
    let restored = create(&pool, "r", Some(ContentSource::Snapshot(snap.id.clone())));
    pool.create_group_snapshot(
        "g",
        &[v.id.clone(), clone.id.clone()],
        &no_quiesce,
        &GroupTestHooks::default(),
    )
    .unwrap();
    (v, clone, snap, restored)
}

#[test]
fn a_pool_refuses_another_node_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    populated(t.path());
    assert_eq!(node_id_file(t.path()), "node-a\n");
    let before = tree(t.path());
    let Err(PoolError::FailedPrecondition(msg)) = open_as(t.path(), "node-b") else {
        panic!("opened under another node ID");
    };
    for says in [
        "belongs to node \"node-a\"",
        "not to \"node-b\"",
        "--node-id node-a",
        "loopvol pool set-node-id",
    ] {
        assert!(msg.contains(says), "{says}: {msg}");
    }
    assert_eq!(tree(t.path()), before, "a refused open changed the pool");
    // Its own node still opens it, and that changes nothing either.
    drop(open_as(t.path(), "node-a").unwrap());
    assert_eq!(tree(t.path()), before);
}

#[test]
fn a_pool_from_before_node_id_files_belongs_to_the_node_its_records_name() {
    let t = tempfile::tempdir().unwrap();
    populated(t.path());
    fs::remove_file(t.path().join(".node-id")).unwrap();
    assert!(open_as(t.path(), "node-b").is_err());
    assert!(!t.path().join(".node-id").exists());
    drop(open_as(t.path(), "node-a").unwrap());
    assert_eq!(node_id_file(t.path()), "node-a\n");
    // A new pool takes the ID it is first opened with.
    let fresh = tempfile::tempdir().unwrap();
    drop(open_as(fresh.path(), "node-c").unwrap());
    assert_eq!(node_id_file(fresh.path()), "node-c\n");
    assert!(open_as(fresh.path(), "node-d").is_err());
}

#[test]
fn a_pool_whose_node_id_file_and_records_disagree_is_refused_under_both() {
    // What the bug this guards against left behind: `.node-id` rewritten, records unchanged.
    let t = tempfile::tempdir().unwrap();
    populated(t.path());
    fs::write(t.path().join(".node-id"), "vm\n").unwrap();
    for node in ["vm", "node-a"] {
        let Err(PoolError::FailedPrecondition(msg)) = open_as(t.path(), node) else {
            panic!("a mixed pool opened as {node}");
        };
        assert!(msg.contains("does not belong to one node"), "{msg}");
        assert!(
            msg.contains("\"vm\"") && msg.contains("\"node-a\""),
            "{msg}"
        );
    }
    // The way out: give everything one ID.
    rekey::set_node_id(t.path(), "node-a", &nothing_in_use, &mut |_| {}).unwrap();
    drop(open_as(t.path(), "node-a").unwrap());
}

#[test]
fn a_rekey_moves_every_id_and_reference_and_the_pool_serves_them_under_the_new_node() {
    let t = tempfile::tempdir().unwrap();
    let (v, clone, snap, restored) = populated(t.path());
    let mut rewritten = Vec::new();
    let report = rekey::set_node_id(t.path(), "node-b", &nothing_in_use, &mut |p| {
        rewritten.push(p.to_path_buf())
    })
    .unwrap();
    assert!(!report.resumed);
    assert_eq!(report.plan.from, vec!["node-a".to_string()]);
    // 3 volumes, 1 + 2 member snapshots, 1 group.
    assert_eq!(report.plan.ids.len(), 7, "{:?}", report.plan.ids);
    assert_eq!(rewritten.len(), 7);
    let new = |id: &str| id.replace("@node-a", "@node-b");
    assert!(report
        .plan
        .ids
        .iter()
        .any(|r| r.kind == "volume" && r.old == v.id && r.new == new(&v.id)));
    assert_eq!(node_id_file(t.path()), "node-b\n");
    assert!(!t.path().join(".node-id.rekey").exists());
    let raw: String = tree(t.path())
        .into_iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "json"))
        .map(|(_, b)| String::from_utf8(b).unwrap())
        .collect();
    // Names stay (a group member's internal name embeds its source's old ID: it is what the
    // member's hex was derived from, and no request can name a member).
    let ids: Vec<&str> = raw
        .lines()
        .filter(|l| !l.trim_start().starts_with("\"name\""))
        .collect();
    assert!(
        !ids.iter().any(|l| l.contains("node-a")),
        "an ID kept its old node:\n{raw}"
    );

    assert!(open_as(t.path(), "node-a").is_err());
    let pool = open_as(t.path(), "node-b").unwrap();
    assert_eq!(pool.get(&new(&v.id)).unwrap().name, "v");
    assert!(pool.get(&v.id).is_err(), "the old ID still answers");
    assert_eq!(
        pool.get(&new(&clone.id)).unwrap().source,
        Some(ContentSource::Volume(new(&v.id)))
    );
    assert_eq!(
        pool.get(&new(&restored.id)).unwrap().source,
        Some(ContentSource::Snapshot(new(&snap.id)))
    );
    assert_eq!(
        pool.get_snapshot(&new(&snap.id)).unwrap().source_volume_id,
        new(&v.id)
    );
    let group_id = report
        .plan
        .ids
        .iter()
        .find(|r| r.kind == "group")
        .unwrap()
        .new
        .clone();
    let (group, members) = pool.get_group_snapshot(&group_id).unwrap();
    assert_eq!(group.source_volume_ids.len(), 2);
    assert!(members
        .iter()
        .all(|m| m.id.ends_with("@node-b")
            && m.group_snapshot_id.as_deref() == Some(group_id.as_str())));
    pool.delete_group_snapshot(&group_id, &group.snapshot_ids)
        .unwrap();
    pool.delete_snapshot(&new(&snap.id)).unwrap();
    for id in [&restored.id, &clone.id, &v.id] {
        assert!(pool.delete_volume(&new(id)).unwrap(), "{id}");
    }
    assert!(pool.is_empty());
}

#[test]
fn an_interrupted_rekey_blocks_every_opener_and_a_second_run_finishes_it() {
    let t = tempfile::tempdir().unwrap();
    let (v, ..) = populated(t.path());
    // Die after the second record, as a kill would.
    let mut n = 0;
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rekey::set_node_id(t.path(), "node-b", &nothing_in_use, &mut |_| {
            n += 1;
            if n == 2 {
                panic!("killed");
            }
        })
    }));
    assert!(died.is_err());
    assert!(t.path().join(".node-id.rekey").exists());
    assert_eq!(node_id_file(t.path()), "node-a\n");
    for node in ["node-a", "node-b"] {
        let Err(PoolError::FailedPrecondition(msg)) = open_as(t.path(), node) else {
            panic!("a half re-keyed pool opened as {node}");
        };
        assert!(
            msg.contains("run `loopvol pool set-node-id --pool-dir") && msg.contains("node-b"),
            "{msg}"
        );
    }
    // Another target is refused until this one is finished.
    assert!(rekey::set_node_id(t.path(), "node-c", &nothing_in_use, &mut |_| {}).is_err());
    let report = rekey::set_node_id(t.path(), "node-b", &nothing_in_use, &mut |_| {}).unwrap();
    assert!(report.resumed);
    assert_eq!(
        report.plan.ids.len(),
        7,
        "the whole mapping, not what was left"
    );
    assert!(!t.path().join(".node-id.rekey").exists());
    let stray: Vec<_> = tree(t.path())
        .into_keys()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    let pool = open_as(t.path(), "node-b").unwrap();
    assert_eq!(pool.len(), 3);
    assert!(pool.get(&v.id.replace("@node-a", "@node-b")).is_ok());
    drop(pool);
    // Running it again does nothing.
    let before = tree(t.path());
    let again = rekey::set_node_id(t.path(), "node-b", &nothing_in_use, &mut |_| {}).unwrap();
    assert!(again.plan.ids.is_empty());
    assert_eq!(tree(t.path()), before);
}

#[test]
fn a_rekey_refuses_while_a_volume_is_in_use_or_the_pool_is_served() {
    let t = tempfile::tempdir().unwrap();
    let (v, ..) = populated(t.path());
    let hex = VolumeId::parse(Kind::Volume, &v.id).unwrap().hex;
    let before = tree(t.path());
    let staged = |h: &str| (h == hex).then(|| "staged".to_string());
    let Err(PoolError::FailedPrecondition(msg)) =
        rekey::set_node_id(t.path(), "node-b", &staged, &mut |_| {})
    else {
        panic!("re-keyed a pool with a staged volume");
    };
    assert!(msg.contains(&hex) && msg.contains("unstage"), "{msg}");
    let served = open_as(t.path(), "node-a").unwrap();
    assert!(matches!(
        rekey::set_node_id(t.path(), "node-b", &nothing_in_use, &mut |_| {}),
        Err(PoolError::PoolLocked(_))
    ));
    drop(served);
    assert!(rekey::set_node_id(t.path(), "bad/id", &nothing_in_use, &mut |_| {}).is_err());
    assert_eq!(tree(t.path()), before, "a refused re-key changed the pool");
}

#[test]
fn a_controller_and_a_node_opening_a_new_pool_together_agree_on_its_node() {
    let role = |dir: &Path, node: &str, writer: bool| {
        let mut o = PoolOptions::all(dir, node);
        o.writer = writer;
        o.node = !writer;
        // Only the outcome matters (a Pool has no Debug).
        Pool::open(o).map(|_| ())
    };
    for round in 0..20 {
        let t = tempfile::tempdir().unwrap();
        // The same node ID: both start (no loser of the race to write `.node-id` fails).
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| role(t.path(), "node-a", true));
            let b = s.spawn(|| role(t.path(), "node-a", false));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(a.is_ok() && b.is_ok(), "round {round}: {a:?} {b:?}");
        drop((a, b));
        assert_eq!(node_id_file(t.path()), "node-a\n");
        // Two node IDs: exactly one wins, the other is refused, and the file names the winner.
        let t = tempfile::tempdir().unwrap();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| role(t.path(), "node-a", true));
            let b = s.spawn(|| role(t.path(), "node-b", false));
            (a.join().unwrap(), b.join().unwrap())
        });
        let winner = match (&a, &b) {
            (Ok(_), Err(PoolError::FailedPrecondition(_))) => "node-a",
            (Err(PoolError::FailedPrecondition(_)), Ok(_)) => "node-b",
            _ => panic!("round {round}: {a:?} {b:?}"),
        };
        assert_eq!(node_id_file(t.path()), format!("{winner}\n"));
        let stray: Vec<String> = fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }
}
