//! `loopvol status`, `volume inspect`, `doctor` and `csi`: tools for a person operating a node.
//! Everything that reads a pool here does so without taking its locks (records are written
//! atomically, so reading them is safe), so these tools work next to a running driver.

pub mod csi;
pub mod doctor;
pub mod fs_name;
pub mod output;
pub mod snapshot;
pub mod status;
pub mod volume;

/// How a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// Aligned text for a person.
    #[default]
    Table,
    /// One JSON document, for scripts.
    Json,
}

/// Print `value` as pretty JSON on stdout.
pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
