//! A burn app that has its own attention layers (no kvc-models) and compresses the KV cache they
//! fill with presses from kvc's registry, through kvc-core's traits:
//!
//! - the app's layers write keys/values into a [`KvCache`] and show each chunk to an
//!   [`AttentionObserver`] (what a press records during the prefill: [`PrefillCapture`]);
//! - the app implements [`ForwardModel`] (layer/head counts, RoPE frequencies, `feed`) for presses
//!   that run their own pass over the context (KVCompose);
//! - `PressSpec::build` + `Press::compress` shrink the cache in place.
//!
//! The "model" here is a toy: one embedding table and per-layer random projections, no MLP; the
//! point is the plumbing, which is the same for a real model.
//!
//! ```text
//! cargo run --release -p kvc-examples --example own_model
//! ```

use burn::tensor::{backend::Backend, Distribution, Tensor};
use kvc_core::kernels::{generic_attention, observed_attention};
use kvc_core::{AttentionObserver, Budget, CoreError, ForwardModel, KvCache, PrefillCapture, PressSpec};

/// The app's model: `layers` layers of attention with `heads` query heads over `kv_heads` KV heads.
struct TinyModel<B: Backend> {
    embed: Tensor<B, 2>,             // [vocab, hidden]
    wq: Vec<Tensor<B, 2>>,           // [hidden, heads * d]
    wkv: Vec<(Tensor<B, 2>, Tensor<B, 2>)>, // [hidden, kv_heads * d] each
    heads: usize,
    kv_heads: usize,
    d: usize,
}

impl<B: Backend> TinyModel<B> {
    fn new(layers: usize, device: &B::Device) -> Self {
        let (vocab, hidden, heads, kv_heads, d) = (64, 32, 4, 2, 8);
        let w = |i: usize, o: usize| Tensor::<B, 2>::random([i, o], Distribution::Normal(0.0, 0.3), device);
        Self {
            embed: w(vocab, hidden),
            wq: (0..layers).map(|_| w(hidden, heads * d)).collect(),
            wkv: (0..layers).map(|_| (w(hidden, kv_heads * d), w(hidden, kv_heads * d))).collect(),
            heads,
            kv_heads,
            d,
        }
    }
}

impl<B: Backend> ForwardModel<B> for TinyModel<B> {
    fn num_layers(&self) -> usize {
        self.wq.len()
    }
    fn num_heads(&self) -> usize {
        self.heads
    }
    fn num_kv_heads(&self) -> usize {
        self.kv_heads
    }
    fn rope_inv_freq(&self) -> Vec<f32> {
        // this toy model uses no RoPE; a real one returns its frequencies
        (0..self.d / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / self.d as f32)).collect()
    }
    fn feed(&self, tokens: &[u32], cache: &mut KvCache<B>, observer: &mut dyn AttentionObserver<B>, chunk: usize) -> Result<(), CoreError> {
        let device = self.embed.device();
        for part in tokens.chunks(chunk.max(1)) {
            let first = cache.next_position();
            let c = part.len();
            let ids: Vec<i64> = part.iter().map(|&t| t as i64 % 64).collect();
            let idx = Tensor::<B, 1, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(ids, [c]), &device);
            let mut x = self.embed.clone().select(0, idx); // [c, hidden]
            for (l, (wq, (wk, wv))) in self.wq.iter().zip(&self.wkv).enumerate() {
                let split = |t: Tensor<B, 2>, h: usize| t.reshape([1, c, h, self.d]).swap_dims(1, 2);
                let q = split(x.clone().matmul(wq.clone()), self.heads);
                let (k, v) = (split(x.clone().matmul(wk.clone()), self.kv_heads), split(x.clone().matmul(wv.clone()), self.kv_heads));
                // the app's cache write; kvc's cache keeps positions and per-head layouts for presses
                let (keys, values) = cache.append(l, first, k, v)?;
                let valid = cache.layer(l)?.and_then(|kv| kv.valid.as_deref());
                // attention that shows the chunk to the observer (presses' prefill recording)
                let out = observed_attention(Some(&mut *observer), l, first, q.clone(), || q.clone(), keys, values, valid, generic_attention);
                x = x + out.swap_dims(1, 2).reshape([c, self.heads * self.d]).matmul(wq.clone().transpose());
            }
            cache.advance(c);
        }
        Ok(())
    }
}

/// Prefills 200 tokens into the app's cache once, then compresses a copy with each press; returns
/// (press, tokens kept per layer, bytes before, bytes after).
fn run<B: Backend>(device: &B::Device) -> anyhow::Result<Vec<(String, Vec<usize>, usize, usize)>> {
    B::seed(device, 7);
    let model = TinyModel::<B>::new(3, device);
    let context: Vec<u32> = (0..200).map(|i| (i * 37 + 11) % 64).collect();
    let specs = [
        PressSpec::new("snapkv", Budget::Ratio(0.5)).with_option("window_size", 16),
        PressSpec::new("knorm", Budget::Ratio(0.75)),
        PressSpec::new("kvcompose", Budget::Ratio(0.5)),
    ];
    // one prefill records what every press needs
    let needs = specs.iter().try_fold(Default::default(), |acc: kvc_core::CaptureSpec, s| s.needs().map(|n| acc.merge(n)))?;
    let mut cache = KvCache::new(model.num_layers());
    let mut capture = PrefillCapture::new(needs, model.num_layers());
    model.feed(&context, &mut cache, &mut capture, 64)?;
    let mut out = Vec::new();
    for spec in &specs {
        let mut press = spec.build::<B>()?;
        let mut copy = cache.clone();
        let report = press.compress(&model, &context, &mut copy, &capture)?;
        out.push((spec.label(), report.kept_per_layer(), report.bytes_before, report.bytes_after));
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    for (press, kept, before, after) in run::<burn::backend::Flex>(&Default::default())? {
        println!("{press:<28} kept per layer {kept:?}, KV cache {before} -> {after} bytes");
    }
    Ok(())
}

#[test]
fn presses_compress_an_apps_own_cache() {
    let rows = run::<burn::backend::NdArray<f32>>(&Default::default()).unwrap();
    assert_eq!(rows.len(), 3);
    for (press, kept, before, after) in rows {
        assert_eq!(kept.len(), 3, "{press}");
        assert!(after < before && kept.iter().all(|&k| (1..200).contains(&k)), "{press}: {kept:?} {before} -> {after}");
    }
}
