//! The pool's own tests: real files in temp dirs.

use super::*;
use crate::params::FsType;
use crate::size::{GIB, MIB};

fn open(dir: &Path) -> Pool {
    let (pool, _) = Pool::open(PoolOptions::all(dir, "node-a")).unwrap();
    pool
}

fn req(name: &str, required: i64, allocation: Allocation) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        required_bytes: required,
        limit_bytes: 0,
        params: VolumeParams {
            fs_type: FsType::Ext4,
            allocation,
            fs_explicit: false,
            ..Default::default()
        },
        needs_filesystem: true,
        source: None,
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn create_is_idempotent_and_checks_compatibility() {
    let t = tempfile::tempdir().unwrap();
    let pool = open(t.path());
    let a = pool
        .create_volume(&req("pvc-1", 10 * MIB as i64, Allocation::Thin))
        .unwrap();
    assert_eq!(a.size_bytes, 10 * MIB);
    assert!(a.id.ends_with("@node-a"));
    let again = pool
        .create_volume(&req("pvc-1", 10 * MIB as i64, Allocation::Thin))
        .unwrap();
    assert_eq!(a, again);
    assert!(matches!(
        pool.create_volume(&req("pvc-1", 20 * MIB as i64, Allocation::Thin)),
        Err(PoolError::AlreadyExists(_))
    ));
    assert!(matches!(
        pool.create_volume(&req("pvc-1", 10 * MIB as i64, Allocation::Thick)),
        Err(PoolError::AlreadyExists(_))
    ));
    let hex = VolumeId::parse(Kind::Volume, &a.id).unwrap().hex;
    assert_eq!(
        files(&t.path().join("volumes")),
        vec![format!("{hex}.img"), format!("{hex}.json")]
    );
    let img = fs::metadata(pool.image_path(&hex)).unwrap();
    assert_eq!(img.len(), 10 * MIB);
    assert_eq!(img.blocks(), 0, "thin volumes start sparse");
}

#[test]
fn thick_volumes_are_allocated_and_refused_when_too_big() {
    let t = tempfile::tempdir().unwrap();
    let pool = open(t.path());
    let v = pool
        .create_volume(&req("thick", 16 * MIB as i64, Allocation::Thick))
        .unwrap();
    let hex = VolumeId::parse(Kind::Volume, &v.id).unwrap().hex;
    assert!(pool.allocated_bytes(&hex).unwrap() >= 16 * MIB);
    let avail = pool.capacity().unwrap().available_bytes;
    let huge = (avail + GIB).min(size::MAX_SIZE) as i64;
    let err = pool
        .create_volume(&req("huge", huge, Allocation::Thick))
        .unwrap_err();
    assert!(matches!(err, PoolError::ResourceExhausted(_)), "{err}");
    assert!(files(&t.path().join("tmp")).is_empty());
    assert_eq!(pool.len(), 1);
}

#[test]
fn delete_is_idempotent_and_removes_files() {
    let t = tempfile::tempdir().unwrap();
    let pool = open(t.path());
    let v = pool.create_volume(&req("d", 0, Allocation::Thin)).unwrap();
    assert_eq!(v.size_bytes, GIB);
    assert!(pool.delete_volume(&v.id).unwrap());
    assert!(!pool.delete_volume(&v.id).unwrap());
    assert!(!pool.delete_volume("fake-vol-id").unwrap());
    assert!(matches!(
        pool.delete_volume("../x"),
        Err(PoolError::InvalidArgument(_))
    ));
    assert!(files(&t.path().join("volumes")).is_empty());
    assert!(matches!(pool.get(&v.id), Err(PoolError::NotFound(_))));
}

#[test]
fn ids_of_other_nodes_are_not_ours() {
    let t = tempfile::tempdir().unwrap();
    let pool = open(t.path());
    let v = pool.create_volume(&req("x", 0, Allocation::Thin)).unwrap();
    let other = v.id.replace("@node-a", "@node-b");
    assert!(matches!(pool.get(&other), Err(PoolError::NotFound(_))));
}

#[test]
fn pages_cover_every_volume_once() {
    let t = tempfile::tempdir().unwrap();
    let pool = open(t.path());
    for i in 0..7 {
        pool.create_volume(&req(&format!("v{i}"), MIB as i64, Allocation::Thin))
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let (page, next) = pool.list_page(token.as_deref(), 3);
        assert!(page.len() <= 3);
        seen.extend(page.into_iter().map(|r| r.id));
        match next {
            Some(n) => token = Some(n),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 7);
    assert_eq!(seen.len(), 7);
    assert_eq!(pool.list_page(None, 0).0.len(), 7);
}

#[test]
fn restart_keeps_volumes_and_repairs_crash_leftovers() {
    let t = tempfile::tempdir().unwrap();
    let id = {
        let pool = open(t.path());
        pool.create_volume(&req("keep", MIB as i64, Allocation::Thin))
            .unwrap()
            .id
    };
    // What a crash can leave: a half-built image, an image whose record was never written,
    // an interrupted record write.
    fs::write(t.path().join("tmp/0123456789abcdef0123.img"), b"x").unwrap();
    fs::write(t.path().join("volumes/aaaaaaaaaaaaaaaaaaaa.img"), b"x").unwrap();
    fs::write(
        t.path().join("volumes/.bbbbbbbbbbbbbbbbbbbb.json.tmp"),
        b"{",
    )
    .unwrap();
    // Chunk digests of a snapshot whose record was never written.
    fs::write(t.path().join("snapshots/cccccccccccccccccccc.chunks"), b"x").unwrap();
    let (pool, repairs) = Pool::open(PoolOptions::all(t.path(), "node-a")).unwrap();
    assert_eq!(repairs.len(), 4, "{repairs:?}");
    assert!(files(&t.path().join("snapshots")).is_empty());
    assert_eq!(pool.get(&id).unwrap().name, "keep");
    assert!(files(&t.path().join("tmp")).is_empty());
    assert_eq!(files(&t.path().join("volumes")).len(), 2);
}

#[test]
fn one_process_per_pool() {
    let t = tempfile::tempdir().unwrap();
    let _pool = open(t.path());
    let second = Pool::open(PoolOptions::all(t.path(), "node-a"));
    assert!(matches!(second, Err(PoolError::PoolLocked(_))));
}

#[test]
fn expansion_grows_and_refuses_to_shrink() {
    let t = tempfile::tempdir().unwrap();
    let pool = open(t.path());
    let v = pool
        .create_volume(&req("grow", 16 * MIB as i64, Allocation::Thin))
        .unwrap();
    let g = pool.expand_volume(&v.id, (32 * MIB) as i64 - 5, 0).unwrap();
    assert_eq!(g.size_bytes, 32 * MIB);
    assert_eq!(
        pool.expand_volume(&v.id, (32 * MIB) as i64 - 5, 0)
            .unwrap()
            .size_bytes,
        32 * MIB
    );
    let hex = VolumeId::parse(Kind::Volume, &v.id).unwrap().hex;
    assert_eq!(fs::metadata(pool.image_path(&hex)).unwrap().len(), 32 * MIB);
    assert!(matches!(
        pool.expand_volume(&v.id, (8 * MIB) as i64, 0),
        Err(PoolError::OutOfRange(_))
    ));
    assert!(matches!(
        pool.expand_volume("vol-0123456789abcdef0123@node-a", MIB as i64, 0),
        Err(PoolError::NotFound(_))
    ));
    // Survives a restart.
    drop(pool);
    let pool = open(t.path());
    assert_eq!(pool.get(&v.id).unwrap().size_bytes, 32 * MIB);
    let thick = pool
        .create_volume(&req("thick", 16 * MIB as i64, Allocation::Thick))
        .unwrap();
    pool.expand_volume(&thick.id, (24 * MIB) as i64, 0).unwrap();
    let hex = VolumeId::parse(Kind::Volume, &thick.id).unwrap().hex;
    assert!(pool.allocated_bytes(&hex).unwrap() >= 24 * MIB);
}

#[test]
fn a_controller_and_a_node_process_share_a_pool() {
    let t = tempfile::tempdir().unwrap();
    let role = |writer, node| PoolOptions {
        writer,
        node,
        ..PoolOptions::all(t.path(), "node-a")
    };
    let (controller, _) = Pool::open(role(true, false)).unwrap();
    let (node, _) = Pool::open(role(false, true)).unwrap();
    assert!(matches!(
        Pool::open(role(false, true)),
        Err(PoolError::PoolLocked(_))
    ));
    assert!(matches!(
        Pool::open(role(true, false)),
        Err(PoolError::PoolLocked(_))
    ));
    // The node sees volumes created after it started, and cannot create any itself.
    let v = controller
        .create_volume(&req("later", MIB as i64, Allocation::Thin))
        .unwrap();
    assert_eq!(node.get(&v.id).unwrap(), v);
    assert!(matches!(
        node.create_volume(&req("n", MIB as i64, Allocation::Thin)),
        Err(PoolError::FailedPrecondition(_))
    ));
    controller.delete_volume(&v.id).unwrap();
    assert!(matches!(node.get(&v.id), Err(PoolError::NotFound(_))));
}

#[test]
fn concurrent_creates_of_one_name_make_one_volume() {
    let t = tempfile::tempdir().unwrap();
    let pool = std::sync::Arc::new(open(t.path()));
    let ids: Vec<String> = (0..16)
        .map(|_| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                pool.create_volume(&req("same", MIB as i64, Allocation::Thin))
                    .unwrap()
                    .id
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(files(&t.path().join("volumes")).len(), 2);
}

#[test]
fn thin_reservations_limit_what_can_be_promised() {
    let t = tempfile::tempdir().unwrap();
    let pool = open(t.path());
    let before = pool.capacity().unwrap();
    pool.create_volume(&req("r", 64 * MIB as i64, Allocation::Thin))
        .unwrap();
    let after = pool.capacity().unwrap();
    assert_eq!(after.reserved_bytes, before.reserved_bytes + 64 * MIB);
    let too_big = (after.headroom() + GIB).min(size::MAX_SIZE) as i64;
    assert!(matches!(
        pool.create_volume(&req("r2", too_big, Allocation::Thin)),
        Err(PoolError::ResourceExhausted(_)) | Err(PoolError::OutOfRange(_))
    ));
}

/// The change counter the LoopPool publisher polls: every change to the records moves it, and
/// a call that changes nothing (an idempotent repeat, a refusal) does not.
#[test]
fn every_change_to_the_records_is_counted() {
    let t = tempfile::tempdir().unwrap();
    let pool = open(t.path());
    assert_eq!(pool.changes(), 0);
    let v = pool
        .create_volume(&req("pvc-1", 10 * MIB as i64, Allocation::Thin))
        .unwrap();
    assert_eq!(pool.changes(), 1, "create");
    pool.create_volume(&req("pvc-1", 10 * MIB as i64, Allocation::Thin))
        .unwrap();
    assert_eq!(pool.changes(), 1, "an idempotent repeat changes nothing");
    pool.expand_volume(&v.id, 20 * MIB as i64, 0).unwrap();
    assert_eq!(pool.changes(), 2, "expand");
    let s = pool.create_snapshot("snap-1", &v.id, &no_quiesce).unwrap();
    assert_eq!(pool.changes(), 3, "snapshot");
    assert!(pool.delete_snapshot(&s.id).unwrap());
    assert_eq!(pool.changes(), 4, "snapshot delete");
    assert!(pool.delete_volume(&v.id).unwrap());
    assert_eq!(pool.changes(), 5, "delete");
    assert!(!pool.delete_volume(&v.id).unwrap());
    assert_eq!(pool.changes(), 5, "deleting what is gone changes nothing");
}
