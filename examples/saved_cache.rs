//! A compressed KV cache saved once and used later: compress a long document in one process,
//! save the cache (safetensors: keys, values, original positions, per-head masks, the model's
//! fingerprint), then answer questions in another process without prefilling the document again.
//!
//! ```text
//! cargo run --release -p kvc-examples --example saved_cache -- save /tmp/chapter.kvc
//! cargo run --release -p kvc-examples --example saved_cache -- ask /tmp/chapter.kvc "Who has taken Netherfield?"
//! ```
//!
//! The same from the command line: `kvc generate --prompt-file F --press kvcompose --ratio 0.5
//! --question Q --save-cache C`, then `kvc generate --load-cache C --question Q2`.

use std::path::{Path, PathBuf};

use kvc_core::{Budget, KvcBackend, PressSpec};
use kvc_models::pipeline::{Pipeline, Request};
use kvc_models::LoadedModel;

const DOCUMENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/pride_and_prejudice_ch1-2.txt");

fn load<B: KvcBackend>(device: &B::Device) -> anyhow::Result<LoadedModel<B>> {
    let model = kvc_models::default_model::ensure_default_model()?;
    Ok(kvc_models::load_with::<B>(&model, device, None, kvc_models::WeightStorage::Codes)?)
}

/// Prefills the document, compresses it with KVCompose (per-head budgets) at ratio 0.5, saves the
/// cache to `path` and answers `question` on it; returns the answer's token ids.
fn save<B: KvcBackend>(device: &B::Device, path: &Path, question: &str) -> anyhow::Result<Vec<u32>> {
    let loaded = load::<B>(device)?;
    let request = Request {
        context: std::fs::read_to_string(DOCUMENT)?,
        questions: vec![question.into()],
        press: Some(PressSpec::new("kvcompose", Budget::Ratio(0.5)).with_option("structured", false)),
        save_cache: Some(path.to_path_buf()),
        ..Default::default()
    };
    let response = Pipeline::new(&loaded).run(&request, &mut |_| {})?;
    let (before, after) = response.kv_bytes;
    println!("saved {} ({} context tokens, KV cache {before} -> {after} bytes)", path.display(), response.context_tokens);
    Ok(response.answers[0].ids.clone())
}

/// Loads a saved cache (checked against the model) and answers `question` on it; returns the
/// answer's token ids.
fn ask<B: KvcBackend>(device: &B::Device, path: &Path, question: &str) -> anyhow::Result<Vec<u32>> {
    let loaded = load::<B>(device)?;
    let pipeline = Pipeline::new(&loaded);
    let (cache, header) = pipeline.load_cache(path)?;
    let request = Request { questions: vec![question.into()], chat: header.chat, ..Default::default() };
    let response = pipeline.run_saved(&cache, &header, &request, &mut |_| {})?;
    println!("{question}\n  -> {}", response.answers[0].text.trim());
    Ok(response.answers[0].ids.clone())
}

/// Compress a document once, answer questions on the saved cache later.
#[derive(clap::Parser)]
enum Args {
    /// Prefill and compress the document, save the cache to FILE.
    Save { file: PathBuf },
    /// Answer QUESTION on the cache saved in FILE.
    Ask { file: PathBuf, question: String },
}

fn main() -> anyhow::Result<()> {
    let device = Default::default();
    match <Args as clap::Parser>::parse() {
        Args::Save { file } => save::<burn::backend::Flex>(&device, &file, "Who has taken Netherfield?").map(|_| ()),
        Args::Ask { file, question } => ask::<burn::backend::Flex>(&device, &file, &question).map(|_| ()),
    }
}

#[test]
fn a_saved_cache_answers_as_the_cache_it_was_saved_from() {
    let dir = std::env::temp_dir().join(format!("kvc-example-saved-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("chapter.kvc");
    let device = Default::default();
    let question = "Who has taken Netherfield?";
    // two model loads, as two processes would do
    let direct = save::<burn::backend::Flex>(&device, &path, question).unwrap();
    let loaded = ask::<burn::backend::Flex>(&device, &path, question).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!direct.is_empty());
    assert_eq!(direct, loaded, "answer from the saved cache differs from the in-memory one");
}
