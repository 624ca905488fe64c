//! Property tests: KVCompose budgets are exact over random shapes (layers, KV heads, GQA group
//! sizes 1..8, context lengths, small and odd) and random scores.

use kvc_core::press::kvcompose::KvCompose;
use kvc_core::press::Budget;
use kvc_core::select::allocate;
use proptest::prelude::*;

fn shapes() -> impl Strategy<Value = (usize, usize, usize, usize)> {
    // (layers, kv_heads, group size, context)
    (1usize..=7, 1usize..=4, 1usize..=8, 2usize..=33)
}

fn scores(len: usize) -> impl Strategy<Value = Vec<f32>> {
    // attention-like positive scores, with repeated values to exercise ties
    prop::collection::vec(prop_oneof![0.0f32..1.0, Just(0.5f32), Just(0.0f32)], len)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn structured_budgets_are_exact(
        (l, h, g, t) in shapes(),
        ratio in 0.0f64..0.99,
        lb in 0usize..4,
        seed_scores in scores(7 * 4 * 8 * 33),
    ) {
        let q = h * g;
        let task: Vec<Vec<f32>> = (0..l).map(|i| seed_scores[i * q * t..(i + 1) * q * t].to_vec()).collect();
        let mut p = KvCompose::new(Budget::Ratio(ratio));
        p.keep_token_lower_bound = lb;
        let s = p.select(&task, None, q, h, t).unwrap();
        let n = Budget::Ratio(ratio).kept(l, t);
        // the global top-n hands out exactly n slots ...
        let won = allocate(&s.composite_per_layer, l, t, n).unwrap();
        prop_assert_eq!(won.iter().sum::<usize>(), n);
        // ... and a layer gets its winnings, raised to the floor max(1, lb) kvpress applies
        let floor = lb.min(t).max(1);
        for li in 0..l {
            prop_assert_eq!(s.kept[li].clone(), vec![won[li].max(floor).min(t); h]);
            for kh in 0..h {
                let idx = &s.kept_indices[li][kh];
                prop_assert_eq!(idx.len(), s.kept[li][kh]);
                prop_assert!(idx.windows(2).all(|w| w[0] < w[1]), "ascending, distinct");
                prop_assert!(idx.iter().all(|&i| (i as usize) < t));
            }
        }
        // without lower bound and with every layer winning something, the total is exactly n
        if lb == 0 && won.iter().all(|&w| w > 0) {
            prop_assert_eq!(s.kept.iter().map(|x| x[0]).sum::<usize>(), n);
        }
    }

    #[test]
    fn unstructured_budgets_are_exact(
        (l, h, g, t) in shapes(),
        ratio in 0.0f64..0.99,
        seed_scores in scores(7 * 4 * 8 * 33),
    ) {
        let q = h * g;
        let task: Vec<Vec<f32>> = (0..l).map(|i| seed_scores[i * q * t..(i + 1) * q * t].to_vec()).collect();
        let mut p = KvCompose::new(Budget::Ratio(ratio));
        p.structured = false;
        let s = p.select(&task, None, q, h, t).unwrap();
        let n = Budget::Ratio(ratio).kept(l * h, t);
        prop_assert_eq!(s.kept.iter().flatten().sum::<usize>(), n);
        for li in 0..l {
            for kh in 0..h {
                prop_assert_eq!(s.kept_indices[li][kh].len(), s.kept[li][kh]);
            }
        }
    }

    #[test]
    fn token_budget_is_per_layer_average((l, h, g, t) in shapes(), tokens in 1usize..=33, seed_scores in scores(7 * 4 * 8 * 33)) {
        let tokens = tokens.min(t);
        let q = h * g;
        let task: Vec<Vec<f32>> = (0..l).map(|i| seed_scores[i * q * t..(i + 1) * q * t].to_vec()).collect();
        let s = KvCompose::new(Budget::Tokens(tokens)).select(&task, None, q, h, t).unwrap();
        let won = allocate(&s.composite_per_layer, l, t, l * tokens).unwrap();
        prop_assert_eq!(won.iter().sum::<usize>(), l * tokens);
    }
}
