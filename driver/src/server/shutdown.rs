//! A stop that ends within a known time. Between SIGTERM and SIGKILL the kubelet gives a
//! container `terminationGracePeriodSeconds` (30 s by default; manifests/node.yaml keeps the
//! default). A graceful gRPC shutdown alone has no bound: it waits for every in-flight call,
//! and the router keeps long-lived HTTP/2 connections to a node's pool API whose calls (a
//! snapshot copy, a metadata stream) can outlast the grace period, so the process was killed
//! with its loop nodes unremoved and the node had no plugin for the rest of the grace period.
//!
//! So a stop has a budget (`--shutdown-timeout`): the servers stop accepting and drain their
//! in-flight calls for at most half of it, and what is left goes to background work (removing
//! idle loop nodes) before the process exits. Calls still running then are abandoned as a kill
//! would abandon them; everything the driver writes is crash-safe, and the freeze guardian
//! thaws a filesystem whose snapshot was cut short.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// The stop signal, fanned out to every listener, with the time it came and the budget.
#[derive(Clone)]
pub struct Stop {
    at: watch::Receiver<Option<Instant>>,
    budget: Duration,
}

impl Stop {
    /// Watch `signal`; the stop starts when it resolves.
    pub fn new(signal: impl Future<Output = ()> + Send + 'static, budget: Duration) -> Stop {
        let (tx, at) = watch::channel(None);
        tokio::spawn(async move {
            signal.await;
            let _ = tx.send(Some(Instant::now()));
        });
        Stop { at, budget }
    }

    /// Resolves when the stop has been asked for; returns when it was.
    pub async fn requested(&self) -> Instant {
        let mut rx = self.at.clone();
        let at = rx.wait_for(Option::is_some).await.map(|at| *at);
        match at {
            Ok(Some(at)) => at,
            // The signal task is gone without a signal: never.
            _ => std::future::pending().await,
        }
    }

    /// The stop as a future of its own, for a server's shutdown signal.
    pub fn signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let s = self.clone();
        async move {
            s.requested().await;
        }
    }

    /// When in-flight calls are given up on: half the budget after the signal.
    fn drain_deadline(&self, at: Instant) -> Instant {
        at + self.budget / 2
    }

    /// What is left of the budget now (zero before a stop was asked for, or once it is spent).
    pub fn remaining(&self) -> Duration {
        (*self.at.borrow())
            .map(|at| (at + self.budget).saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Run `server` (a gRPC server that stops accepting on [`Stop::requested`] and then waits
    /// for its in-flight calls) until it ends, but no longer than the drain deadline. Idle
    /// connections are closed by the server's own graceful shutdown (HTTP/2 GOAWAY); a call
    /// still running at the deadline is dropped with the server future.
    pub async fn bounded<E>(
        &self,
        what: &str,
        server: impl Future<Output = Result<(), E>>,
    ) -> Result<(), E> {
        let deadline = async {
            let at = self.requested().await;
            tokio::time::sleep_until(self.drain_deadline(at)).await;
        };
        tokio::select! {
            // A server that has ended says how, even when the deadline has come too.
            biased;
            r = server => r,
            () = deadline => {
                tracing::warn!(
                    server = what,
                    waited = ?self.budget / 2,
                    "calls still in flight at the shutdown deadline: abandoned"
                );
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server whose call never ends is given up on half the budget after the signal; one
    /// that drains in time returns its own result.
    #[tokio::test]
    async fn in_flight_calls_are_bounded_by_half_the_budget() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = Stop::new(
            async move {
                let _ = rx.await;
            },
            Duration::from_millis(2000),
        );
        assert_eq!(stop.remaining(), Duration::ZERO, "no stop asked for yet");
        let started = tokio::time::Instant::now();
        let s = stop.clone();
        let hung = tokio::spawn(async move {
            s.bounded("test", std::future::pending::<Result<(), ()>>())
                .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(()).unwrap();
        assert_eq!(hung.await.unwrap(), Ok(()));
        let took = started.elapsed();
        assert!(
            // Not before the drain deadline (0.3 s + 1 s); well before "never" on a loaded
            // machine.
            took >= Duration::from_millis(1300) && took < Duration::from_secs(10),
            "{took:?}"
        );
        assert!(stop.remaining() <= Duration::from_millis(1000));
        let quick = stop.bounded("test", async { Err::<(), _>("failed") }).await;
        assert_eq!(quick, Err("failed"));
    }
}
