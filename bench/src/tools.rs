//! Running external tools (losetup, mkfs, fio, git) with argument vectors, never a shell.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// Run `program args...`; its stdout, or an error carrying its stderr.
pub fn run<I, S>(program: &str, args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// stdout and stderr of a tool together, whatever its exit status (for `-V` style queries,
/// which some tools print on stderr); `None` when it cannot be started.
pub fn output_text(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// First line of `program -V` style output, trimmed.
pub fn version_line(program: &str, flag: &str) -> Option<String> {
    output_text(program, &[flag])?
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}
