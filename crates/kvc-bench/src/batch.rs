//! Batched decoding speed (`kvc-bench batch`): aggregate decode tokens/s and per-step latency of
//! `B` sequences stepped together ([`kvc_models::generate::batch::Batch`]), each on its own copy
//! of one context's KV cache (uncompressed, or compressed once by a press), as llama.cpp's
//! `llama-batched-bench -npp N -ntg T -npl B` measures its batched decode.

use std::time::Instant;

use kvc_core::{KvcBackend, PressSpec};
use kvc_models::generate::batch::Batch;
use kvc_models::pipeline::Pipeline;
use kvc_models::{GenerationConfig, LoadedModel, ModelError};

/// One batch size's measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BatchRow {
    /// Sequences stepped together.
    pub batch: usize,
    /// Context tokens of each sequence's cache before its question.
    pub context_tokens: usize,
    /// The press that compressed the context (`none` for the uncompressed cache).
    pub press: String,
    /// KV cache bytes of one sequence's cache (after compression).
    pub kv_bytes_per_sequence: usize,
    /// Steps timed (every sequence active in each).
    pub steps: usize,
    /// Mean wall milliseconds of one step of the whole batch.
    pub step_ms: f64,
    /// Generated tokens per second over the batch (`batch x steps / seconds`).
    pub tokens_per_second: f64,
    /// Peak resident memory of the process so far (bytes; Linux `VmHWM`), when known.
    pub peak_rss: Option<u64>,
}

/// Peak resident memory of this process (Linux `VmHWM`): [`kvc_models::peak_rss_bytes`].
pub fn peak_rss() -> Option<u64> {
    kvc_models::peak_rss_bytes()
}

/// Prefills `context` once, compresses it with `press` (if any), then for each batch size `b`
/// of `batches` steps `b` sequences together for `steps` tokens (after one warm-up step), each
/// on its own copy of the cache with the one-token question `question`; `report` sees each row
/// as it is measured.
///
/// # Errors
/// Model and press errors.
pub fn run<B: KvcBackend>(
    loaded: &LoadedModel<B>,
    context: &[u32],
    question: u32,
    press: Option<&PressSpec>,
    batches: &[usize],
    steps: usize,
    report: &mut dyn FnMut(&BatchRow),
) -> Result<Vec<BatchRow>, ModelError> {
    let pipeline = Pipeline::new(loaded);
    let needs = press.map(|p| p.needs()).transpose()?.unwrap_or_default();
    let prefilled = pipeline.prefill(context, needs, 512, &mut |_| {})?;
    let cache = match press {
        Some(p) => pipeline.compress_prefilled(prefilled, p, &mut |_, _| {})?.cache,
        None => prefilled.cache,
    };
    let config = GenerationConfig { max_new_tokens: steps + 2, stop_at_eos: false, ..Default::default() };
    let mut rows = Vec::new();
    for &b in batches {
        let mut batch = Batch::new();
        for _ in 0..b {
            batch.add(&loaded.model, cache.clone(), &[question], config.clone(), &[])?;
        }
        batch.step(&loaded.model)?; // warm-up: buffers grown, threads awake
        let start = Instant::now();
        for _ in 0..steps {
            batch.step(&loaded.model)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        let row = BatchRow {
            batch: b,
            context_tokens: context.len(),
            press: press.map_or_else(|| "none".to_string(), PressSpec::label),
            kv_bytes_per_sequence: cache.bytes(),
            steps,
            step_ms: seconds * 1e3 / steps as f64,
            tokens_per_second: (b * steps) as f64 / seconds,
            peak_rss: peak_rss(),
        };
        report(&row);
        rows.push(row);
    }
    Ok(rows)
}
