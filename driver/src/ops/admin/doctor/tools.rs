//! The filesystem tools the driver runs, found in PATH the way `Command` will find them.

use std::ffi::OsString;

use provisioner::FsType;

use super::Check;
use crate::shared::tools::{find, needs, package_of};

/// One check per filesystem in `fs_types`, plus blkid, which every mount volume needs.
pub fn check(fs_types: &[FsType]) -> Vec<Check> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut out: Vec<Check> = fs_types
        .iter()
        .map(|fs| {
            let tools = needs(*fs);
            let package = package_of(tools[0]).unwrap_or_default();
            one(&format!("{fs} tools"), tools, package, &path)
        })
        .collect();
    out.push(one("blkid", &["blkid"], "util-linux", &path));
    out
}

fn one(name: &str, tools: &[&str], package: &str, path: &OsString) -> Check {
    let (found, missing): (Vec<_>, Vec<_>) = tools
        .iter()
        .map(|t| (*t, find(t, path)))
        .partition(|(_, p)| p.is_some());
    if missing.is_empty() {
        let list: Vec<String> = found
            .iter()
            .filter_map(|(_, p)| p.as_ref().map(|p| p.display().to_string()))
            .collect();
        return Check::pass(name, list.join(", "));
    }
    let names: Vec<&str> = missing.iter().map(|(t, _)| *t).collect();
    Check::fail(
        name,
        format!("{} not found in PATH", names.join(", ")),
        format!(
            "install {package} (apt-get install {package} / dnf install {package}) in the \
             driver's image or host, or add its directory to PATH"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_name_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let path = OsString::from(dir.path());
        let c = one("ext4 tools", &["mkfs.ext4", "e2fsck"], "e2fsprogs", &path);
        match c.verdict {
            super::super::Verdict::Fail { problem, fix } => {
                assert!(problem.contains("mkfs.ext4, e2fsck"), "{problem}");
                assert!(fix.contains("e2fsprogs"));
            }
            v => panic!("{v:?}"),
        }
    }
}
