//! The state every CSI service shares: the node engine, who we are, and the gate on concurrent
//! kernel work.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::shared::advertise::Advertised;
use crate::shared::Mode;

/// What every service needs: the engine (and through it the pool), who we are, and the gate on
/// concurrent kernel work.
pub struct Driver {
    pub engine: Engine,
    pub driver_name: String,
    pub mode: Mode,
    pub max_volumes_per_node: i64,
    /// The optional capabilities this process advertises.
    pub advertised: Advertised,
    ops: Semaphore,
}

impl std::ops::Deref for Driver {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl Driver {
    pub fn new(
        engine: Engine,
        driver_name: String,
        mode: Mode,
        max_volumes_per_node: i64,
        advertised: Advertised,
        max_concurrent_ops: usize,
    ) -> Self {
        Driver {
            engine,
            driver_name,
            mode,
            max_volumes_per_node,
            advertised,
            ops: Semaphore::new(max_concurrent_ops),
        }
    }

    /// Run blocking work (file allocation, mkfs, mount) off the async runtime, at most
    /// `max_concurrent_ops` at a time; the rest wait their turn instead of piling onto the
    /// kernel.
    pub async fn blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Driver) -> Result<T> + Send + 'static,
    {
        let _permit = self
            .ops
            .acquire()
            .await
            .map_err(|_| Error::Internal("driver is shutting down".into()))?;
        let me = self.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| f(&me)))
            .await
            .map_err(|e| Error::Internal(format!("worker thread failed: {e}")))?
    }
}
