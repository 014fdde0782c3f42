use std::io;
use std::path::PathBuf;

/// Everything the pool can refuse or fail at. Variants are chosen by *what the caller should do*
/// (fix the request, retry later, give up), so the driver can map each to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The request itself is malformed; retrying it unchanged cannot succeed.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// A volume of that name exists with properties the request does not accept.
    #[error("{0}")]
    AlreadyExists(String),
    /// A size the driver cannot satisfy at all (as opposed to "not right now").
    #[error("{0}")]
    OutOfRange(String),
    /// Not enough free space (or a topology that excludes this node).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The object is in a state that forbids the operation (e.g. attached to a loop device).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation holds the object; the caller should retry.
    #[error("{0}")]
    Aborted(String),
    /// Something this pool depends on cannot be reached now (a transfer's source node); the
    /// caller retries.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0} is locked: another loopvol process serves this pool in the same role")]
    PoolLocked(PathBuf),
    /// A hook the caller installed (the driver's quiesce) failed: its own error, kept whole
    /// so the caller gets back exactly what its hook said (see the driver's `to_pool_error`).
    #[error("{0}")]
    Hook(Box<dyn std::error::Error + Send + Sync>),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl PoolError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        PoolError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attach a human-readable context to an `io::Result`, so every I/O failure names the file.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, PoolError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, PoolError> {
        self.map_err(|e| PoolError::io(context(), e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, PoolError> {
        self.map_err(|e| PoolError::io(context(), io::Error::from(e)))
    }
}

/// Running out of space while writing is the pool's RESOURCE_EXHAUSTED, not an I/O failure.
pub(crate) fn space_error(what: &str, e: io::Error) -> PoolError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            PoolError::ResourceExhausted(format!("not enough free space in the pool to {what}"))
        }
        _ => PoolError::io(what, e),
    }
}
