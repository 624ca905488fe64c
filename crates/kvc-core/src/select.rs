//! Shared selection pieces of presses: score aggregation, top-k with a fixed tie rule, and global
//! budget allocation. Host-side (`f32` slices): scores are small (`layers x heads x tokens`) once
//! attention has been reduced on the device.
//!
//! Arithmetic mirrors kvpress (`presses/kvcompose_press.py`, `Aggregator`s) in f32 and in the same
//! order, so that scores agree to the last bits and rankings agree whenever they are not near-ties.

use std::cmp::Ordering;

use crate::CoreError;

/// Reduction of several score vectors into one (kvpress `MaxAggregator` / `MeanAggregator`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agg {
    /// Element-wise maximum.
    Max,
    /// Element-wise mean: f32 running sum in input order, divided by the count.
    Mean,
}

impl Agg {
    /// Parses `max` / `mean`.
    ///
    /// # Errors
    /// A message naming the accepted values.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "max" => Ok(Self::Max),
            "mean" => Ok(Self::Mean),
            other => Err(format!("aggregation {other:?} is not one of max, mean")),
        }
    }

    /// Reduces `rows` (each of the same length) element-wise.
    pub fn reduce<'a>(&self, rows: impl IntoIterator<Item = &'a [f32]>) -> Vec<f32> {
        let mut out: Vec<f32> = Vec::new();
        let mut count = 0f32;
        for row in rows {
            if out.is_empty() {
                out = match self {
                    Agg::Max => vec![f32::NEG_INFINITY; row.len()],
                    Agg::Mean => vec![0.0; row.len()],
                };
            }
            for (o, &x) in out.iter_mut().zip(row) {
                match self {
                    Agg::Max => *o = o.max(x),
                    Agg::Mean => *o += x,
                }
            }
            count += 1.0;
        }
        if *self == Agg::Mean && count > 0.0 {
            out.iter_mut().for_each(|o| *o /= count);
        }
        out
    }
}

/// Total order "better first": higher score first, then lower index (the documented tie rule of
/// every selection in kvc).
fn better(a: (f32, usize), b: (f32, usize)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Indices of the `k` best of `0..n` under the total order `cmp` (`Less` = better), best first.
pub fn top_k_by(n: usize, k: usize, cmp: impl Fn(usize, usize) -> Ordering) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let k = k.min(n);
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, |&a, &b| cmp(a, b));
    }
    idx.truncate(k);
    idx.sort_by(|&a, &b| cmp(a, b));
    idx
}

/// Indices of the `k` best scores, best first; ties go to the lower index.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    top_k_by(scores.len(), k, |a, b| better((scores[a], a), (scores[b], b)))
}

/// The `k` best indices of `scores` in ascending index order, where indices in `protected` come
/// before every score (kvpress protects windows and sinks by padding them with `max + 1`; an
/// explicit rank survives a context score equal to that value, or `max + 1 == max` in f32).
/// Ties go to the lower index.
pub fn top_k_protected(scores: &[f32], protected: &std::ops::Range<usize>, k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = top_k_by(scores.len(), k, |a, b| {
        protected.contains(&b).cmp(&protected.contains(&a)).then(better((scores[a], a), (scores[b], b)))
    })
    .into_iter()
    .map(|i| i as u32)
    .collect();
    idx.sort_unstable();
    idx
}

/// The `k` best indices in ascending index order (how kept tokens sit in the cache: original
/// position order).
pub fn top_k_in_order(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = top_k(scores, k).into_iter().map(|i| i as u32).collect();
    idx.sort_unstable();
    idx
}

/// Scores sorted descending.
pub fn sorted_desc(scores: &[f32]) -> Vec<f32> {
    let mut s = scores.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

/// Global allocation: of `rows` score rows (each `row_len` long, flattened row-major in
/// `scores`), pick the `n` best entries over all rows (ties to the lower flat index) and return
/// how many each row won. Sum of the result is exactly `min(n, rows * row_len)`.
///
/// # Errors
/// [`CoreError::Shape`] when `scores.len() != rows * row_len`.
pub fn allocate(scores: &[f32], rows: usize, row_len: usize, n: usize) -> Result<Vec<usize>, CoreError> {
    if scores.len() != rows * row_len {
        return Err(CoreError::Shape(format!("{} scores for {rows} rows of {row_len}", scores.len())));
    }
    let mut won = vec![0usize; rows];
    for i in top_k(scores, n) {
        won[i / row_len] += 1;
    }
    Ok(won)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregations_follow_kvpress() {
        let rows: [&[f32]; 3] = [&[1.0, 5.0], &[3.0, 2.0], &[2.0, 2.0]];
        assert_eq!(Agg::Max.reduce(rows), vec![3.0, 5.0]);
        assert_eq!(Agg::Mean.reduce(rows), vec![2.0, 3.0]);
        assert!(Agg::parse("median").is_err());
    }

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        let s = [0.5, 0.9, 0.5, 0.9, 0.1];
        assert_eq!(top_k(&s, 3), vec![1, 3, 0]);
        assert_eq!(top_k_in_order(&s, 3), vec![0, 1, 3]);
        assert_eq!(top_k(&s, 0), Vec::<usize>::new());
        assert_eq!(top_k(&s, 9).len(), 5);
    }

    #[test]
    fn protected_indices_win_over_equal_and_larger_scores() {
        let s = [5.0, 1.0, 9.0, 9.0];
        assert_eq!(top_k_protected(&s, &(3..4), 1), vec![3]);
        assert_eq!(top_k_protected(&s, &(3..4), 2), vec![2, 3]);
        assert_eq!(top_k_protected(&s, &(0..0), 2), vec![2, 3]);
        assert_eq!(top_k_protected(&s, &(1..4), 2), vec![2, 3]);
        assert_eq!(top_k_protected(&s, &(0..2), 3), vec![0, 1, 2]);
    }

    #[test]
    fn allocate_counts_winners_per_row() {
        // row 0 = [0.9, 0.8], row 1 = [0.85, 0.1]
        assert_eq!(allocate(&[0.9, 0.8, 0.85, 0.1], 2, 2, 3).unwrap(), vec![2, 1]);
        assert!(allocate(&[0.9], 2, 2, 1).is_err());
    }
}
