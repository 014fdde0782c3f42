//! Filesystems that loopvol froze for a snapshot or clone: one a dead loopvol process left
//! frozen (its writers hang until someone thaws it), or one frozen for long by a copy still
//! running. Read from the pool's freeze markers (see `freeze`): a filesystem's frozen state
//! cannot be read without disturbing it, so freezes by other tools are not seen.

use std::path::Path;

use super::Check;
use crate::engine::health::LONG_FREEZE;
use crate::fs::freeze::{self, State};

const NAME: &str = "frozen filesystems";

pub fn check(pool: &Path) -> Check {
    let markers = freeze::all(&pool.join("node"));
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for (hex, st) in &markers {
        let (who, at) = st.marker().map_or_else(
            || (hex.clone(), "its staging path".to_string()),
            |m| (m.volume_id.clone(), m.mount.display().to_string()),
        );
        match st {
            State::Abandoned(m) => problems.push(format!(
                "volume {who} at {at} may be frozen: the loopvol process that froze it{} is gone",
                m.as_ref()
                    .map(|m| format!(" (pid {}, {} s ago)", m.pid, freeze::age(m).as_secs()))
                    .unwrap_or_default()
            )),
            State::Held(m) if freeze::age(m) >= LONG_FREEZE => problems.push(format!(
                "{at} (volume {who}) has been frozen for {} s by a copy in progress (pid {})",
                freeze::age(m).as_secs(),
                m.pid
            )),
            State::Held(_) => notes.push(format!("{at} is frozen for a snapshot or clone")),
        }
    }
    if problems.is_empty() {
        return Check::pass(
            NAME,
            if notes.is_empty() {
                "none frozen by loopvol".to_string()
            } else {
                notes.join("; ")
            },
        );
    }
    Check::fail(
        NAME,
        problems.join("; "),
        "restart the node plugin (it thaws what a killed loopvol left frozen before serving), \
         or run `fsfreeze -u <mount>`; a copy in progress is cut off by --freeze-timeout",
    )
}
