//! The driver's error type and the one place where errors become gRPC status codes. Every RPC
//! returns `Result<_, Error>` internally; choosing the code here keeps the mapping consistent and
//! reviewable against the spec's error tables.

use provisioner::PoolError;
use std::io;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pool(PoolError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unimplemented(String),
    /// An offset or size outside what the object has (a stream resumed past its end).
    #[error("{0}")]
    OutOfRange(String),
    /// A kernel call failed; `context` says which and on what.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A device's cached writes cannot reach its backing file now (retried already): a full
    /// pool under a thin volume. Transient: the CO retries, and it succeeds once space is
    /// freed.
    #[error(
        "flush {device}: {source}: writes to its backing file fail (is the pool's filesystem \
         full?); retry once space is freed"
    )]
    WriteBack {
        device: String,
        #[source]
        source: io::Error,
    },
    /// An external tool (mkfs, fsck, resize2fs...) failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: String,
        stderr: String,
    },
    /// A program the node runs is not installed.
    #[error(
        "{program} is not installed on this node: install {package} (apt-get install {package}) \
         in the node plugin's image or on the host"
    )]
    MissingTool { program: String, package: String },
    #[error("{0}")]
    Internal(String),
    /// Not reachable now; the caller retries (a router's node plugin that is restarting).
    #[error("{0}")]
    Unavailable(String),
    /// Another loopvol's answer, passed on as it came (a router forwarding to a node).
    #[error("{}", .0.message())]
    Forwarded(Status),
}

/// A pool error, unless it is one of ours coming back through a pool hook: then ours, as it was.
impl From<PoolError> for Error {
    fn from(p: PoolError) -> Self {
        match p {
            PoolError::Hook(h) => match h.downcast::<Error>() {
                Ok(e) => *e,
                Err(other) => Error::Pool(PoolError::Hook(other)),
            },
            p => Error::Pool(p),
        }
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Forwarded(s)
    }
}

impl Error {
    pub fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::Pool(p) => match p {
                PoolError::InvalidArgument(_) => Code::InvalidArgument,
                PoolError::NotFound(_) => Code::NotFound,
                PoolError::AlreadyExists(_) => Code::AlreadyExists,
                PoolError::OutOfRange(_) => Code::OutOfRange,
                PoolError::ResourceExhausted(_) => Code::ResourceExhausted,
                PoolError::FailedPrecondition(_) => Code::FailedPrecondition,
                PoolError::Aborted(_) => Code::Aborted,
                PoolError::PoolLocked(_) | PoolError::Unavailable(_) => Code::Unavailable,
                PoolError::Hook(h) => h
                    .downcast_ref::<Error>()
                    .map_or(Code::Internal, Error::code),
                PoolError::Io { .. } => Code::Internal,
            },
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) | Error::MissingTool { .. } => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Io { .. } | Error::Command { .. } | Error::Internal(_) => Code::Internal,
            Error::Unavailable(_) | Error::WriteBack { .. } => Code::Unavailable,
            Error::Forwarded(s) => s.code(),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        // The node that answered has counted and logged it; its details stay intact.
        let e = match e {
            Error::Forwarded(s) => return s,
            e => e,
        };
        let code = e.code();
        crate::metrics::count_error(code);
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        } else {
            tracing::info!(code = ?code, error = %e, "request refused");
        }
        Status::new(code, e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Back into the pool's terms, for driver code the pool calls (its quiesce hook): the pool's
/// own errors as they were, and ours carried whole, so that what comes out of the pool's call
/// is the typed error the hook returned (a full pool stays RESOURCE_EXHAUSTED, a busy volume
/// ABORTED, a failed freeze keeps its context).
pub fn to_pool_error(e: Error) -> PoolError {
    match e {
        Error::Pool(p) => p,
        e => PoolError::Hook(Box::new(e)),
    }
}

/// Reject empty required string fields with the field's name in the message.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_errors_keep_their_meaning() {
        let s: Status = Error::from(PoolError::OutOfRange("big".into())).into();
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(s.message(), "big");
        let s: Status = Error::from(PoolError::io("x", io::Error::other("y"))).into();
        assert_eq!(s.code(), Code::Internal);
        assert!(required("volume_id", "").is_err());
    }

    /// A flush that keeps failing is something the CO retries (NodeUnstageVolume has no code
    /// of its own for it), never INTERNAL.
    #[test]
    fn a_failing_flush_is_transient() {
        let e = Error::WriteBack {
            device: "/dev/loop6".into(),
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        let s: Status = e.into();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(
            s.message().starts_with("flush /dev/loop6: "),
            "{}",
            s.message()
        );
    }

    #[test]
    fn hook_errors_come_back_typed() {
        let e = Error::Aborted("volume busy".into());
        let back = Error::from(to_pool_error(e));
        assert!(
            matches!(&back, Error::Aborted(m) if m == "volume busy"),
            "{back:?}"
        );
        let io = Error::io("FIFREEZE /mnt", io::Error::from_raw_os_error(libc::ENOSPC));
        let p = to_pool_error(io);
        assert_eq!(
            Error::Pool(PoolError::Hook(Box::new(Error::Internal("x".into())))).code(),
            Code::Internal
        );
        let back = Error::from(p);
        assert!(
            matches!(&back, Error::Io { context, .. } if context == "FIFREEZE /mnt"),
            "{back:?}"
        );
        let s: Status = back.into();
        assert_eq!(s.code(), Code::Internal);
        assert!(
            s.message().starts_with("FIFREEZE /mnt: "),
            "{}",
            s.message()
        );
    }
}
