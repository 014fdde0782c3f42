//! The csi-sanity port again, with csi-sanity's block access type: every spec of
//! `tests/sanity.rs` runs with a raw block capability, as csi-sanity does when it is run with
//! `--csi.testvolumeaccesstype=block` (see `BLOCK_ACCESS` there).

#[path = "sanity.rs"]
mod specs;
