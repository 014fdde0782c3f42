//! Loop device support: the control device exists and hands out a free device.

use std::path::Path;

use super::Check;
use crate::datapath::loopdev;

const NAME: &str = "kernel loop support";

pub fn loop_support() -> Check {
    if !Path::new("/dev/loop-control").exists() {
        return Check::fail(
            NAME,
            "/dev/loop-control is missing",
            "load the loop module (`modprobe loop`); in a container, run the node plugin \
             privileged with the host's /dev mounted",
        );
    }
    match loopdev::free_device() {
        Ok(n) => Check::pass(
            NAME,
            format!("/dev/loop-control answers; /dev/loop{n} is free"),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("no free loop device: {e}"),
            "run as root (CAP_SYS_ADMIN); if devices are exhausted, raise the loop module's \
             max_loop or detach unused devices (`losetup -a` lists them)",
        ),
    }
}
