//! Filesystem freeze around snapshots and clones of mounted volumes: FIFREEZE flushes the
//! filesystem and blocks new writes, so the copied image is clean (mounts without journal
//! replay). The guard thaws on drop, so every error path thaws too.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

pub struct Frozen {
    dir: File,
    path: PathBuf,
}

pub fn freeze(mount_point: &Path) -> Result<Frozen> {
    let dir = File::open(mount_point)
        .map_err(|e| Error::io(format!("open {}", mount_point.display()), e))?;
    let mut arg: libc::c_int = 0;
    unsafe { fifreeze(dir.as_raw_fd(), &mut arg) }
        .map_err(|e| Error::io(format!("freeze {}", mount_point.display()), e))?;
    tracing::info!(mount = %mount_point.display(), "filesystem frozen");
    Ok(Frozen {
        dir,
        path: mount_point.to_path_buf(),
    })
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let mut arg: libc::c_int = 0;
        match unsafe { fithaw(self.dir.as_raw_fd(), &mut arg) } {
            Ok(_) => tracing::info!(mount = %self.path.display(), "filesystem thawed"),
            Err(e) => tracing::error!(mount = %self.path.display(), error = %e, "thaw failed"),
        }
    }
}
