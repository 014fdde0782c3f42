//! `cargo run -p manifest-check [REPO_ROOT]`: print every problem in the manifests, one per
//! line, and exit non-zero if there are any.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_check::repo_root().to_path_buf());
    match manifest_check::check_repo(&root) {
        Ok(findings) if findings.is_empty() => {
            println!("manifests OK");
            ExitCode::SUCCESS
        }
        Ok(findings) => {
            for finding in &findings {
                println!("{finding}");
            }
            eprintln!("{} problem(s) in the manifests", findings.len());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot read manifests under {}: {e}", root.display());
            ExitCode::from(2)
        }
    }
}
