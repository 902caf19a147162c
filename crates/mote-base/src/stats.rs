//! The one percentile definition.

/// Nearest-rank percentile of sorted values (MLPerf LoadGen's definition: the smallest
/// value with at least `p` percent of the values at or below it); NaN when empty.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// [`percentile_sorted`] of unsorted values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, p)
}

/// Median (the 50th percentile) of unsorted values.
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_follow_the_nearest_rank_rule() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_sorted(&v, 50.0), 50.0);
        assert_eq!(percentile_sorted(&v, 95.0), 95.0);
        assert_eq!(percentile_sorted(&v, 99.0), 99.0);
        assert_eq!(percentile_sorted(&v, 100.0), 100.0);
        assert_eq!(percentile_sorted(&v, 0.0), 1.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.0);
        assert!(percentile_sorted(&[], 50.0).is_nan());
    }

    proptest::proptest! {
        #[test]
        fn percentiles_are_ordered_and_taken_from_the_values(v in proptest::collection::vec(0f64..1e3, 1..200)) {
            let mut s = v.clone();
            s.sort_by(f64::total_cmp);
            let (a, b, c) = (percentile_sorted(&s, 50.0), percentile_sorted(&s, 95.0), percentile_sorted(&s, 99.0));
            proptest::prop_assert!(a <= b && b <= c);
            proptest::prop_assert!(s.contains(&a) && s.contains(&c));
        }
    }
}
