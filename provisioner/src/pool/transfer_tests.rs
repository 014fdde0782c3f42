//! The sink job and the source image of transfers between nodes, with two pools standing for
//! two nodes and the frames carried in memory instead of over gRPC.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;

use super::*;
use crate::params::FsType;
use crate::pool::transfers::TransferState;
use crate::record::ContentSource;
use crate::size::MIB;
use crate::transfer::{self, Frame, FrameSource, RateLimit, TransferError};

struct Frames(VecDeque<Frame>);

impl FrameSource for Frames {
    fn next_frame(&mut self) -> Result<Option<Frame>, TransferError> {
        Ok(self.0.pop_front())
    }
}

fn open(dir: &Path, node: &str) -> Pool {
    Pool::open(PoolOptions::all(dir, node)).unwrap().0
}

fn req(name: &str, source: ContentSource) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        required_bytes: 0,
        limit_bytes: 0,
        params: VolumeParams {
            fs_type: FsType::Ext4,
            ..Default::default()
        },
        needs_filesystem: false,
        source: Some(source),
    }
}

/// The frames a source node would send for `source`, and their header.
fn stream(a: &Pool, source: &ContentSource) -> (transfer::Header, VecDeque<Frame>) {
    let img = a
        .transfer_source(source, &transfer::new_id(), &no_quiesce)
        .unwrap();
    let mut frames = VecDeque::new();
    let t = transfer::read_image(
        &img.file,
        img.header.image_bytes,
        &img.ranges,
        img.header.digest,
        &mut |c| {
            frames.push_back(Frame::Chunk(c));
            Ok(())
        },
    )
    .unwrap();
    frames.push_back(Frame::Trailer(t));
    (img.header.clone(), frames)
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    ["tmp", "transfers"]
        .iter()
        .flat_map(|d| fs::read_dir(dir.join(d)).unwrap().flatten())
        .map(|e| e.path())
        .collect()
}

#[test]
fn a_transfer_reserves_commits_resumes_fails_and_cancels_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let (da, db) = (t.path().join("a"), t.path().join("b"));
    let a = open(&da, "node-a");
    let mut blank = req("src", ContentSource::Volume(String::new()));
    blank.source = None;
    blank.required_bytes = 64 * MIB as i64;
    let src = a.create_volume(&blank).unwrap();
    let hex = VolumeId::parse(Kind::Volume, &src.id).unwrap().hex;
    let f = File::options()
        .write(true)
        .open(a.image_path(&hex))
        .unwrap();
    f.write_all_at(&[0x5a; 3 << 20], 9 << 20).unwrap();
    f.sync_all().unwrap();
    let source = ContentSource::Volume(src.id.clone());
    let (header, frames) = stream(&a, &source);
    // The temporary snapshot of the volume went with its stream.
    assert!(leftovers(&da).is_empty(), "{:?}", leftovers(&da));
    assert!((3 << 20..8 << 20).contains(&header.data_bytes));

    // Admitted: the whole size is reserved, the record is on disk.
    let b = open(&db, "node-b");
    let r = req("copy", source.clone());
    assert!(matches!(
        b.transfer_state(&r).unwrap(),
        TransferState::Start
    ));
    // Deleted while its stream was being opened: not admitted, nothing written.
    let e = b.begin_transfer(&r, &header, "https://a:1", &transfer::new_id(), &|| false);
    assert!(matches!(e, Err(PoolError::Aborted(_))), "{e:?}");
    assert!(leftovers(&db).is_empty(), "{:?}", leftovers(&db));
    let before = b.capacity().unwrap().reserved_bytes;
    let job = b
        .begin_transfer(&r, &header, "https://a:1", &transfer::new_id(), &|| true)
        .unwrap();
    assert!(b.capacity().unwrap().reserved_bytes >= before + 60 * MIB);
    assert!(matches!(
        b.transfer_state(&r).unwrap(),
        TransferState::Running(_)
    ));
    // The name cannot be created locally beside it (a request without the source's endpoint).
    let mut local = r.clone();
    local.source = None;
    assert!(matches!(
        b.create_volume(&local),
        Err(PoolError::AlreadyExists(_))
    ));
    assert!(matches!(
        b.create_volume_from(&r, &no_quiesce, &a),
        Err(PoolError::Aborted(_))
    ));
    // Same name, other source: ALREADY_EXISTS.
    let other = req("copy", ContentSource::Snapshot("snap-x@node-a".into()));
    assert!(matches!(
        b.transfer_state(&other),
        Err(PoolError::AlreadyExists(_))
    ));

    // The node dies before the job ran: at the next start the record is pending, resumable.
    drop(job);
    drop(b);
    let b = open(&db, "node-b");
    assert_eq!(b.pending_transfers().len(), 1);
    assert!(
        b.capacity().unwrap().reserved_bytes >= 60 * MIB,
        "still promised"
    );
    let job = b
        .begin_transfer(&r, &header, "https://a:1", &transfer::new_id(), &|| true)
        .unwrap();
    let lim = RateLimit::unlimited();
    let changes = b.changes();
    let v = b
        .run_transfer(
            &job,
            &header,
            &mut Frames(frames.clone()),
            &lim,
            &mut |_| {},
        )
        .unwrap();
    // The LoopPool publisher sees the committed volume.
    assert!(b.changes() > changes, "a commit counts as a change");
    assert_eq!(v.size_bytes, 64 * MIB);
    assert!(leftovers(&db).is_empty(), "{:?}", leftovers(&db));
    let got = fs::read(b.image_path(&VolumeId::parse(Kind::Volume, &v.id).unwrap().hex)).unwrap();
    assert_eq!(got, fs::read(a.image_path(&hex)).unwrap());
    assert!(matches!(
        b.transfer_state(&r).unwrap(),
        TransferState::Done(_)
    ));

    // A short stream (no trailer) fails: nothing kept, nothing promised, the error said once.
    let r2 = req("short", source.clone());
    let job = b
        .begin_transfer(&r2, &header, "https://a:1", &transfer::new_id(), &|| true)
        .unwrap();
    let mut short = frames.clone();
    short.pop_back();
    let e = b.run_transfer(&job, &header, &mut Frames(short), &lim, &mut |_| {});
    assert!(matches!(e, Err(PoolError::Unavailable(_))), "{e:?}");
    assert!(leftovers(&db).is_empty(), "{:?}", leftovers(&db));
    assert!(matches!(
        b.transfer_state(&r2).unwrap(),
        TransferState::Failed(PoolError::Unavailable(_))
    ));
    assert!(matches!(
        b.transfer_state(&r2).unwrap(),
        TransferState::Start
    ));

    // DeleteVolume cancels: record and temp image gone, and the job never commits.
    let job = b
        .begin_transfer(&r2, &header, "https://a:1", &transfer::new_id(), &|| true)
        .unwrap();
    assert!(b.delete_volume(&job.record.volume.id).unwrap());
    assert!(leftovers(&db).is_empty(), "{:?}", leftovers(&db));
    let e = b.run_transfer(&job, &header, &mut Frames(frames), &lim, &mut |_| {});
    assert!(matches!(e, Err(PoolError::Aborted(_))), "{e:?}");
    assert!(!b.has_volume(
        &VolumeId::parse(Kind::Volume, &job.record.volume.id)
            .unwrap()
            .hex
    ));
    assert!(leftovers(&db).is_empty(), "{:?}", leftovers(&db));
}
