//! AdaKV (kvpress `presses/adakv_press.py`; Feng et al. 2024, arXiv 2407.11550): heads of a layer
//! share the layer's budget adaptively. Every head first keeps its `alpha_safeguard` share of the
//! uniform budget; the rest of the layer's `kv_heads x n_kept` slots go to the best scores over
//! all heads. Heads then hold different counts: the cache pads every head to the layer's largest
//! count and masks the padding ([`crate::KvCache::gather_layer`]), so memory is freed (kvpress
//! only masks evicted keys and frees nothing).
//!
//! The press is a [`super::ScorerPress`] over any scorer with [`super::Allocation::AdaKv`].

use std::ops::Range;

use crate::select::top_k_by;

/// Kept positions per head (ascending) of one layer with scores `[kv_heads * t]`:
/// `n_safe = int(n_kept * alpha)` best per head are kept first (kvpress sets them to the dtype's
/// max), then the best of everything up to `kv_heads * n_kept` in all. Order: safeguarded, then
/// protected, then score, then lower flat index (head-major).
///
/// Unlike kvpress, every head keeps at least one token (`n_safe >= 1`; kvpress can empty a head
/// when `int(n_kept * alpha)` is 0, i.e. below 5 kept tokens per head at the default alpha).
pub fn select(scores: &[f32], protected: &Range<usize>, kv_heads: usize, t: usize, n_kept: usize, alpha: f64) -> Vec<Vec<u32>> {
    let n_safe = ((n_kept as f64 * alpha) as usize).max(1);
    let better = |a: usize, b: usize| {
        let (pa, pb) = (protected.contains(&(a % t)), protected.contains(&(b % t)));
        pb.cmp(&pa).then(scores[b].total_cmp(&scores[a])).then(a.cmp(&b))
    };
    let mut safe = vec![false; scores.len()];
    for h in 0..kv_heads {
        for i in top_k_by(t, n_safe, |a, b| better(h * t + a, h * t + b)) {
            safe[h * t + i] = true;
        }
    }
    let mut kept: Vec<Vec<u32>> = vec![Vec::new(); kv_heads];
    for i in top_k_by(scores.len(), kv_heads * n_kept, |a, b| safe[b].cmp(&safe[a]).then(better(a, b))) {
        kept[i / t].push((i % t) as u32);
    }
    for row in &mut kept {
        row.sort_unstable();
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::select;

    #[test]
    fn budgets_move_between_heads_above_the_safeguard() {
        // head 0 has all the large scores; 2 heads x 4 tokens, n_kept 2 -> 4 slots in the layer
        let s = [9.0, 8.0, 7.0, 6.0, 0.1, 0.2, 0.3, 0.4];
        // alpha 0 still leaves every head one token
        assert_eq!(select(&s, &(0..0), 2, 4, 2, 0.0), vec![vec![0, 1, 2], vec![3]]);
        // n_kept 3, alpha 0.5: each head keeps int(3 * 0.5) = 1 first, 6 slots in the layer
        assert_eq!(select(&s, &(0..0), 2, 4, 3, 0.5), vec![vec![0, 1, 2, 3], vec![2, 3]]);
        // a protected position is kept in every head before larger scores elsewhere
        assert_eq!(select(&s, &(3..4), 2, 4, 2, 0.0), vec![vec![0, 1, 3], vec![3]]);
    }
}
