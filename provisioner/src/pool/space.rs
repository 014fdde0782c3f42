//! What the pool can still promise: capacity, thin reservations, room for a copy.

use super::*;

impl Pool {
    /// Cap what the pool may promise: the provisioned sizes of all its volumes together stay
    /// at or below `max` (a pool on a shared disk then cannot take all of it). Snapshots are
    /// not counted.
    pub fn set_max_bytes(&mut self, max: Option<u64>) {
        self.max_bytes = max;
    }

    /// Current capacity of the pool.
    pub fn capacity(&self) -> Result<Capacity, PoolError> {
        let reserved = self.reserved_bytes();
        let mut c = Capacity::measure(&self.dir, reserved, self.overcommit_ratio)?;
        if let Some(max) = self.max_bytes {
            let provisioned: u64 = self
                .volumes
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|r| r.size_bytes)
                .sum();
            let pending = self.transfer_reserved_bytes().1;
            c.cap_left_bytes = Some(max.saturating_sub(provisioned + pending));
        }
        Ok(c)
    }

    pub(super) fn reserved_bytes(&self) -> u64 {
        let mut cache = self
            .reserved_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((at, v)) = *cache {
            if at.elapsed() < RESERVED_TTL {
                return v;
            }
        }
        let vols = self.volumes.read().unwrap_or_else(|e| e.into_inner());
        // A volume being filled by a transfer is promised in full (less what it holds).
        let total = self.transfer_reserved_bytes().0
            + vols
                .iter()
                .filter(|(_, r)| r.allocation == Allocation::Thin)
                .map(|(hex, r)| {
                    let used = fs::metadata(self.image_path(hex))
                        .map(|m| m.blocks() * 512)
                        .unwrap_or(0);
                    r.size_bytes.saturating_sub(used)
                })
                .sum::<u64>();
        *cache = Some((Instant::now(), total));
        total
    }

    pub(super) fn adjust_reserved(&self, allocation: Allocation, size: u64) {
        if allocation == Allocation::Thin {
            let mut cache = self
                .reserved_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((_, v)) = cache.as_mut() {
                *v += size;
            }
        }
    }

    pub(crate) fn invalidate_reserved(&self) {
        *self
            .reserved_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Refuse a copy of `image` that the pool's free space cannot hold, before anything is
    /// frozen. A sparse copy needs the image's allocated bytes; a reflink only metadata. Both
    /// keep [`FULL_BYTES`] free, below which the pool counts as full everywhere.
    pub fn ensure_room_for_copy(&self, image: &Path, may_share: bool) -> Result<(), PoolError> {
        let available = Capacity::measure(&self.dir, 0, 1.0)?.available_bytes;
        let data = if may_share && self.reflinks() {
            0
        } else {
            fs::metadata(image).map(|m| m.blocks() * 512).unwrap_or(0)
        };
        let need = data + FULL_BYTES;
        if available < need {
            return Err(PoolError::ResourceExhausted(format!(
                "the pool on node {} has {available} bytes free; copying this volume needs \
                 {need}",
                self.node_id
            )));
        }
        Ok(())
    }

    /// Whether the pool's filesystem shares extents (FICLONE), probed once with two scratch
    /// files in `tmp/`.
    pub fn reflinks(&self) -> bool {
        *self.reflink.get_or_init(|| {
            let probe = || -> std::io::Result<bool> {
                let dir = self.dir.join("tmp");
                let name = |t: &str| dir.join(format!("reflink-probe-{}-{t}", std::process::id()));
                let (a, b) = (name("a"), name("b"));
                let result = (|| {
                    use std::io::Write;
                    // FICLONE reads the source: a write-only descriptor is EBADF, which read
                    // as "cannot reflink" on every filesystem.
                    let mut src = fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&a)?;
                    src.write_all(&[0x5a; 4096])?;
                    src.sync_all()?;
                    let dst = File::create(&b)?;
                    copy::reflink(&src, &dst)
                })();
                let _ = fs::remove_file(&a);
                let _ = fs::remove_file(&b);
                result
            };
            probe().unwrap_or(false)
        })
    }

    /// Bytes actually allocated to a volume's image (what it costs on disk).
    pub fn allocated_bytes(&self, hex: &str) -> Option<u64> {
        fs::metadata(self.image_path(hex))
            .ok()
            .map(|m| m.blocks() * 512)
    }
}
