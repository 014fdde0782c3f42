//! Encrypted volumes' records (encryption.rs): a blank volume gets a fresh salt, every copy of
//! its content (clone, snapshot, group snapshot, restore) carries the source's (a copy into
//! another pool: pools.rs), and requests that cannot be honoured are refused before anything is made.

use super::*;
use crate::encryption::Method;
use crate::group_snapshot::GroupTestHooks;
use crate::params::FsType;
use crate::size::MIB;

fn open(dir: &Path, name: &str) -> Pool {
    let opts = PoolOptions {
        name: name.into(),
        ..PoolOptions::all(dir.join(name), "node-a")
    };
    Pool::open(opts).unwrap().0
}

fn no_quiesce(_: &VolumeRecord) -> Result<Box<dyn Quiesced>, PoolError> {
    Ok(Box::new(()))
}

fn req(name: &str, encryption: Option<Method>, source: Option<ContentSource>) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        required_bytes: 16 * MIB as i64,
        limit_bytes: 0,
        params: VolumeParams {
            fs_type: FsType::Ext4,
            encryption,
            ..Default::default()
        },
        needs_filesystem: true,
        source,
    }
}

fn files_in(dir: &Path) -> usize {
    fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn copies_carry_the_source_salt_and_blank_volumes_get_their_own() {
    let t = tempfile::tempdir().unwrap();
    let pool = open(t.path(), "default");
    let a = pool
        .create_volume(&req("a", Some(Method::Fscrypt), None))
        .unwrap();
    let b = pool
        .create_volume(&req("b", Some(Method::Fscrypt), None))
        .unwrap();
    let ea = a
        .encryption
        .clone()
        .expect("blank encrypted volume has encryption");
    assert_eq!(ea.method, Method::Fscrypt);
    assert_ne!(ea.key_salt, b.encryption.unwrap().key_salt);
    // The salt is in the record on disk, and it is the only encryption state there.
    let hex = VolumeId::parse(Kind::Volume, &a.id).unwrap().hex;
    let on_disk = fs::read_to_string(pool.record_path(&hex)).unwrap();
    assert!(on_disk.contains(&ea.key_salt), "{on_disk}");
    assert!(pool
        .create_volume(&req("plain", None, None))
        .unwrap()
        .encryption
        .is_none());

    // Clone (the StorageClass may or may not say encryption: the copy is ciphertext either way).
    let src = Some(ContentSource::Volume(a.id.clone()));
    let clone = pool.create_volume(&req("c1", None, src.clone())).unwrap();
    assert_eq!(clone.encryption.as_ref(), Some(&ea));
    let clone2 = pool
        .create_volume(&req("c2", Some(Method::Fscrypt), src))
        .unwrap();
    assert_eq!(clone2.encryption.as_ref(), Some(&ea));

    // Snapshot, then restore after the volume is gone: the snapshot kept the salt.
    let snap = pool.create_snapshot("s", &a.id, &no_quiesce).unwrap();
    assert_eq!(snap.encryption.as_ref(), Some(&ea));
    assert!(pool.delete_volume(&a.id).unwrap());
    let restored = pool
        .create_volume(&req(
            "r",
            None,
            Some(ContentSource::Snapshot(snap.id.clone())),
        ))
        .unwrap();
    assert_eq!(restored.encryption.as_ref(), Some(&ea));
    // Idempotent retries of the copies answer the same record.
    assert_eq!(
        pool.create_volume(&req("r", None, Some(ContentSource::Snapshot(snap.id))))
            .unwrap(),
        restored
    );

    // Group snapshots: each member keeps its own volume's salt.
    let (_, members) = pool
        .create_group_snapshot(
            "g",
            &[clone.id.clone(), b.id.clone()],
            &no_quiesce,
            &GroupTestHooks::default(),
        )
        .unwrap();
    for m in members {
        let vol = pool.get(&m.source_volume_id).unwrap();
        assert_eq!(m.encryption, vol.encryption);
    }
}

#[test]
fn impossible_requests_are_refused_and_leave_nothing() {
    let t = tempfile::tempdir().unwrap();
    let pool = open(t.path(), "default");
    let plain = pool.create_volume(&req("plain", None, None)).unwrap();
    let before = files_in(&t.path().join("default").join("volumes"));
    // A plaintext source cannot be made encrypted by copying it.
    let e = pool
        .create_volume(&req(
            "enc-clone",
            Some(Method::Fscrypt),
            Some(ContentSource::Volume(plain.id.clone())),
        ))
        .unwrap_err();
    assert!(matches!(e, PoolError::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("not encrypted"), "{e}");
    // Raw block access to an encrypted volume, blank or restored.
    let mut block = req("blk", Some(Method::Fscrypt), None);
    block.needs_filesystem = false;
    let e = pool.create_volume(&block).unwrap_err();
    assert!(matches!(e, PoolError::InvalidArgument(_)), "{e}");
    let enc = pool
        .create_volume(&req("enc", Some(Method::Fscrypt), None))
        .unwrap();
    let mut block_clone = req("blk2", None, Some(ContentSource::Volume(enc.id.clone())));
    block_clone.needs_filesystem = false;
    let e = pool.create_volume(&block_clone).unwrap_err();
    assert!(matches!(e, PoolError::InvalidArgument(_)), "{e}");
    assert_eq!(
        files_in(&t.path().join("default").join("volumes")),
        before + 2,
        "only the two volumes made on purpose (image + record of enc) exist"
    );
    // The same name with and without encryption: ALREADY_EXISTS, both ways.
    let e = pool.create_volume(&req("plain", Some(Method::Fscrypt), None));
    assert!(matches!(e, Err(PoolError::AlreadyExists(_))), "{e:?}");
    let e = pool.create_volume(&req("enc", None, None));
    assert!(matches!(e, Err(PoolError::AlreadyExists(_))), "{e:?}");
}
