//! Latency percentiles and per-interval counts.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(samples: impl IntoIterator<Item = Duration>) -> Percentiles {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        for d in samples {
            h.saturating_record(d.as_micros().max(1) as u64);
        }
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// The cumulative distribution of `samples` as (milliseconds, fraction ≤) points.
pub fn cdf(samples: &[Duration]) -> Vec<(f64, f64)> {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len() as f64;
    // No finer than the chart's pixels: a closed-loop run has 100k samples.
    let step = (ms.len() / CDF_POINTS).max(1);
    ms.iter()
        .enumerate()
        .filter(|(i, _)| (i + 1) % step == 0 || i + 1 == ms.len())
        .map(|(i, v)| (*v, (i + 1) as f64 / n))
        .collect()
}

/// The most points [`cdf`] gives (about: the last one is always kept).
const CDF_POINTS: usize = 1000;

/// How many of `at_ms` fall in each `bucket_ms` interval from 0 to `until_ms`.
pub fn per_interval(at_ms: &[u64], bucket_ms: u64, until_ms: u64) -> Vec<u64> {
    let buckets = (until_ms / bucket_ms + 1) as usize;
    let mut counts = vec![0; buckets];
    for t in at_ms {
        if let Some(c) = counts.get_mut((t / bucket_ms) as usize) {
            *c += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_set() {
        let p = Percentiles::of((1..=100).map(Duration::from_millis));
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99_ms - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max_ms - 100.0).abs() < 0.1, "{p:?}");
        assert_eq!(Percentiles::of([]), Percentiles::default());
    }

    #[test]
    fn cdf_ends_at_one_and_is_sorted() {
        let points = cdf(&[
            Duration::from_millis(30),
            Duration::from_millis(10),
            Duration::from_millis(20),
        ]);
        assert_eq!(
            points,
            vec![(10.0, 1.0 / 3.0), (20.0, 2.0 / 3.0), (30.0, 1.0)]
        );
    }

    #[test]
    fn cdf_of_many_samples_is_thinned_and_still_ends_at_one() {
        let samples: Vec<Duration> = (1..=100_000).map(Duration::from_micros).collect();
        let points = cdf(&samples);
        assert!(points.len() <= CDF_POINTS + 1, "{} points", points.len());
        assert_eq!(points.last(), Some(&(100.0, 1.0)));
        assert!(points
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
    }

    #[test]
    fn intervals_count_each_arrival_once() {
        assert_eq!(
            per_interval(&[0, 49, 50, 120, 999], 50, 150),
            vec![2, 1, 1, 0]
        );
    }
}
