//! Embedding kvc in a burn application: load the default model on any backend, prefill a prompt
//! into a KV cache, look at the cache, then decode greedily.
//!
//! ```text
//! cargo run --release -p kvc-examples --example embed
//! ```

use burn::backend::NdArray;
use kvc_core::KvcBackend;
use kvc_models::{generate, GenerationConfig};

fn run<B: KvcBackend>(device: B::Device) -> anyhow::Result<String> {
    let path = kvc_models::default_model::ensure_default_model()?;
    let m = kvc_models::load_with::<B>(&path, &device, None, kvc_models::WeightStorage::Codes)?;
    let ids = m.tokenizer.encode("The three primary colors are", true)?;
    let mut cache = m.model.new_cache();
    let logits = m.model.prefill(&ids, &mut cache, None, 512)?;
    println!("prefilled {} tokens; KV cache {} bytes over {} layers", ids.len(), cache.bytes(), cache.num_layers());
    let cfg = GenerationConfig { max_new_tokens: 16, ..Default::default() };
    let out = generate::decode(&m.model, &mut cache, logits, &cfg, m.tokenizer.eos_ids(), |_| true, &device)?;
    let text = m.tokenizer.decode(&out.tokens, true)?;
    println!("{text}");
    Ok(text)
}

fn main() -> anyhow::Result<()> {
    run::<NdArray<f32>>(Default::default()).map(|_| ())
}

#[test]
fn embed_runs() {
    assert!(!run::<NdArray<f32>>(Default::default()).unwrap().trim().is_empty());
}
