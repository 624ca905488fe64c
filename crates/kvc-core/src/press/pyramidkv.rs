//! PyramidKV (kvpress `presses/pyramidkv_press.py`; Cai et al. 2024, arXiv 2406.02069): SnapKV's
//! scores with per-layer budgets shaped like a pyramid, more tokens in lower layers.
//!
//! The press is a [`super::ScorerPress`] with a [`super::snapkv::SnapKv`] scorer and
//! [`super::Allocation::Pyramid`]; this file holds the budget formula.

/// Tokens layer `layer` of `num_layers` keeps out of `q_len` at compression ratio `ratio`
/// (kvpress `PyramidKVPress.get_layer_budget`, after KVCache-Factory's `pyramidkv_utils.py`):
///
/// ```text
/// max_capacity = window + q_len (1 - r);  min = (max_capacity - window) / beta
/// max = 2 (max_capacity - window) - min;  if max >= q_len - window: max = q_len - window, min = 2 (max_capacity - window) - max
/// budget_l = round(max - l (max - min) / (L - 1))      (SnapKV's round(q_len (1 - r)) unless q_len >= max >= min >= window)
/// ```
///
/// Same f64 operations as Python, `round` half to even as Python's. Differences from kvpress,
/// which would crash or keep nothing: a 1-layer model takes step 0 (kvpress divides by zero) and
/// every budget is clamped to `1..=q_len`.
pub fn layer_budget(layer: usize, num_layers: usize, q_len: usize, ratio: f64, window: usize, beta: f64) -> usize {
    let (q, w) = (q_len as f64, window as f64);
    let max_capacity = w + q * (1.0 - ratio);
    let mut min_num = (max_capacity - w) / beta;
    let mut max_num = (max_capacity - w) * 2.0 - min_num;
    if max_num >= q - w {
        max_num = q - w;
        min_num = (max_capacity - w) * 2.0 - max_num;
    }
    let budget = if !(q >= max_num && max_num >= min_num && min_num >= w) {
        (q * (1.0 - ratio)).round_ties_even()
    } else {
        let steps = if num_layers > 1 { (max_num - min_num) / (num_layers - 1) as f64 } else { 0.0 };
        (max_num - layer as f64 * steps).round_ties_even()
    };
    (budget.max(1.0) as usize).min(q_len.max(1))
}

#[cfg(test)]
mod tests {
    use super::layer_budget;

    #[test]
    fn pyramid_by_hand() {
        // q_len 1000, r 0.5, window 64, beta 20: max_capacity 564, min 25, max 975 -> 936 (>= 1000-64)
        // -> max = 936, min = 64; steps = (936 - 64) / 29 over 30 layers
        let b: Vec<usize> = (0..30).map(|l| layer_budget(l, 30, 1000, 0.5, 64, 20.0)).collect();
        assert_eq!(b[0], 936);
        assert_eq!(b[29], 64);
        assert!(b.windows(2).all(|w| w[0] >= w[1]));
        // the pyramid keeps the total of a uniform budget up to rounding
        let total: usize = b.iter().sum();
        assert!((total as i64 - 15000).abs() <= 15, "{total}");
        // short contexts fall back to SnapKV's uniform budget; never 0
        assert_eq!(layer_budget(3, 30, 100, 0.5, 64, 20.0), 50);
        assert_eq!(layer_budget(0, 30, 10, 0.96, 64, 20.0), 1);
        assert_eq!(layer_budget(0, 1, 1000, 0.5, 64, 20.0), 936);
        // Python's round is half to even: round(2.5) == 2
        assert_eq!(layer_budget(0, 30, 5, 0.5, 64, 20.0), 2);
    }
}
