//! Block device support: the node's data path can hand out a device.

use super::Check;
use crate::datapath::default_path;

const NAME: &str = "kernel loop support";

pub fn loop_support() -> Check {
    match default_path().ready() {
        Ok(detail) => Check::pass(NAME, detail),
        Err(e) => Check::fail(NAME, e.problem, e.fix),
    }
}
