//! The one question the pool asks about the node's kernel: is this image in use right now?
//!
//! The pool must never delete an image a block device still reads (a volume deleted while
//! staged, or an orphan image a crash left attached). What "in use" means is the node engine's
//! business (today: a loop device backed by the image, found by identity), so the pool holds
//! only this hook and knows nothing of block devices; the driver installs the real one through
//! [`crate::PoolOptions::in_use`].

use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// The question itself: `Some(what)` uses the image (for messages, e.g. `/dev/loop3`), or `None`.
type UserOf = dyn Fn(&Path) -> Option<String> + Send + Sync;

/// Answers "who uses this image?".
#[derive(Clone)]
pub struct InUse(Arc<UserOf>);

impl InUse {
    pub fn new(f: impl Fn(&Path) -> Option<String> + Send + Sync + 'static) -> Self {
        InUse(Arc::new(f))
    }

    /// For a pool no node uses (tools and tests that never attach anything).
    pub fn nothing() -> Self {
        InUse::new(|_| None)
    }

    /// What uses `image`, if anything.
    pub fn user_of(&self, image: &Path) -> Option<String> {
        (self.0)(image)
    }
}

impl fmt::Debug for InUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InUse(..)")
    }
}
