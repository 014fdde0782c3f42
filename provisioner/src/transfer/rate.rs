//! The node's transfer rate cap (`serve --transfer-rate-limit`): one token bucket shared by
//! every transfer job of the node, so copies together cannot starve the pods' IO. The bucket
//! holds at most one second of tokens (a burst after an idle time is one second's worth).

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimit {
    /// Bytes per second; 0 is unlimited.
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(bytes_per_second: u64) -> Self {
        RateLimit {
            rate: bytes_per_second,
            state: Mutex::new((bytes_per_second as f64, Instant::now())),
        }
    }

    pub fn unlimited() -> Self {
        Self::new(0)
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.rate
    }

    /// Wait until `n` bytes may go. Tokens go negative when a chunk is larger than the
    /// bucket: the debt is paid by the next caller's wait, so the average holds.
    pub fn take(&self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let rate = self.rate as f64;
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * rate).min(rate);
            s.1 = now;
            s.0 -= n as f64;
            if s.0 < 0.0 {
                Duration::from_secs_f64(-s.0 / rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_rate_holds() {
        let r = RateLimit::new(8 << 20);
        let start = Instant::now();
        // One second of burst, then 8 MiB more at 8 MiB/s: about one second.
        for _ in 0..16 {
            r.take(1 << 20);
        }
        let t = start.elapsed();
        assert!(
            t >= Duration::from_millis(900) && t < Duration::from_secs(3),
            "{t:?}"
        );
        let u = RateLimit::unlimited();
        let start = Instant::now();
        u.take(1 << 40);
        assert!(start.elapsed() < Duration::from_millis(50));
    }
}
