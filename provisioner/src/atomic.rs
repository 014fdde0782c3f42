//! Crash-safe small-file writes. A record is either the old version or the new one after a crash
//! at any instant: we write a temp file in the same directory, fsync it, rename it over the target
//! and fsync the directory so the rename itself is durable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replace `path` with `data` atomically and durably.
pub fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    write(path, data, true)
}

/// Replace `path` with `data` atomically, without the fsyncs: a crash of the process leaves
/// the old or the new version (the page cache survives it), a power cut may leave either, or
/// nothing, or an empty file. Only for records of state that itself dies with the machine
/// (what the node staged: loop devices and mounts), whose readers treat a damaged record as
/// absent. Two fsyncs are a millisecond or more on most disks, a tenth of a NodeStage.
pub fn write_file_unsynced(path: &Path, data: &[u8]) -> io::Result<()> {
    write(path, data, false)
}

fn write(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Remove `path` durably; a file that is already gone is not an error (deletes are idempotent).
pub fn remove_file(path: &Path) -> io::Result<()> {
    if remove_file_unsynced(path)? {
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
    }
    Ok(())
}

/// Remove `path` without syncing its directory (see [`write_file_unsynced`] for when that is
/// enough). Returns whether there was anything to remove.
pub fn remove_file_unsynced(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// fsync a directory so that entries created, renamed or removed in it survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Is this a temp file left by [`write_file`]?
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_file(&p, b"one").unwrap();
        write_file(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a.json".to_string()]);
        assert!(is_temp_name(".a.json.tmp"));
        assert!(!is_temp_name("a.json"));
    }

    #[test]
    fn remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        fs::write(&p, b"x").unwrap();
        remove_file(&p).unwrap();
        remove_file(&p).unwrap();
        assert!(!p.exists());
    }
}
