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
    /// How this node pulls data from other nodes (restores and clones across nodes).
    pub transfer: TransferSettings,
    ops: Semaphore,
}

/// The node's side of transfers between nodes.
pub struct TransferSettings {
    /// This node's identity towards other nodes' pool APIs; `None` without pool API
    /// certificates (a transfer is then refused).
    pub client_tls: Option<tonic::transport::ClientTlsConfig>,
    /// `--transfer-rate-limit`, shared by every job of the node.
    pub limit: Arc<provisioner::transfer::RateLimit>,
    /// Test-only fault injection (`--test-corrupt-transfer-chunk`): the chunk (0-based) whose
    /// first byte the source flips after digesting it.
    pub corrupt_chunk: Option<u64>,
    /// Copies being started (their volume's hex): opening their source, not admitted yet.
    pub starting: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl TransferSettings {
    /// Whether the copy of volume `hex` is still wanted while it starts.
    pub fn is_starting(&self, hex: &str) -> bool {
        self.starting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(hex)
    }
}

impl Default for TransferSettings {
    fn default() -> Self {
        TransferSettings {
            client_tls: None,
            limit: Arc::new(provisioner::transfer::RateLimit::new(
                crate::shared::units::DEFAULT_TRANSFER_RATE,
            )),
            corrupt_chunk: None,
            starting: Default::default(),
        }
    }
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
            transfer: TransferSettings::default(),
            ops: Semaphore::new(max_concurrent_ops),
        }
    }

    /// How this node pulls from other nodes.
    pub fn with_transfer(mut self, transfer: TransferSettings) -> Self {
        self.transfer = transfer;
        self
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
