//! Means with bootstrap confidence intervals, and the share of the teacher's lead a student closed.

use serde::Serialize;

/// A mean over items with its 95% bootstrap percentile interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// The mean.
    pub mean: f64,
    /// The 2.5th percentile of the bootstrap means.
    pub low: f64,
    /// The 97.5th percentile of the bootstrap means.
    pub high: f64,
}

/// The mean of `values` and its 95% interval from `resamples` bootstrap resamples drawn with a
/// fixed `seed`, so the same scores always give the same interval. `None` for no values.
pub fn bootstrap(values: &[f64], resamples: usize, seed: u64) -> Option<Estimate> {
    if values.is_empty() {
        return None;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    if resamples == 0 || values.len() == 1 {
        return Some(Estimate { mean, low: mean, high: mean });
    }
    let mut random = fastrand::Rng::with_seed(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..values.len()).map(|_| values[random.usize(..values.len())]).sum::<f64>() / values.len() as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |quantile: f64| means[((quantile * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    Some(Estimate { mean, low: at(0.025), high: at(0.975) })
}

/// `(student - base) / (teacher - base)`: 0 where the base stands, 1 at the teacher. `None` when
/// the teacher does not lead the base (nothing to close).
pub fn gap_closed(student: f64, base: f64, teacher: f64) -> Option<f64> {
    let lead = teacher - base;
    (lead.abs() > 1e-12).then(|| (student - base) / lead)
}

/// The `quantile` (0..=1) of `values` by the nearest rank, `None` when empty.
pub fn quantile(values: &[f64], quantile: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (quantile.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).round() as usize;
    Some(sorted[rank])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_interval_contains_the_mean_and_narrows_with_more_items() {
        let small: Vec<f64> = (0..20).map(|index| f64::from(index % 2)).collect();
        let large: Vec<f64> = (0..2000).map(|index| f64::from(index % 2)).collect();
        let small_estimate = bootstrap(&small, 2000, 7).expect("estimate");
        let large_estimate = bootstrap(&large, 2000, 7).expect("estimate");
        assert_eq!(small_estimate.mean, 0.5);
        assert!(small_estimate.low < 0.5 && small_estimate.high > 0.5, "{small_estimate:?}");
        assert!(large_estimate.high - large_estimate.low < (small_estimate.high - small_estimate.low) / 4.0);
        // Same inputs and seed, same interval.
        assert_eq!(bootstrap(&small, 2000, 7), Some(small_estimate));
        // A constant has a point interval; no values, no estimate.
        assert_eq!(bootstrap(&[1.0; 10], 500, 1), Some(Estimate { mean: 1.0, low: 1.0, high: 1.0 }));
        assert_eq!(bootstrap(&[], 500, 1), None);
    }

    #[test]
    fn gap_closed_is_the_share_of_the_teachers_lead() {
        assert_eq!(gap_closed(0.2, 0.2, 0.9), Some(0.0));
        assert_eq!(gap_closed(0.9, 0.2, 0.9), Some(1.0));
        assert!((gap_closed(0.55, 0.2, 0.9).expect("gap") - 0.5).abs() < 1e-12);
        assert_eq!(gap_closed(0.5, 0.4, 0.4), None);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
    }
}
