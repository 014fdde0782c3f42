//! Where a node call's time went, step by step, for its closing log line.
//!
//! A slow NodeStageVolume on a full node is an operator's question ("is it mkfs, the mount,
//! the attach?") that a total cannot answer, and the scale benchmark asks the same of every
//! call. Each mark costs one clock read; nothing is kept once the line is written.

use std::fmt;
use std::time::{Duration, Instant};

/// Durations of the named steps of one call, in the order they ran.
pub struct Steps {
    started: Instant,
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    pub fn start() -> Self {
        let now = Instant::now();
        Steps {
            started: now,
            last: now,
            done: Vec::with_capacity(6),
        }
    }

    /// The step called `name` ended now (it began where the previous one ended).
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done.push((name, now - self.last));
        self.last = now;
    }

    pub fn total(&self) -> Duration {
        self.started.elapsed()
    }
}

/// `attach=0.41 format=5.20 mount=1.13 total=7.02` (milliseconds).
impl fmt::Display for Steps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, d) in &self.done {
            write!(f, "{name}={:.2} ", d.as_secs_f64() * 1e3)?;
        }
        write!(f, "total={:.2}", self.total().as_secs_f64() * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_step_and_the_total() {
        let mut s = Steps::start();
        s.mark("one");
        std::thread::sleep(Duration::from_millis(2));
        s.mark("two");
        let text = s.to_string();
        let fields: Vec<_> = text.split(' ').collect();
        assert_eq!(fields.len(), 3, "{text}");
        assert!(fields[0].starts_with("one="));
        let two: f64 = fields[1].strip_prefix("two=").unwrap().parse().unwrap();
        assert!(two >= 2.0, "{text}");
        let total: f64 = fields[2].strip_prefix("total=").unwrap().parse().unwrap();
        assert!(total >= two, "{text}");
    }
}
