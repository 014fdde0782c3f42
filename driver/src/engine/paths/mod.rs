//! Where the node plugin may mount: the confinement of staging, target and volume paths.
//!
//! A path from the CO is accepted only if it lies strictly inside an allowed root (the
//! kubelet's directory, `--kubelet-dir`, plus any `--allowed-root`), is neither the pool, inside
//! it, nor above it, and reaches its target without following a single symbolic link. Roots
//! are the administrator's and may themselves be symlinks; below them, every component is
//! opened with `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)` from the one above, and missing
//! directories are made with `mkdirat` in the directory just opened. Mounts then go through the
//! descriptor (`/proc/self/fd/N`), so a path swapped for a symlink after the check cannot
//! redirect them. A bind mount of the pool inside a root is caught too: the opened directory
//! and each of its ancestors are compared with the pool by device and inode.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
struct Root {
    /// As configured (what the kubelet writes in its requests).
    given: PathBuf,
    /// Resolved, if it exists.
    real: PathBuf,
}

/// The node plugin's allowed roots and its pools.
#[derive(Debug, Clone)]
pub struct Confinement {
    roots: Vec<Root>,
    pools: Vec<PoolDir>,
}

/// A pool directory nothing may be mounted in or over.
#[derive(Debug, Clone)]
struct PoolDir {
    real: PathBuf,
    /// Device and inode, when it exists.
    id: Option<(u64, u64)>,
}

/// A directory or file reached under the confinement, held open (O_PATH).
#[derive(Debug)]
pub struct Opened {
    fd: OwnedFd,
    /// The path it was asked for.
    pub path: PathBuf,
    /// Whether this call created its last component.
    pub created: bool,
}

impl Opened {
    /// The path through which the kernel reaches exactly this descriptor's file.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// (st_dev, st_ino) of the opened file.
    pub fn id(&self) -> Result<(u64, u64)> {
        let st =
            fstat(&self.fd).map_err(|e| Error::io(format!("stat {}", self.path.display()), e))?;
        Ok((st.st_dev, st.st_ino))
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Check what exists; a missing tail is fine, and the last component may be a file.
    Check,
    Dir {
        create: bool,
    },
    File {
        create: bool,
    },
}

fn invalid(field: &str, path: &Path, why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{field} {}: {why}", path.display()))
}

/// `/a//b/./c` → `/a/b/c` (no `..`: request paths with one are refused before this).
fn normal(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

impl Confinement {
    pub fn new(roots: impl IntoIterator<Item = PathBuf>, pool: &Path) -> Confinement {
        Self::with_pools(roots, [pool])
    }

    /// [`Confinement::new`] for a node with several pools: none of them may be touched.
    pub fn with_pools<'a>(
        roots: impl IntoIterator<Item = PathBuf>,
        pools: impl IntoIterator<Item = &'a Path>,
    ) -> Confinement {
        use std::os::unix::fs::MetadataExt;
        let roots = roots
            .into_iter()
            .map(|r| {
                let given = normal(&r);
                let real = std::fs::canonicalize(&given).unwrap_or_else(|_| given.clone());
                Root { given, real }
            })
            .collect();
        let pools = pools
            .into_iter()
            .map(|pool| {
                let real = std::fs::canonicalize(pool).unwrap_or_else(|_| normal(pool));
                let id = std::fs::metadata(&real).ok().map(|m| (m.dev(), m.ino()));
                PoolDir { real, id }
            })
            .collect();
        Confinement { roots, pools }
    }

    /// The allowed roots, as configured.
    pub fn roots(&self) -> Vec<&Path> {
        self.roots.iter().map(|r| r.given.as_path()).collect()
    }

    fn roots_text(&self) -> String {
        let r: Vec<String> = self
            .roots
            .iter()
            .map(|r| r.given.display().to_string())
            .collect();
        r.join(", ")
    }

    /// The root `path` lies in (the deepest, if roots nest) and the rest of it.
    fn locate(&self, field: &str, path: &Path, allow_root: bool) -> Result<(&Root, PathBuf)> {
        let path = normal(path);
        let found = self
            .roots
            .iter()
            .filter_map(|r| {
                let rel = path
                    .strip_prefix(&r.given)
                    .or_else(|_| path.strip_prefix(&r.real))
                    .ok()?;
                Some((r, rel.to_path_buf()))
            })
            .max_by_key(|(r, _)| r.given.components().count());
        let Some((root, rel)) = found else {
            return Err(invalid(
                field,
                &path,
                format!(
                    "is outside the directories loopvol mounts in ({}); see --kubelet-dir and \
                     --allowed-root",
                    self.roots_text()
                ),
            ));
        };
        if rel.as_os_str().is_empty() {
            if allow_root {
                // Only ever opened as the directory holding a target, never used itself.
                return Ok((root, rel));
            }
            return Err(invalid(
                field,
                &path,
                "is an allowed root itself, not a path inside it",
            ));
        }
        let real = root.real.join(&rel);
        for pool in &self.pools {
            if real.starts_with(&pool.real) {
                return Err(invalid(
                    field,
                    &path,
                    format!("lies in the pool ({})", pool.real.display()),
                ));
            }
            if pool.real.starts_with(&real) {
                return Err(invalid(
                    field,
                    &path,
                    format!("contains the pool ({})", pool.real.display()),
                ));
            }
        }
        Ok((root, rel))
    }

    /// Refuse a path loopvol must not mount on or below, before anything is done with it.
    /// What exists of it is walked without following symlinks; a missing tail is fine.
    pub fn check(&self, field: &str, path: &Path) -> Result<()> {
        self.walk(field, path, Want::Check, false).map(drop)
    }

    /// Open the directory at `path`, making missing directories (mode 0750) when `create`.
    pub fn open_dir(&self, field: &str, path: &Path, create: bool) -> Result<Opened> {
        self.walk(field, path, Want::Dir { create }, false)?
            .ok_or_else(|| Error::NotFound(format!("{field} {} does not exist", path.display())))
    }

    /// Open the file at `path` (a raw block publish target), creating it empty (0640) and its
    /// missing parent directories when `create`.
    pub fn open_file(&self, field: &str, path: &Path, create: bool) -> Result<Opened> {
        self.walk(field, path, Want::File { create }, false)?
            .ok_or_else(|| Error::NotFound(format!("{field} {} does not exist", path.display())))
    }

    /// The directory holding `path`, open, and `path`'s last component; `None` when that
    /// directory does not exist.
    pub fn open_parent(&self, field: &str, path: &Path) -> Result<Option<(Opened, OsString)>> {
        let path = normal(path);
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(invalid(field, &path, "has no parent directory"));
        };
        // The path itself must be acceptable, not only its parent (which may be a root).
        self.locate(field, &path, false)?;
        match self.walk(field, parent, Want::Dir { create: false }, true)? {
            Some(p) => Ok(Some((p, name.to_os_string()))),
            None => Ok(None),
        }
    }

    fn walk(
        &self,
        field: &str,
        path: &Path,
        want: Want,
        allow_root: bool,
    ) -> Result<Option<Opened>> {
        let (root, rel) = self.locate(field, path, allow_root)?;
        let mut cur = nix::fcntl::open(
            &root.real,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ENOENT => invalid(
                field,
                path,
                format!("the allowed root {} does not exist", root.given.display()),
            ),
            e => Error::io(format!("open {}", root.real.display()), e),
        })?;
        // `dir`: the directory holding `cur` (for a file, where the pool check starts).
        let mut dir = cur.try_clone().map_err(|e| Error::io("dup", e))?;
        let names: Vec<_> = rel.components().map(|c| c.as_os_str()).collect();
        let mut created = false;
        let mut prefix = root.given.clone();
        for (i, name) in names.iter().enumerate() {
            let last = i + 1 == names.len();
            prefix.push(name);
            let as_file = last && matches!(want, Want::File { .. } | Want::Check);
            let create = match want {
                Want::Dir { create } => create,
                Want::File { create } => create,
                Want::Check => false,
            };
            if as_file && matches!(want, Want::File { create: true }) {
                created = create_file(&cur, name, &prefix)?;
            }
            let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
            if !as_file {
                flags |= OFlag::O_DIRECTORY;
            }
            // No O_NOFOLLOW: with it, a trailing symlink would be opened itself instead of
            // being refused by RESOLVE_NO_SYMLINKS.
            let how = OpenHow::new()
                .flags(flags)
                .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
            let opened = match openat2(&cur, *name, how) {
                Err(Errno::ENOENT) if create && !as_file => {
                    match nix::sys::stat::mkdirat(&cur, *name, Mode::from_bits_truncate(0o750)) {
                        Ok(()) => created = last,
                        Err(Errno::EEXIST) => {}
                        Err(e) => return Err(Error::io(format!("create {}", prefix.display()), e)),
                    }
                    openat2(&cur, *name, how)
                }
                r => r,
            };
            let next = match opened {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    return match want {
                        Want::Check => {
                            self.not_the_pool(field, path, &cur)?;
                            Ok(None)
                        }
                        _ => Ok(None),
                    }
                }
                Err(Errno::ELOOP) => {
                    return Err(invalid(
                        field,
                        path,
                        format!(
                            "{} is a symbolic link, and loopvol follows none",
                            prefix.display()
                        ),
                    ))
                }
                Err(Errno::ENOTDIR) => {
                    return Err(invalid(
                        field,
                        path,
                        format!("{} is not a directory", prefix.display()),
                    ))
                }
                Err(Errno::EXDEV) => {
                    return Err(invalid(field, path, "leaves its allowed root"));
                }
                Err(e) => return Err(Error::io(format!("open {}", prefix.display()), e)),
            };
            dir = std::mem::replace(&mut cur, next);
        }
        let is_dir = fstat(&cur).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
        self.not_the_pool(field, path, if is_dir { &cur } else { &dir })?;
        Ok(Some(Opened {
            fd: cur,
            path: path.to_path_buf(),
            created,
        }))
    }

    /// Refuse `fd` if it is the pool or lies inside it, by device and inode: this also sees
    /// through a bind mount of the pool inside an allowed root.
    fn not_the_pool(&self, field: &str, path: &Path, fd: &OwnedFd) -> Result<()> {
        if self.pools.iter().all(|p| p.id.is_none()) {
            return Ok(());
        }
        let mut cur = fd.try_clone().map_err(|e| Error::io("dup", e))?;
        for _ in 0..4096 {
            let st = fstat(&cur).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
            if let Some(pool) = (self.pools.iter()).find(|p| p.id == Some((st.st_dev, st.st_ino))) {
                return Err(invalid(
                    field,
                    path,
                    format!("lies in the pool ({})", pool.real.display()),
                ));
            }
            let up = nix::fcntl::openat(
                &cur,
                "..",
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(format!("open the parent of {}", path.display()), e))?;
            let pst = fstat(&up).map_err(|e| Error::io("stat", e))?;
            if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino) {
                return Ok(()); // reached /
            }
            cur = up;
        }
        Ok(())
    }
}

mod bind;

pub use bind::bind_dir;

/// Create the empty regular file `name` in `dir`; `false` if something was there already.
fn create_file(dir: &impl AsFd, name: &std::ffi::OsStr, shown: &Path) -> Result<bool> {
    let how = OpenHow::new()
        .flags(OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(0o640))
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
    match openat2(dir, name, how) {
        Ok(_) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(Errno::ENOENT) => Err(Error::NotFound(format!(
            "{} does not exist",
            shown.display()
        ))),
        Err(Errno::ELOOP) => Err(Error::InvalidArgument(format!(
            "{} is a symbolic link, and loopvol follows none",
            shown.display()
        ))),
        Err(e) => Err(Error::io(format!("create {}", shown.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct T {
        dir: tempfile::TempDir,
        c: Confinement,
    }

    fn setup() -> T {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("kubelet");
        std::fs::create_dir_all(root.join("pods")).unwrap();
        std::fs::create_dir_all(dir.path().join("pool/volumes")).unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        let c = Confinement::new([root], &dir.path().join("pool"));
        T { dir, c }
    }

    fn code(r: Result<impl std::fmt::Debug>) -> tonic::Code {
        r.unwrap_err().code()
    }

    #[test]
    fn plain_paths_inside_a_root_are_made_and_opened() {
        let t = setup();
        let p = t.dir.path().join("kubelet/pods/x/volumes/mount");
        t.c.check("target_path", &p).unwrap();
        let o = t.c.open_dir("target_path", &p, true).unwrap();
        assert!(o.created && p.is_dir());
        let again = t.c.open_dir("target_path", &p, true).unwrap();
        assert!(!again.created);
        assert_eq!(o.id().unwrap(), again.id().unwrap());
        let f = t.dir.path().join("kubelet/pods/blk/dev");
        let o = t.c.open_file("target_path", &f, true).unwrap();
        assert!(o.created && f.is_file());
        t.c.check("target_path", &f).unwrap();
    }

    #[test]
    fn outside_the_roots_the_pool_and_symlinks_are_invalid_arguments() {
        let t = setup();
        let k = t.dir.path().join("kubelet");
        std::os::unix::fs::symlink(t.dir.path().join("etc"), k.join("pods/evil")).unwrap();
        std::os::unix::fs::symlink(t.dir.path().join("pool"), k.join("pool-link")).unwrap();
        for p in [
            t.dir.path().join("etc"),
            t.dir.path().join("etc/x"),
            k.clone(),
            k.join("pods/evil"),
            k.join("pods/evil/x/y"),
            k.join("pool-link/volumes"),
            t.dir.path().join("pool/volumes"),
            PathBuf::from("/etc"),
        ] {
            assert_eq!(
                code(t.c.check("staging_target_path", &p)),
                tonic::Code::InvalidArgument,
                "{p:?}"
            );
            assert_eq!(
                code(t.c.open_dir("staging_target_path", &p, true)),
                tonic::Code::InvalidArgument,
                "{p:?}"
            );
        }
        assert!(!t.dir.path().join("etc/x").exists());
        // A root above the pool does not make the pool, or its ancestors, acceptable.
        let wide = Confinement::new([t.dir.path().to_path_buf()], &t.dir.path().join("pool"));
        for p in [t.dir.path().join("pool"), t.dir.path().join("pool/volumes")] {
            assert_eq!(
                code(wide.check("target_path", &p)),
                tonic::Code::InvalidArgument
            );
        }
        let nested = t.dir.path().join("pool").join("x");
        let inner = Confinement::new([t.dir.path().join("pool")], &nested);
        assert_eq!(
            code(inner.check("target_path", &t.dir.path().join("pool/x"))),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn a_bind_mount_of_the_pool_inside_a_root_is_seen_through() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let t = setup();
        let at = t.dir.path().join("kubelet/pods/bound");
        std::fs::create_dir_all(&at).unwrap();
        nix::mount::mount(
            Some(&t.dir.path().join("pool")),
            &at,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let r1 = t.c.check("target_path", &at.join("volumes"));
        let r2 = t.c.check("target_path", &at);
        nix::mount::umount(&at).unwrap();
        assert_eq!(code(r1), tonic::Code::InvalidArgument);
        assert_eq!(code(r2), tonic::Code::InvalidArgument);
    }
}
