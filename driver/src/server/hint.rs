//! The start-up hint: commands a person can paste, as printed, to try the driver that just
//! started. They name this very binary (by its path when `loopvol` in PATH is another file or
//! none) and add `--endpoint` / `--pool-dir` only where the serving values differ from what
//! `loopvol csi` and `loopvol status` assume by default.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

/// `ready; next: ...` for a driver listening on `socket`, serving the pool at `pool_dir`
/// (none for a router, which has no pool here).
pub fn next_steps(socket: &Path, pool_dir: Option<&Path>) -> String {
    steps(&command_name(), socket, pool_dir)
}

fn steps(bin: &str, socket: &Path, pool_dir: Option<&Path>) -> String {
    let endpoint = format!("unix://{}", socket.display());
    let csi = if default_of("csi", "endpoint").as_deref() == Some(endpoint.as_str()) {
        format!("{bin} csi")
    } else {
        format!("{bin} csi --endpoint {}", quoted(&endpoint))
    };
    let mut out = vec![
        format!("`{csi} info`"),
        format!("`{csi} create-volume --name demo --size 1Gi`"),
    ];
    if let Some(pool) = pool_dir {
        let pool = pool.to_string_lossy();
        if default_of("status", "pool_dir").as_deref() == Some(&*pool) {
            out.push(format!("`{bin} status`"));
        } else {
            out.push(format!("`{bin} status --pool-dir {}`", quoted(&pool)));
        }
    }
    format!("ready; next: {} (docs/operations.md)", out.join(", "))
}

/// How a shell finds this binary: `loopvol` when that is what PATH gives, else its path.
fn command_name() -> String {
    let Ok(me) = std::env::current_exe() else {
        return "loopvol".into();
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    let same = |p: PathBuf| p.canonicalize().ok() == me.canonicalize().ok();
    if crate::shared::tools::find("loopvol", &path).is_some_and(same) {
        "loopvol".into()
    } else {
        quoted(&me.to_string_lossy())
    }
}

/// The default of `--<arg>` of `loopvol <subcommand>`, as clap has it.
fn default_of(subcommand: &str, arg: &str) -> Option<String> {
    let cli = crate::cli::Cli::command();
    let a = cli
        .find_subcommand(subcommand)?
        .get_arguments()
        .find(|a| a.get_id() == arg)?;
    Some(
        a.get_default_values()
            .first()?
            .to_string_lossy()
            .into_owned(),
    )
}

/// `s` as one shell word.
fn quoted(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-:+=@,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_left_out_and_the_rest_given() {
        let h = steps(
            "loopvol",
            Path::new("/run/loopvol/csi.sock"),
            Some(Path::new("/var/lib/loopvol")),
        );
        assert_eq!(
            h,
            "ready; next: `loopvol csi info`, `loopvol csi create-volume --name demo --size \
             1Gi`, `loopvol status` (docs/operations.md)"
        );
        let h = steps(
            "/src/target/release/loopvol",
            Path::new("/tmp/lv/csi.sock"),
            Some(Path::new("/tmp/my pool")),
        );
        assert!(
            h.contains("`/src/target/release/loopvol csi --endpoint unix:///tmp/lv/csi.sock info`"),
            "{h}"
        );
        assert!(
            h.contains("`/src/target/release/loopvol status --pool-dir '/tmp/my pool'`"),
            "{h}"
        );
        let router = steps("loopvol", Path::new("/run/loopvol/csi.sock"), None);
        assert!(!router.contains("status"), "{router}");
    }
}
