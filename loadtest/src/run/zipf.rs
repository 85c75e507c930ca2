//! Zipf popularity for the `zipf` scenario's keys.

/// Zipf(s) over ranks 1..=n, sampled by inverting the cumulative weights.
pub(super) struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub(super) fn new(n: usize, s: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|k| {
                total += 1.0 / (k as f64).powf(s);
                total
            })
            .collect::<Vec<_>>();
        Zipf {
            cumulative: cumulative.iter().map(|c| c / total).collect(),
        }
    }

    pub(super) fn sample(&self) -> usize {
        let u: f64 = rand::random();
        self.cumulative
            .partition_point(|c| *c < u)
            .min(self.cumulative.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_low_ranks_and_stays_in_range() {
        let z = Zipf::new(100, 1.0);
        let mut counts = [0u32; 100];
        for _ in 0..20_000 {
            counts[z.sample()] += 1;
        }
        assert!(
            counts[0] > counts[9] && counts[9] > counts[99],
            "{:?}",
            &counts[..10]
        );
        // Rank 1 has weight 1/H(100) ≈ 19%.
        assert!((3000..5000).contains(&counts[0]), "{}", counts[0]);
    }
}
