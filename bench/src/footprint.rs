//! Footprint: binary size, start-to-ready time on an empty pool, memory.

use crate::driver::{Driver, Launch, StartTiming};
use crate::workspace::Workspace;

/// Start and stop the driver `reps` times, each on a fresh empty pool.
pub async fn start_times(
    launch: &Launch,
    ws: &Workspace,
    reps: usize,
) -> anyhow::Result<Vec<StartTiming>> {
    let mut out = Vec::with_capacity(reps);
    for r in 0..reps {
        let dir = ws.subdir(&format!("start-{r}"))?;
        let (mut d, t) = Driver::start(
            launch,
            &dir.join("pool"),
            &dir.join("csi.sock"),
            &dir.join("driver.log"),
        )
        .await?;
        d.stop().await?;
        out.push(t);
    }
    Ok(out)
}

pub fn binary_bytes(launch: &Launch) -> u64 {
    std::fs::metadata(&launch.bin).map_or(0, |m| m.len())
}
