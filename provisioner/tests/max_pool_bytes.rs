//! `--max-pool-bytes`: a pool on a shared disk promises at most the cap, thin and thick alike,
//! whatever the disk has free; deleting a volume gives its share back.

use provisioner::params::{Allocation, FsType, VolumeParams};
use provisioner::pool::{CreateRequest, Pool, PoolOptions};
use provisioner::PoolError;

const MIB: u64 = 1 << 20;

fn req(name: &str, bytes: u64, allocation: Allocation) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        required_bytes: bytes as i64,
        limit_bytes: 0,
        params: VolumeParams {
            fs_type: FsType::Ext4,
            allocation,
            ..Default::default()
        },
        needs_filesystem: true,
        source: None,
    }
}

#[test]
fn the_cap_bounds_what_the_pool_promises() {
    let t = tempfile::tempdir().unwrap();
    let (mut pool, _) = Pool::open(PoolOptions::all(t.path(), "node-a")).unwrap();
    let free = pool.capacity().unwrap().headroom();
    assert!(free > 200 * MIB, "the test needs some free space: {free}");
    pool.set_max_bytes(Some(100 * MIB));
    assert_eq!(pool.capacity().unwrap().headroom(), 100 * MIB);

    let a = pool
        .create_volume(&req("a", 60 * MIB, Allocation::Thin))
        .unwrap();
    assert_eq!(pool.capacity().unwrap().headroom(), 40 * MIB);
    let err = pool
        .create_volume(&req("b", 50 * MIB, Allocation::Thick))
        .unwrap_err();
    assert!(matches!(err, PoolError::ResourceExhausted(_)), "{err}");
    pool.create_volume(&req("c", 40 * MIB, Allocation::Thick))
        .unwrap();
    assert_eq!(pool.capacity().unwrap().headroom(), 0);

    pool.delete_volume(&a.id).unwrap();
    assert_eq!(pool.capacity().unwrap().headroom(), 60 * MIB);
}
