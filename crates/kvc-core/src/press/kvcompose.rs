//! KVCompose (Akulov et al., 2025, arXiv 2509.05165), as the authors implement it in kvpress
//! 0.5.5 (`kvpress/presses/kvcompose_press.py`, `KVComposePress`).
//!
//! 1. **Scores** (paper §3.1; kvpress `forward_hook`, `compute_scores`, `enhance_scores`): after
//!    the context prefill, the context is fed again as queries on top of the cache (positions
//!    `T..2T-1`). For each layer and query head, the attention probabilities (softmax over every
//!    visible key) restricted to the `T` original keys are reduced over queries (`agg_task`: max,
//!    or mean); the query heads of a GQA group are reduced (`agg_group`: mean, or max); optionally
//!    times `||v||` (`add_v_norm`); plus the mean over KV heads (`add_mean_across_heads`). The
//!    second copy is then dropped: the cache holds only the original `T` tokens.
//!    Memory: attention is reduced per layer and per chunk of `chunk` queries as it is computed;
//!    the `[heads, T, 2T]` matrices of all layers never exist at once.
//! 2. **Composite tokens** (§3.2; `compute_composite_scores`): each KV head's scores sorted
//!    descending; the composite score of rank `i` in layer `l` = `agg_head` (mean, or max) over heads
//!    of their rank-`i` scores; ranks `< keep_token_lower_bound` get `+1e9`; row 0 (layer 0)
//!    becomes the maximum over layers.
//! 3. **Allocation** (§3.3; `compute_important_per_layer`): `n = max(1, floor(L*T*(1-r)))`
//!    composite slots are chosen globally (top-n over all layers' composite scores); `k_l` = slots
//!    won by layer `l`, raised to at least `max(1, keep_token_lower_bound)` as kvpress does (so the
//!    total is `n` unless a layer would otherwise be empty). Each KV head keeps its own top-`k_l`
//!    tokens in original position order; every head of a layer has length `k_l`, the plain layout.
//!    Keys keep their RoPE from the original positions; decoding continues at position `T`.
//!
//! **Unstructured** (`structured=false`): per-head budgets by top-n over all `L*H*T` per-head
//! sorted scores (`n = floor(L*H*T*(1-r))`, no floor per head). kvpress only masks evicted keys
//! (no memory saved); kvc frees them: each layer is stored padded to its largest head's count, and
//! padded slots are masked out of attention ([`KvCache::gather_layer`]). The cost: the padding
//! (`sum_l (H * max_h k_lh - sum_h k_lh)` slots, reported in `bytes_after`) and a per-layer
//! `[kv_heads, len]` additive bias in every later attention call.
//!
//! **Ties** (kvpress leaves them to `torch.topk` / `torch.argsort`, whose order for equal values is
//! unspecified): kvc takes the lower flat index first: lower layer (head), then lower rank, for
//! the allocation; lower token position for the per-head selection. Row 0 duplicates the largest
//! layer's composite scores exactly, so allocation ties are real; see the parity tests.
//!
//! Batch 1 only (as kvpress's unstructured path; the structured path is batch-1 in kvpress's
//! scoring too, since it aggregates over the batch).

use burn::tensor::{backend::Backend, DType, Tensor};

use crate::capture::PrefillCapture;
use crate::press::spec::{Layout, OptionDoc, Options, PressDoc};
use crate::press::{check_prefilled, Budget, ForwardModel, Press, PressReport};
use crate::select::{allocate, sorted_desc, top_k_in_order, Agg};
use crate::{AttentionObserver, CoreError, KvCache, LayerObservation, QueryReduce};

/// The KVCompose press. Fields are kvpress's parameters with their defaults (see [`KvCompose::new`]).
#[derive(Clone, Debug)]
pub struct KvCompose {
    /// Ratio or token budget.
    pub budget: Budget,
    /// Structured (composite tokens, equal length per layer; default) or per-head budgets.
    pub structured: bool,
    /// Reduction over queries of the scoring pass (default max).
    pub agg_task: Agg,
    /// Reduction over the query heads of a GQA group (default mean).
    pub agg_group: Agg,
    /// Reduction over KV heads of rank-i scores into the composite score (default mean).
    pub agg_head: Agg,
    /// Multiply scores by the value norm (default false).
    pub add_v_norm: bool,
    /// Add the mean over KV heads to every head's scores (default true).
    pub add_mean_across_heads: bool,
    /// Ranks always kept in every layer (default 0).
    pub keep_token_lower_bound: usize,
    /// Queries per chunk in the scoring pass (memory bound; results do not depend on it).
    pub chunk: usize,
    last: Option<KvComposeScores>,
}

/// Everything KVCompose computed on its last run (host f32, row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct KvComposeScores {
    /// Layers.
    pub layers: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Context tokens `T`.
    pub context_len: usize,
    /// Token scores `[layers, kv_heads, T]` after group reduction and enhancement.
    pub scores: Vec<f32>,
    /// Composite scores per layer `[layers, T]` (after `+1e9` ranks and the row-0 max).
    pub composite_per_layer: Vec<f32>,
    /// Per-head sorted scores `[layers, kv_heads, T]` (after `+1e9` ranks): the unstructured
    /// allocation's input.
    pub composite_per_head: Vec<f32>,
    /// Kept tokens `[layers][kv_heads]`.
    pub kept: Vec<Vec<usize>>,
    /// Kept token positions `[layers][kv_heads][k]`, ascending.
    pub kept_indices: Vec<Vec<Vec<u32>>>,
}

impl KvCompose {
    /// KVCompose with kvpress's defaults: structured, agg_task max, agg_group mean, agg_head mean,
    /// no value norm, mean across heads added, no lower bound; 512 queries per scoring chunk.
    pub fn new(budget: Budget) -> Self {
        Self {
            budget,
            structured: true,
            agg_task: Agg::Max,
            agg_group: Agg::Mean,
            agg_head: Agg::Mean,
            add_v_norm: false,
            add_mean_across_heads: true,
            keep_token_lower_bound: 0,
            chunk: 512,
            last: None,
        }
    }

    /// The registry entry: options with kvpress's names and defaults.
    pub const DOC: PressDoc = PressDoc {
        name: "kvcompose",
        about: "composite tokens from attention of the context re-fed as queries; one global budget across layers",
        source: "kvpress presses/kvcompose_press.py; Akulov et al. 2025, arXiv 2509.05165",
        layout: Layout::PerLayer,
        cost: "a second pass over the context (attention against 2T keys, explicit softmax)",
        refeeds: 1,
        options: &[
            OptionDoc { name: "structured", default: "true", help: "false: per-head budgets (padded layout, padding masked)" },
            OptionDoc { name: "agg_task", default: "max", help: "reduction over queries: max or mean" },
            OptionDoc { name: "agg_group", default: "mean", help: "reduction over the query heads of a GQA group: mean or max" },
            OptionDoc { name: "agg_head", default: "mean", help: "reduction over KV heads into composite scores: mean or max" },
            OptionDoc { name: "add_v_norm", default: "false", help: "multiply scores by the value norm" },
            OptionDoc { name: "add_mean_across_heads", default: "true", help: "add the mean over KV heads to every head's scores" },
            OptionDoc { name: "keep_token_lower_bound", default: "0", help: "ranks every layer keeps (each layer keeps at least max(1, this))" },
            OptionDoc { name: "chunk", default: "512", help: "queries per chunk of the scoring pass (memory only; results do not depend on it)" },
        ],
    };

    /// KVCompose from registry options (defaults: [`KvCompose::DOC`]).
    ///
    /// # Errors
    /// [`CoreError::PressOption`] for a bad value.
    pub fn from_options(budget: Budget, o: &mut Options<'_>) -> Result<Self, CoreError> {
        let mut agg = |key: &str| -> Result<Agg, CoreError> {
            let v = o.string(key)?;
            Agg::parse(&v).map_err(|m| o.error(format!("{key}={v}: {m}")))
        };
        let (agg_task, agg_group, agg_head) = (agg("agg_task")?, agg("agg_group")?, agg("agg_head")?);
        Ok(Self {
            budget,
            structured: o.bool("structured")?,
            agg_task,
            agg_group,
            agg_head,
            add_v_norm: o.bool("add_v_norm")?,
            add_mean_across_heads: o.bool("add_mean_across_heads")?,
            keep_token_lower_bound: o.usize("keep_token_lower_bound")?,
            chunk: o.positive("chunk")?,
            last: None,
        })
    }

    /// Scores, composite scores and selection of the last [`Press::compress`] call.
    pub fn last_scores(&self) -> Option<&KvComposeScores> {
        self.last.as_ref()
    }

    /// Steps 1 (after the attention reduction) to 3 on the host: from per-query-head task scores
    /// `task[l]` (`[q_heads * T]`) and, if `add_v_norm`, value norms `v_norms[l]` (`[kv_heads * T]`),
    /// to scores, composite scores and per-head kept indices.
    ///
    /// # Errors
    /// [`CoreError::Shape`] for inconsistent sizes.
    pub fn select(
        &self,
        task: &[Vec<f32>],
        v_norms: Option<&[Vec<f32>]>,
        q_heads: usize,
        kv_heads: usize,
        context_len: usize,
    ) -> Result<KvComposeScores, CoreError> {
        let (layers, t, h) = (task.len(), context_len, kv_heads);
        if h == 0 || q_heads % h != 0 || task.iter().any(|x| x.len() != q_heads * t) {
            return Err(CoreError::Shape(format!("task scores do not form [{layers}, {q_heads}, {t}]")));
        }
        let g = q_heads / h;
        let mut scores = vec![0f32; layers * h * t];
        for l in 0..layers {
            for kh in 0..h {
                let rows = (kh * g..(kh + 1) * g).map(|qh| &task[l][qh * t..(qh + 1) * t]);
                scores[(l * h + kh) * t..(l * h + kh + 1) * t].copy_from_slice(&self.agg_group.reduce(rows));
            }
            let layer = &mut scores[l * h * t..(l + 1) * h * t];
            if let Some(norms) = v_norms {
                for (s, n) in layer.iter_mut().zip(&norms[l]) {
                    *s *= n;
                }
            }
            if self.add_mean_across_heads {
                let mean = Agg::Mean.reduce(layer.chunks(t));
                for row in layer.chunks_mut(t) {
                    row.iter_mut().zip(&mean).for_each(|(s, m)| *s += m);
                }
            }
        }
        let lb = self.keep_token_lower_bound.min(t);
        let boost = |row: &mut [f32]| row[..lb].iter_mut().for_each(|x| *x += 1e9f32);
        let mut per_head = Vec::with_capacity(layers * h * t);
        let mut per_layer = Vec::with_capacity(layers * t);
        for l in 0..layers {
            let sorted: Vec<Vec<f32>> = scores[l * h * t..(l + 1) * h * t].chunks(t).map(sorted_desc).collect();
            for s in &sorted {
                let mut s = s.clone();
                boost(&mut s);
                per_head.extend(s);
            }
            let mut comp = self.agg_head.reduce(sorted.iter().map(Vec::as_slice));
            boost(&mut comp);
            per_layer.extend(comp);
        }
        for i in 0..t {
            let m = (0..layers).map(|l| per_layer[l * t + i]).fold(f32::NEG_INFINITY, f32::max);
            per_layer[i] = m;
        }
        let kept: Vec<Vec<usize>> = if self.structured {
            let n = self.budget.kept(layers, t);
            let floor = lb.max(1);
            allocate(&per_layer, layers, t, n)?.into_iter().map(|k| vec![k.max(floor).min(t); h]).collect()
        } else {
            let n = self.budget.kept(layers * h, t);
            allocate(&per_head, layers * h, t, n)?.chunks(h).map(<[usize]>::to_vec).collect()
        };
        let kept_indices = (0..layers)
            .map(|l| (0..h).map(|kh| top_k_in_order(&scores[(l * h + kh) * t..(l * h + kh + 1) * t], kept[l][kh])).collect())
            .collect();
        Ok(KvComposeScores {
            layers,
            kv_heads: h,
            context_len: t,
            scores,
            composite_per_layer: per_layer,
            composite_per_head: per_head,
            kept,
            kept_indices,
        })
    }
}

/// Reduces each layer's attention over queries as the scoring pass runs (per layer, per chunk).
struct TaskObserver<B: Backend> {
    context_len: usize,
    agg: Agg,
    acc: Vec<Option<Tensor<B, 2>>>,
    queries: usize,
    missing_attention: bool,
}

impl<B: Backend> AttentionObserver<B> for TaskObserver<B> {
    fn reduce_attention(&self, _layer: usize) -> Option<QueryReduce> {
        Some(match self.agg {
            Agg::Max => QueryReduce::Max,
            Agg::Mean => QueryReduce::Sum,
        })
    }

    fn observe(&mut self, o: LayerObservation<'_, B>) {
        let Some(red) = o.attention_reduced else {
            self.missing_attention = true;
            return;
        };
        let [_, hq, _] = red.dims();
        let c = o.queries.dims()[2];
        // probabilities over every visible key, reduced over queries by the attention kernel,
        // restricted to the T original keys
        let red = red.clone().narrow(2, 0, self.context_len).reshape([hq, self.context_len]);
        let slot = &mut self.acc[o.layer];
        *slot = Some(match (slot.take(), self.agg) {
            (None, _) => red,
            (Some(prev), Agg::Max) => prev.max_pair(red),
            (Some(prev), Agg::Mean) => prev + red,
        });
        if o.layer == 0 {
            self.queries += c;
        }
    }
}

fn host(t: Tensor<impl Backend, 2>) -> Result<Vec<f32>, CoreError> {
    t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| CoreError::Model(format!("reading scores: {e:?}")))
}

/// Output of KVCompose's scoring pass (step 1 before the host-side reduction), reusable for any
/// budget: per layer the query-reduced attention `[q_heads * T]` and, with `add_v_norm`, the value
/// norms `[kv_heads * T]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskScores {
    /// Per layer, attention reduced over queries, `[q_heads * T]`.
    pub task: Vec<Vec<f32>>,
    /// Per layer, `||v||` of the context's values, `[kv_heads * T]` (only with `add_v_norm`).
    pub v_norms: Option<Vec<Vec<f32>>>,
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Context tokens.
    pub context_len: usize,
}

impl KvCompose {
    /// Step 1 on the device: feeds the context again on top of `cache` (which must hold exactly the
    /// context), reduces every layer's attention over queries per chunk, then drops the second copy
    /// (the cache again holds the `T` context tokens, next position `T`).
    ///
    /// # Errors
    /// [`CoreError::Shape`] when the cache does not hold exactly the context, budget errors,
    /// [`CoreError::Unsupported`] for batch > 1, model errors.
    pub fn score<B: Backend>(&self, model: &dyn ForwardModel<B>, context: &[u32], cache: &mut KvCache<B>) -> Result<TaskScores, CoreError> {
        let t = context.len();
        self.budget.validate(t)?;
        let layers = model.num_layers();
        check_prefilled(cache, layers, t)?;
        let mut obs = TaskObserver::<B> {
            context_len: t,
            agg: self.agg_task,
            acc: (0..layers).map(|_| None).collect(),
            queries: 0,
            missing_attention: false,
        };
        let fed = model.feed(context, cache, &mut obs, self.chunk);
        cache.truncate(t);
        cache.set_next_position(t);
        fed?;
        if obs.missing_attention {
            return Err(CoreError::Model("the model did not pass attention probabilities to the press".into()));
        }
        let mut task = Vec::with_capacity(layers);
        for acc in obs.acc {
            let acc = acc.ok_or_else(|| CoreError::Model("a layer was not observed".into()))?;
            let mut v = host(acc)?;
            if self.agg_task == Agg::Mean {
                let q = obs.queries as f32;
                v.iter_mut().for_each(|x| *x /= q);
            }
            task.push(v);
        }
        let v_norms = if self.add_v_norm {
            let mut norms = Vec::with_capacity(layers);
            for l in 0..layers {
                let kv = cache.layer(l)?.ok_or(CoreError::EmptyLayer(l))?;
                let [_, h, len, _] = kv.values.dims();
                // in f32 whatever the cache's dtype (an f16 sum of squares overflows)
                norms.push(host(kv.values.clone().cast(DType::F32).square().sum_dim(3).sqrt().reshape([h, len]))?);
            }
            Some(norms)
        } else {
            None
        };
        Ok(TaskScores { task, v_norms, q_heads: model.num_heads(), kv_heads: model.num_kv_heads(), context_len: t })
    }

    /// Steps 2-3 from a scoring pass's output (see [`KvCompose::select`]).
    ///
    /// # Errors
    /// As [`KvCompose::select`].
    pub fn select_from(&self, s: &TaskScores) -> Result<KvComposeScores, CoreError> {
        self.select(&s.task, s.v_norms.as_deref(), s.q_heads, s.kv_heads, s.context_len)
    }

    /// Steps 2-3 on `cache` (holding exactly the scored context) from a scoring pass's output,
    /// with this press's budget: selects, keeps the selected tokens, reports. What
    /// [`Press::compress`] does after [`KvCompose::score`]; a caller holding `scores` from an
    /// earlier pass over the same context (another budget) calls it directly.
    ///
    /// # Errors
    /// As [`KvCompose::select`] and [`KvCompose::apply`].
    pub fn compress_scored<B: Backend>(&mut self, scores: &TaskScores, cache: &mut KvCache<B>) -> Result<PressReport, CoreError> {
        let bytes_before = cache.bytes();
        let sel = self.select_from(scores)?;
        Self::apply(&sel, cache)?;
        let report = PressReport { context_len: scores.context_len, kept: sel.kept.clone(), bytes_before, bytes_after: cache.bytes() };
        self.last = Some(sel);
        Ok(report)
    }

    /// Keeps the selected tokens in every head (the cache must hold the `T` context tokens).
    ///
    /// # Errors
    /// [`CoreError::Shape`] / [`CoreError::EmptyLayer`] from [`KvCache::gather_layer`].
    pub fn apply<B: Backend>(sel: &KvComposeScores, cache: &mut KvCache<B>) -> Result<(), CoreError> {
        for (l, idx) in sel.kept_indices.iter().enumerate() {
            cache.gather_layer(l, std::slice::from_ref(idx))?;
        }
        Ok(())
    }
}

impl<B: Backend> Press<B> for KvCompose {
    fn name(&self) -> &'static str {
        "kvcompose"
    }

    fn last_scores(&self) -> Option<Vec<Vec<f32>>> {
        let s = self.last.as_ref()?;
        Some(s.scores.chunks(s.kv_heads * s.context_len).map(<[f32]>::to_vec).collect())
    }

    fn compress(
        &mut self,
        model: &dyn ForwardModel<B>,
        context: &[u32],
        cache: &mut KvCache<B>,
        _prefill: &PrefillCapture<B>,
    ) -> Result<PressReport, CoreError> {
        if self.budget == Budget::Ratio(0.0) {
            self.budget.validate(context.len())?;
            check_prefilled(cache, model.num_layers(), context.len())?;
            // ratio 0 keeps everything: no scoring pass, the cache is left as it is
            return Ok(PressReport::unchanged(cache, context.len()));
        }
        // the scoring pass leaves the cache holding the context again: `bytes_before` is its size
        let task = self.score(model, context, cache)?;
        self.compress_scored(&task, cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press(structured: bool, budget: Budget) -> KvCompose {
        let mut p = KvCompose::new(budget);
        p.structured = structured;
        p
    }

    #[test]
    fn composite_scores_and_allocation_by_hand() {
        // 2 layers, 2 KV heads (1 query head each), T = 3; no mean across heads
        let mut p = press(true, Budget::Ratio(0.5));
        p.add_mean_across_heads = false;
        let task = vec![vec![0.1, 0.5, 0.2, 0.3, 0.1, 0.2], vec![0.9, 0.1, 0.1, 0.8, 0.2, 0.1]];
        let s = p.select(&task, None, 2, 2, 3).unwrap();
        // layer 1 sorted heads: [0.9,0.1,0.1], [0.8,0.2,0.1] -> composite [0.85, 0.15, 0.1]
        assert!((s.composite_per_layer[3] - 0.85).abs() < 1e-6);
        // row 0 = max over layers: layer 0 composite [0.4, 0.2, 0.1] -> [0.85, 0.2, 0.1]
        assert!((s.composite_per_layer[0] - 0.85).abs() < 1e-6);
        assert!((s.composite_per_layer[1] - 0.2).abs() < 1e-6);
        // n = floor(6 * 0.5) = 3: 0.85 (l0), 0.85 (l1), 0.2 (l0)
        assert_eq!(s.kept, vec![vec![2, 2], vec![1, 1]]);
        assert_eq!(s.kept_indices[0], vec![vec![1, 2], vec![0, 2]]);
        assert_eq!(s.kept_indices[1], vec![vec![0], vec![0]]);
        // n = 1: row 0 duplicates layer 1's 0.85 exactly; the tie goes to layer 0, and layer 1 is
        // raised to the floor of 1 token (kvpress's clamp), so 2 slots are kept in all
        let mut p = press(true, Budget::Tokens(1));
        p.add_mean_across_heads = false;
        let s = p.select(&task, None, 2, 2, 3).unwrap();
        assert_eq!(s.kept, vec![vec![1, 1], vec![1, 1]]);
        // unstructured: per-head budgets from the per-head sorted scores, no floor
        let mut p = press(false, Budget::Ratio(0.5));
        p.add_mean_across_heads = false;
        let s = p.select(&task, None, 2, 2, 3).unwrap();
        // per-head sorted: l0h0 [.5,.2,.1] l0h1 [.3,.2,.1] l1h0 [.9,.1,.1] l1h1 [.8,.2,.1]; n = 6
        // winners .9 .8 .5 .3 then the .2 ties (l0h0, l0h1, l1h1) go to the lower flat indices
        assert_eq!(s.kept, vec![vec![2, 2], vec![1, 1]]);
    }

    #[test]
    fn options_parse_and_reject() {
        use crate::press::PressSpec;
        let spec = PressSpec::new("kvcompose", Budget::Ratio(0.5))
            .with_option("agg_task", "mean")
            .with_option("structured", "false")
            .with_option("keep_token_lower_bound", 4);
        spec.check().unwrap();
        let mut o = crate::press::spec::Options::for_test(&KvCompose::DOC, &spec.options);
        let p = KvCompose::from_options(Budget::Ratio(0.5), &mut o).unwrap();
        assert_eq!((p.agg_task, p.structured, p.keep_token_lower_bound), (Agg::Mean, false, 4));
        let d = KvCompose::new(Budget::Ratio(0.5));
        assert_eq!((d.agg_task, d.agg_group, d.structured, d.chunk), (Agg::Max, Agg::Mean, true, 512));
        for (k, v) in [("agg_task", "median"), ("structured", "maybe"), ("chunk", "0"), ("nope", "1"), ("keep_token_lower_bound", "-1")] {
            let bad = PressSpec::new("kvcompose", Budget::Ratio(0.5)).with_option(k, v);
            assert!(matches!(bad.check(), Err(CoreError::PressOption { .. })), "{k}={v}");
        }
    }

    #[test]
    fn budgets_validate() {
        assert!(Budget::Ratio(1.0).validate(10).is_err());
        assert!(Budget::Ratio(-0.1).validate(10).is_err());
        assert!(Budget::Ratio(0.0).validate(10).is_ok());
        assert!(Budget::Tokens(0).validate(10).is_err());
        assert!(Budget::Tokens(11).validate(10).is_err());
        assert!(Budget::Tokens(10).validate(10).is_ok());
        assert!(matches!(Budget::Ratio(0.5).validate(1), Err(CoreError::ContextTooShort(1))));
        assert_eq!(Budget::Ratio(0.75).kept(30, 301), 2257); // floor(9030 * 0.25)
        assert_eq!(Budget::Ratio(0.999).kept(1, 10), 1);
        assert_eq!(Budget::Tokens(7).kept(30, 301), 210);
    }
}
