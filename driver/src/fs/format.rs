//! Filesystems on volumes: probe, make (only on blank devices), check, grow.
//!
//! mkfs is run with feature sets the *running kernel* can mount: a newer mkfs than the kernel
//! (new xfsprogs or e2fsprogs defaults on an older kernel) otherwise makes filesystems that fail
//! to mount, a known failure of other local-volume drivers. Tools run with argument vectors,
//! never through a shell.

use std::path::Path;
use std::process::{Command, Stdio};

use provisioner::FsType;

use crate::error::{Error, Result};
use crate::shared::kernel::{self, Version};

/// A default-on feature that needs a minimum kernel, and how to turn it off.
struct Feature {
    /// Tool version from which mkfs enables it by default.
    since_tool: Version,
    /// First kernel that can mount a filesystem with it.
    min_kernel: Version,
    /// Arguments that disable it.
    disable: &'static [&'static str],
}

const EXT4_FEATURES: &[Feature] = &[
    Feature {
        since_tool: Version(1, 47),
        min_kernel: Version(5, 15),
        disable: &["-O", "^orphan_file"],
    },
    Feature {
        since_tool: Version(1, 47),
        min_kernel: Version(4, 4),
        disable: &["-O", "^metadata_csum_seed"],
    },
    Feature {
        since_tool: Version(1, 43),
        min_kernel: Version(3, 18),
        disable: &["-O", "^metadata_csum"],
    },
];

const XFS_FEATURES: &[Feature] = &[
    Feature {
        since_tool: Version(5, 15),
        min_kernel: Version(5, 10),
        disable: &["-m", "bigtime=0"],
    },
    Feature {
        since_tool: Version(5, 15),
        min_kernel: Version(5, 10),
        disable: &["-m", "inobtcount=0"],
    },
    Feature {
        since_tool: Version(6, 5),
        min_kernel: Version(5, 19),
        disable: &["-i", "nrext64=0"],
    },
];

const BTRFS_FEATURES: &[Feature] = &[Feature {
    since_tool: Version(5, 15),
    min_kernel: Version(4, 5),
    disable: &["-R", "^free-space-tree"],
}];

fn mkfs_program(fs: FsType) -> &'static str {
    match fs {
        FsType::Ext4 => "mkfs.ext4",
        FsType::Xfs => "mkfs.xfs",
        FsType::Btrfs => "mkfs.btrfs",
    }
}

/// The mkfs arguments (without the device) for `fs`, made by `tool` version, for `kernel`.
/// Discards are skipped: the backing file of a new volume is already sparse.
pub fn mkfs_args(fs: FsType, tool: Version, kernel: Version) -> Vec<String> {
    // 4 KiB blocks and sectors always: mke2fs picks 1 KiB blocks for small devices, and such a
    // filesystem cannot mount on a loop device whose logical block size is 4 KiB (direct I/O
    // over some pool filesystems), so the same image would mount or not depending on where
    // and how it is attached.
    let (base, features): (&[&str], _) = match fs {
        FsType::Ext4 => (
            &[
                "-q",
                "-b",
                "4096",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            ],
            EXT4_FEATURES,
        ),
        FsType::Xfs => (&["-q", "-K", "-s", "size=4096"], XFS_FEATURES),
        FsType::Btrfs => (&["-q", "-K"], BTRFS_FEATURES),
    };
    let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    for f in features {
        if tool >= f.since_tool && kernel < f.min_kernel {
            args.extend(f.disable.iter().map(|s| s.to_string()));
        }
    }
    args
}

/// Run a tool, returning its stdout; a non-zero exit is an error carrying its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => crate::shared::tools::missing(program),
            _ => Error::io(format!("run {program}"), e),
        })?;
    Ok(out)
}

fn run_ok(program: &str, args: &[&str]) -> Result<String> {
    let out = run(program, args)?;
    if !out.status.success() {
        return Err(Error::Command {
            program: program.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Version of a mkfs tool (they print it on stdout or stderr). Asked once per process: a
/// stage should not pay for an extra exec, and the tools do not change under a running driver
/// (an upgrade of the node image restarts it).
fn tool_version(program: &str) -> Result<Version> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashMap<String, Version>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(v) = seen.lock().unwrap_or_else(|e| e.into_inner()).get(program) {
        return Ok(*v);
    }
    let v = ask_tool_version(program)?;
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(program.to_string(), v);
    Ok(v)
}

fn ask_tool_version(program: &str) -> Result<Version> {
    let out = run(program, &["-V"])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    kernel::parse_version(&text)
        .ok_or_else(|| Error::Internal(format!("cannot tell the version of {program}: {text:?}")))
}

/// What is on a device: `None` when blank, else the signature blkid found (a filesystem type,
/// or a description of a partition table / unknown signature, which also counts as data).
pub fn probe(device: &Path) -> Result<Option<String>> {
    let dev = device.to_string_lossy();
    let out = run("blkid", &["-p", "-o", "export", &dev])?;
    match out.status.code() {
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let value = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key).map(|v| v.to_string()))
            };
            Ok(Some(
                value("TYPE=")
                    .or_else(|| value("PTTYPE=").map(|p| format!("partition table ({p})")))
                    .unwrap_or_else(|| "unknown signature".into()),
            ))
        }
        // 2: no signature found: the device is blank.
        Some(2) => Ok(None),
        _ => Err(Error::Command {
            program: "blkid".into(),
            status: out.status.to_string(),
            stderr: format!(
                "{} (ambivalent or unreadable signatures are never formatted over)",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
    }
}

/// Make a filesystem on a device the caller has just probed blank.
pub fn mkfs(device: &Path, fs: FsType) -> Result<()> {
    mkfs_with(device, fs, false)
}

/// [`mkfs`], with ext4's `encrypt` feature when `encrypt` (an fscrypt volume: policies can be
/// set on its directories). Only ext4 has it here; asking for it on another is refused.
pub fn mkfs_with(device: &Path, fs: FsType, encrypt: bool) -> Result<()> {
    let program = mkfs_program(fs);
    let tool = tool_version(program)?;
    let kernel = kernel::running();
    let mut args = mkfs_args(fs, tool, kernel);
    if encrypt {
        if fs != FsType::Ext4 {
            return Err(Error::FailedPrecondition(format!(
                "file encryption needs ext4, not {fs}"
            )));
        }
        args.extend(["-O".to_string(), "encrypt".to_string()]);
    }
    args.push(device.to_string_lossy().into_owned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    tracing::info!(device = %device.display(), fs = %fs, tool = %tool, kernel = %kernel, args = ?argv, "making filesystem");
    // mkfs opens the device exclusively and refuses when anything else holds it so. The caller
    // has just found the device blank and unclaimed under the volume's lock, so such a holder
    // is one of a moment (another process's attach attempt on a device it lost the race for
    // claims it briefly): once it lets go (within 100 ms), mkfs is asked again, a few times.
    // A holder that stays (a mount in another namespace) gets mkfs's own refusal.
    for attempt in 1.. {
        match run_ok(program, &argv) {
            Err(e @ Error::Command { .. }) if attempt < 4 && busy_refusal(&e) => {
                if !released_soon(device) {
                    return Err(e);
                }
                tracing::warn!(device = %device.display(), attempt, error = %e,
                    "mkfs found the device held for a moment; asking again");
            }
            r => return r.map(|_| ()),
        }
    }
    unreachable!("the loop above returns")
}

fn busy_refusal(e: &Error) -> bool {
    matches!(e, Error::Command { stderr, .. } if stderr.contains("in use") || stderr.contains("busy"))
}

/// Does whatever holds `device` exclusively let go of it within 100 ms?
fn released_soon(device: &Path) -> bool {
    for _ in 0..20 {
        if !crate::datapath::blockdev::claimed(device) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

/// Check a filesystem before mounting where that is meaningful: e2fsck replays the journal and
/// fixes what is safe to fix. xfs and btrfs recover their logs at mount time.
pub fn check(device: &Path, fs: FsType) -> Result<()> {
    if fs != FsType::Ext4 {
        return Ok(());
    }
    let dev = device.to_string_lossy();
    let out = run("e2fsck", &["-p", &dev])?;
    match out.status.code() {
        // 0: clean; 1: errors fixed; 2: fixed, reboot advised (irrelevant for an unmounted fs).
        Some(0..=2) => Ok(()),
        _ => Err(Error::FailedPrecondition(format!(
            "e2fsck found errors on {} it cannot fix automatically ({}): {}; run e2fsck by hand",
            device.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        ))),
    }
}

/// Grow a mounted filesystem to fill its (already enlarged) device.
pub fn grow(fs: FsType, device: &Path, mount_point: &Path) -> Result<()> {
    let dev = device.to_string_lossy();
    let mnt = mount_point.to_string_lossy();
    match fs {
        FsType::Ext4 => run_ok("resize2fs", &[&dev]).map_err(|e| match e {
            // The kernel demands CAP_SYS_RESOURCE for online ext4 resizing; containers and
            // sandboxes without it get EPERM. Say so, and what happens instead.
            Error::Command { stderr, .. } if stderr.contains("Permission denied") => {
                online_resize_refused(&stderr)
            }
            e => e,
        }),
        FsType::Xfs => run_ok("xfs_growfs", &[&mnt]),
        FsType::Btrfs => run_ok("btrfs", &["filesystem", "resize", "max", &mnt]),
    }
    .map(|_| ())
}

/// The answer when resize2fs may not grow a mounted ext4: one line, quoting only the tool's
/// own error line (its stderr also holds a banner and progress lines).
fn online_resize_refused(stderr: &str) -> Error {
    let why = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("Permission denied");
    let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
    Error::FailedPrecondition(format!(
        "online ext4 resize was refused ({why}); this usually means the driver lacks \
         CAP_SYS_RESOURCE. The filesystem is grown offline at the next NodeStageVolume"
    ))
}

/// Size in bytes of the filesystem on `device`, read from its superblock. Hand-parsed: a few
/// fields at fixed offsets, where asking a tool would cost a process on every stage.
pub fn fs_size(device: &Path, fs: FsType) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let (offset, len) = match fs {
        FsType::Ext4 => (1024, 1024),
        FsType::Xfs => (0, 512),
        FsType::Btrfs => (0x10000, 0x100),
    };
    let mut sb = vec![0u8; len];
    let mut f = std::fs::File::open(device)
        .map_err(|e| Error::io(format!("open {}", device.display()), e))?;
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut sb))
        .map_err(|e| Error::io(format!("read superblock of {}", device.display()), e))?;
    let le32 = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap()) as u64;
    let be32 = |o: usize| u32::from_be_bytes(sb[o..o + 4].try_into().unwrap()) as u64;
    let le64 = |o: usize| u64::from_le_bytes(sb[o..o + 8].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(sb[o..o + 8].try_into().unwrap());
    let size = match fs {
        FsType::Ext4 if sb[0x38..0x3a] == [0x53, 0xEF] => {
            let is_64bit = le32(0x60) & 0x80 != 0;
            let blocks = le32(0x4) | if is_64bit { le32(0x150) << 32 } else { 0 };
            Some(blocks << (10 + le32(0x18)))
        }
        FsType::Xfs if &sb[0..4] == b"XFSB" => Some(be64(8) * be32(4)),
        FsType::Btrfs if &sb[0x40..0x48] == b"_BHRfS_M" => Some(le64(0x70)),
        _ => None,
    };
    size.ok_or_else(|| Error::Internal(format!("{} has no {fs} superblock", device.display())))
}

/// Slack below which a filesystem counts as filling its device (mkfs may leave a partial block
/// or allocation group unused).
const GROW_SLACK: u64 = 1 << 20;

/// Does the filesystem need growing to fill its device (a volume expanded while unstaged, an
/// online resize that was refused, or a restore into a volume larger than its snapshot)?
pub fn needs_growing(device: &Path, fs: FsType, device_size: u64) -> Result<bool> {
    Ok(fs_size(device, fs)? + GROW_SLACK < device_size)
}

/// Grow an unmounted ext4 filesystem to its device if needed; the others grow once mounted.
pub fn grow_offline_if_needed(device: &Path, fs: FsType, device_size: u64) -> Result<bool> {
    if fs != FsType::Ext4 || !needs_growing(device, fs, device_size)? {
        return Ok(false);
    }
    // resize2fs insists on a forced check when the filesystem was mounted after its last
    // full check (`e2fsck -p` skips clean filesystems without recording one).
    let dev = device.to_string_lossy();
    let out = run("e2fsck", &["-f", "-p", &dev])?;
    if !matches!(out.status.code(), Some(0..=2)) {
        return Err(Error::FailedPrecondition(format!(
            "e2fsck -f found errors on {} before growing it ({}); run e2fsck by hand",
            device.display(),
            out.status
        )));
    }
    run_ok("resize2fs", &[&dev])?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root-only: a device held exclusively for a moment when mkfs starts (as a losing
    /// attacher's LOOP_CONFIGURE holds it) is formatted once the holder lets go.
    #[test]
    fn mkfs_waits_out_a_holder_of_a_moment() {
        if !crate::shared::root_or_skip("mkfs_waits_out_a_holder_of_a_moment") {
            return;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let att = crate::datapath::loop_device::attach(&image, false, true).unwrap();
        let _guard = crate::datapath::loop_device::DetachOnDrop {
            image: image.clone(),
            devices: vec![att.device.clone()],
        };
        let held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&att.device)
            .unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            drop(held);
        });
        mkfs(&att.device, FsType::Ext4).unwrap();
        release.join().unwrap();
        assert_eq!(probe(&att.device).unwrap().as_deref(), Some("ext4"));
    }

    #[test]
    fn the_online_resize_refusal_is_one_clean_line() {
        let stderr = "resize2fs 1.47.0 (5-Feb-2023)\nFilesystem at /dev/loop3 is mounted on \
                      /x; on-line resizing required\nresize2fs:   Permission denied to resize \
                      filesystem\n";
        let m = online_resize_refused(stderr).to_string();
        assert!(!m.contains('\n') && !m.contains("  "), "{m:?}");
        assert!(
            m.contains("(resize2fs: Permission denied to resize filesystem)"),
            "{m}"
        );
        assert!(
            m.contains("driver lacks CAP_SYS_RESOURCE. The filesystem"),
            "{m}"
        );
    }

    #[test]
    fn new_tools_on_old_kernels_disable_features() {
        let args = mkfs_args(FsType::Xfs, Version(6, 1), Version(5, 4));
        assert!(args.contains(&"bigtime=0".to_string()), "{args:?}");
        assert!(args.contains(&"inobtcount=0".to_string()));
        // nrext64 only became a default in xfsprogs 6.5.
        assert!(!args.contains(&"nrext64=0".to_string()));
        let args = mkfs_args(FsType::Ext4, Version(1, 47), Version(5, 10));
        assert!(args.contains(&"^orphan_file".to_string()), "{args:?}");
        assert!(!args.contains(&"^metadata_csum".to_string()));
    }

    #[test]
    fn current_kernels_keep_defaults() {
        for fs in FsType::ALL {
            let args = mkfs_args(fs, Version(6, 5), Version(6, 18));
            assert!(
                !args.iter().any(|a| a.starts_with('^') || a.ends_with("=0")),
                "{fs}: {args:?}"
            );
        }
    }

    #[test]
    fn old_tools_are_not_given_flags_they_do_not_know() {
        let args = mkfs_args(FsType::Ext4, Version(1, 42), Version(3, 10));
        assert!(!args.contains(&"^orphan_file".to_string()));
    }
}
