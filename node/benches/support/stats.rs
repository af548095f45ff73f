//! Percentiles of measured times.

/// The `p` quantile (0 to 1) of `v`: sorts `v` and returns its element
/// at (len - 1) * p, rounded down.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p) as usize]
}
