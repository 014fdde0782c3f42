//! Percentiles and per-batch summaries. Percentiles interpolate linearly between the two
//! nearest ranks (the "type 7" estimator numpy and most spreadsheets use), so p50 of an even
//! sample is the mean of its two middle values.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `p`-th percentile (0..=100) of `sorted`, which must be sorted ascending.
/// `None` for an empty sample.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    let rank = p / 100.0 * (n - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Median of an unsorted sample.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

/// `num / den`, or `None` when the denominator is not a positive number.
pub fn ratio(num: f64, den: f64) -> Option<f64> {
    (den > 0.0 && num.is_finite() && den.is_finite()).then(|| num / den)
}

/// Latency and throughput of one batch of operations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Operations that succeeded (the latency figures are over these).
    pub ok: usize,
    pub failures: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Wall-clock time of the whole batch.
    pub wall_s: f64,
    /// Successful operations per second of wall-clock time.
    pub ops_per_s: f64,
}

impl Summary {
    pub fn new(latencies: &[Duration], failures: usize, wall: Duration) -> Summary {
        let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let pct = |p| percentile(&ms, p).unwrap_or(0.0);
        let wall_s = wall.as_secs_f64();
        Summary {
            ok: ms.len(),
            failures,
            p50_ms: pct(50.0),
            p99_ms: pct(99.0),
            mean_ms: if ms.is_empty() {
                0.0
            } else {
                ms.iter().sum::<f64>() / ms.len() as f64
            },
            min_ms: ms.first().copied().unwrap_or(0.0),
            max_ms: ms.last().copied().unwrap_or(0.0),
            wall_s,
            ops_per_s: ratio(ms.len() as f64, wall_s).unwrap_or(0.0),
        }
    }

    /// A summary of latencies alone, where throughput is meaningless (sequential samples
    /// taken between other work): `ops_per_s` is 1 / mean.
    pub fn of_samples(latencies: &[Duration]) -> Summary {
        let total: Duration = latencies.iter().sum();
        Summary::new(latencies, 0, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!(close(percentile(&v, 50.0).unwrap(), 50.5));
        assert!(close(percentile(&v, 99.0).unwrap(), 99.01));
        assert!(close(percentile(&v, 0.0).unwrap(), 1.0));
        assert!(close(percentile(&v, 100.0).unwrap(), 100.0));
        assert!(close(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0).unwrap(), 2.5));
        assert!(close(percentile(&[1.0, 3.0, 3.0], 50.0).unwrap(), 3.0));
    }

    #[test]
    fn edge_cases() {
        assert_eq!(percentile(&[], 50.0), None);
        assert!(close(percentile(&[7.0], 99.0).unwrap(), 7.0));
        // Out-of-range percentiles clamp instead of indexing out of bounds.
        assert!(close(percentile(&[1.0, 2.0], 150.0).unwrap(), 2.0));
        assert!(close(median(&[5.0, 1.0, 3.0]).unwrap(), 3.0));
        assert_eq!(ratio(1.0, 0.0), None);
        assert!(close(ratio(3.0, 2.0).unwrap(), 1.5));
    }

    #[test]
    fn summary_of_a_batch() {
        let lat: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        let s = Summary::new(&lat, 2, Duration::from_secs(2));
        assert_eq!((s.ok, s.failures), (10, 2));
        assert!(close(s.p50_ms, 5.5));
        assert!(close(s.min_ms, 1.0) && close(s.max_ms, 10.0));
        assert!(close(s.mean_ms, 5.5));
        assert!(close(s.ops_per_s, 5.0));
        assert!(close(s.p99_ms, 9.91));
        let empty = Summary::new(&[], 3, Duration::from_secs(1));
        assert_eq!((empty.ok, empty.ops_per_s), (0, 0.0));
    }
}
