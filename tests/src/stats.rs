//! Summaries the benchmarks print.

/// Nearest-rank percentile of unsorted values (NaN when there are none).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = (p * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// p50, p90, p99 and the maximum of unsorted values.
pub fn quartet(v: &[f64]) -> [f64; 4] {
    [0.5, 0.9, 0.99, 1.0].map(|p| percentile(v, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quartet(&v), [50.0, 90.0, 99.0, 100.0]);
        assert_eq!(percentile(&[7.0], 0.5), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
