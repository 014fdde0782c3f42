//! The hook the pool runs around a copy of a live volume (the driver freezes its filesystem).

use super::*;

/// A hook run right before a live volume is copied (the driver freezes its filesystem). Its
/// guard is released right after the copy; the copy counts only if the release succeeds.
pub type Quiesce<'a> = &'a dyn Fn(&VolumeRecord) -> Result<Box<dyn Quiesced>, PoolError>;

/// What a [`Quiesce`] hook holds while the copy runs. `release` reports whether the volume
/// really stayed still for the whole copy (a freeze lifted early by a watchdog or by hand makes
/// the copy a torn image, which must not become a snapshot or a clone). Dropping the guard
/// without releasing it still undoes the quiescing, for error paths and panics.
pub trait Quiesced {
    fn release(self: Box<Self>) -> Result<(), PoolError>;
}

impl Quiesced for () {
    fn release(self: Box<Self>) -> Result<(), PoolError> {
        Ok(())
    }
}

pub(super) fn no_quiesce(_: &VolumeRecord) -> Result<Box<dyn Quiesced>, PoolError> {
    Ok(Box::new(()))
}

/// Copy `from` into `dst` with `what` quiesced by `quiesce`: the copy is only good if the
/// release says the source stayed still throughout.
pub(crate) fn copy_quiesced(
    quiesce: Quiesce<'_>,
    what: Option<&VolumeRecord>,
    from: &File,
    dst: &File,
    context: &str,
) -> Result<copy::CopyMethod, PoolError> {
    let guard = match what {
        Some(v) => Some(quiesce(v)?),
        None => None,
    };
    let copied = copy::copy(from, dst).map_err(|e| space_error(context, e));
    let released = guard.map_or(Ok(()), |g| g.release());
    let method = copied?;
    released?;
    Ok(method)
}

/// [`copy_quiesced`] between two pools: a sparse [`crate::transfer`], never a reflink.
pub(crate) fn transfer_quiesced(
    quiesce: Quiesce<'_>,
    what: Option<&VolumeRecord>,
    from: &File,
    dst: &File,
) -> Result<crate::transfer::Method, PoolError> {
    let guard = match what {
        Some(v) => Some(quiesce(v)?),
        None => None,
    };
    let started = Instant::now();
    // A long copy says how far it got every LOG_EVERY bytes, as a sparse copy does.
    let mut next_log = copy::LOG_EVERY;
    let mut progress = |p: copy::Progress| {
        if p.copied_bytes >= next_log {
            next_log = (p.copied_bytes / copy::LOG_EVERY + 1) * copy::LOG_EVERY;
            tracing::info!(
                copied_bytes = p.copied_bytes,
                offset = p.offset,
                total_bytes = p.total_bytes,
                elapsed_s = started.elapsed().as_secs(),
                "transfer between pools in progress"
            );
        }
    };
    let copied = crate::transfer::local::copy(from, dst, &mut progress)
        .map_err(|e| space_error("copy the source from another pool", e));
    let released = guard.map_or(Ok(()), |g| g.release());
    let report = copied?;
    released?;
    tracing::info!(
        data_bytes = report.data_bytes,
        total_bytes = report.total_bytes,
        extents = report.extents.len(),
        method = report.method.as_str(),
        ms = started.elapsed().as_millis() as u64,
        "copied between pools"
    );
    Ok(report.method)
}

pub(crate) fn snapshot_lock_key(hex: &str) -> String {
    format!("snap-{hex}")
}
