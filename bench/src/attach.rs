//! NodeStage + NodePublish and NodeUnpublish + NodeUnstage of fresh 1 GiB volumes, next to
//! the floor doing losetup → mkfs → mount → bind and back by hand, one iteration of each in
//! alternating order.

use std::path::PathBuf;
use std::time::Duration;

use provisioner::{Allocation, FsType};

use crate::csi_ops::{Csi, MountPaths};
use crate::floor::{self, Mkfs};
use crate::load::{blocking, side_by_side, timed};
use crate::plan::Plan;
use crate::results::{Attach, AttachRow, Compared, Named, Target};
use crate::stats::Summary;
use crate::workspace::Workspace;

/// The target: loopvol within 10% of the floor.
pub const ATTACH_LIMIT: f64 = 1.10;

/// Latencies collected over the iterations, by name, in first-seen order.
#[derive(Default)]
struct Samples(Vec<(String, Vec<Duration>)>);

impl Samples {
    fn add(&mut self, name: &str, d: Duration) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(d),
            None => self.0.push((name.to_string(), vec![d])),
        }
    }

    fn summary(&self, name: &str) -> Summary {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| Summary::of_samples(v))
            .unwrap_or_default()
    }

    fn named(&self, names: &[&str]) -> Vec<Named> {
        names
            .iter()
            .map(|n| Named {
                name: n.to_string(),
                summary: self.summary(n),
            })
            .collect()
    }
}

const LV_UP: &str = "loopvol: NodeStage+NodePublish";
const LV_DOWN: &str = "loopvol: NodeUnpublish+NodeUnstage";
const FL_UP: &str = "floor: stage+publish";
const FL_DOWN: &str = "floor: unpublish+unstage";
const RPC: &str = "loopvol: NodeGetCapabilities (the RPC round trip alone)";

/// One loopvol iteration: create (untimed), stage, publish, unpublish, unstage, delete.
async fn loopvol_iteration(
    csi: &Csi,
    root: PathBuf,
    tag: String,
    fs: FsType,
    bytes: u64,
    s: &mut Samples,
) -> anyhow::Result<()> {
    let id = csi.create(&tag, bytes, fs, Allocation::Thin).await?;
    let paths = MountPaths::prepare(&root, &tag)?;
    let (rpc, r) = timed(csi.node_capabilities()).await;
    r?;
    s.add(RPC, rpc);
    let result = async {
        let (stage, r) = timed(csi.stage(&id, &paths.staging, fs)).await;
        r?;
        let (publish, r) = timed(csi.publish(&id, &paths.staging, &paths.target, fs)).await;
        r?;
        let (unpublish, r) = timed(csi.unpublish(&id, &paths.target)).await;
        r?;
        let (unstage, r) = timed(csi.unstage(&id, &paths.staging)).await;
        r?;
        s.add("loopvol: NodeStageVolume", stage);
        s.add("loopvol: NodePublishVolume", publish);
        s.add("loopvol: NodeUnpublishVolume", unpublish);
        s.add("loopvol: NodeUnstageVolume", unstage);
        s.add(LV_UP, stage + publish);
        s.add(LV_DOWN, unpublish + unstage);
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        let _ = csi.unpublish(&id, &paths.target).await;
        let _ = csi.unstage(&id, &paths.staging).await;
    }
    let (delete, r) = timed(csi.delete(&id)).await;
    s.add("loopvol: DeleteVolume (not in the ratio)", delete);
    result.and(r)
}

/// One floor iteration: sparse image (untimed), losetup → mkfs → mount → bind, and back.
async fn floor_iteration(
    root: PathBuf,
    tag: String,
    fs: FsType,
    bytes: u64,
    mkfs: Mkfs,
    s: &mut Samples,
) -> anyhow::Result<bool> {
    let (up, down, extras, dio) = blocking(move || {
        let image = root.join(format!("{tag}.img"));
        floor::sparse_image(&image, bytes)?;
        let extras = floor::stage_extras(&image, &mkfs);
        let paths = MountPaths::prepare(&root, &tag)?;
        let result = floor::stage_publish(&image, &paths, fs, &mkfs).and_then(|(m, up)| {
            let dio = floor::direct_io(&m.device);
            Ok((up, floor::unpublish_unstage(&m)?, dio))
        });
        let _ = std::fs::remove_file(&image);
        let (up, down, dio) = result?;
        Ok((up, down, extras, dio))
    })
    .await?;
    s.add(FL_UP, up.total());
    s.add(FL_DOWN, down.total());
    s.add("floor: losetup --find --show", up.losetup);
    s.add("floor: mkfs", up.mkfs);
    s.add("floor: mount", up.mount);
    s.add("floor: mkdir + bind mount", up.bind);
    s.add("floor: umount bind + rmdir", down.unbind);
    s.add("floor: umount", down.umount);
    s.add("floor: losetup -d", down.detach);
    s.add("extra in loopvol: blkid -p (probe)", extras.0);
    s.add("extra in loopvol: mkfs -V (version)", extras.1);
    Ok(dio)
}

pub async fn run(plan: &Plan, ws: &Workspace, csi: &Csi) -> anyhow::Result<Attach> {
    let bytes = plan.attach_volume_bytes;
    let lv_root = ws.subdir("attach-loopvol")?;
    let fl_root = ws.subdir("attach-floor")?;
    let mut rows = Vec::new();
    let mut floor_direct_io = true;
    for fs in [FsType::Ext4, FsType::Xfs] {
        let mkfs = Mkfs::for_fs(fs)?;
        let mut lv = Samples::default();
        let mut fl = Samples::default();
        let mut errors = Vec::new();
        eprintln!("  {fs}: {} iterations", plan.attach_iterations);
        for it in 0..plan.attach_iterations {
            let tag = format!("{fs}-{it}");
            let (a, b) = side_by_side(
                it % 2 == 1,
                loopvol_iteration(csi, lv_root.clone(), tag.clone(), fs, bytes, &mut lv),
                floor_iteration(fl_root.clone(), tag, fs, bytes, mkfs.clone(), &mut fl),
            )
            .await;
            if let Err(e) = a {
                errors.push(format!("loopvol: {e:#}"));
            }
            match b {
                Ok(dio) => floor_direct_io &= dio,
                Err(e) => errors.push(format!("floor: {e:#}")),
            }
        }
        let mkfs_command = format!("{} {}", mkfs.program, mkfs.args.join(" "));
        for (phase, lv_name, fl_name, detail) in [
            (
                "stage+publish",
                LV_UP,
                FL_UP,
                &[
                    RPC,
                    "loopvol: NodeStageVolume",
                    "loopvol: NodePublishVolume",
                    "floor: losetup --find --show",
                    "floor: mkfs",
                    "floor: mount",
                    "floor: mkdir + bind mount",
                    "extra in loopvol: blkid -p (probe)",
                    "extra in loopvol: mkfs -V (version)",
                ][..],
            ),
            (
                "unpublish+unstage",
                LV_DOWN,
                FL_DOWN,
                &[
                    "loopvol: NodeUnpublishVolume",
                    "loopvol: NodeUnstageVolume",
                    "floor: umount bind + rmdir",
                    "floor: umount",
                    "floor: losetup -d",
                    "loopvol: DeleteVolume (not in the ratio)",
                ][..],
            ),
        ] {
            let figures = Compared::new(lv.summary(lv_name), fl.summary(fl_name));
            let target = Target::at_most(ATTACH_LIMIT, "floor", figures.ratio_p50);
            let mut breakdown = lv.named(detail);
            breakdown.retain(|n| n.summary.ok > 0);
            breakdown.extend(fl.named(detail).into_iter().filter(|n| n.summary.ok > 0));
            rows.push(AttachRow {
                fs: fs.to_string(),
                phase: phase.to_string(),
                figures,
                target,
                breakdown,
                mkfs_command: mkfs_command.clone(),
                errors: errors.iter().take(5).cloned().collect(),
            });
        }
    }
    Ok(Attach {
        volume_bytes: bytes,
        iterations: plan.attach_iterations,
        rows,
        floor_direct_io,
    })
}
