//! A burn app compressing a document's KV cache with any press of the registry, then asking two
//! questions on the same compressed cache, through the library pipeline.
//!
//! ```text
//! cargo run --release -p kvc-examples --example compress -- [PRESS] [RATIO]
//! ```

use kvc_core::KvcBackend;
use kvc_core::{Budget, PressSpec};
use kvc_models::pipeline::{Pipeline, Request};

fn run<B: KvcBackend>(device: B::Device, press: &str, ratio: f64) -> anyhow::Result<Vec<String>> {
    // the GGUF's weights held as their codes (no dense copy), as `kvc generate` holds them
    let model = kvc_models::default_model::ensure_default_model()?;
    let loaded = kvc_models::load_with::<B>(&model, &device, None, kvc_models::WeightStorage::Codes)?;
    let request = Request {
        context: std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/pride_and_prejudice_ch1-2.txt"))?,
        questions: vec!["What is the name of the estate that has been let at last?".into(), "Who has taken it?".into()],
        press: Some(PressSpec::new(press, Budget::Ratio(ratio))),
        ..Default::default()
    };
    let response = Pipeline::new(&loaded).run(&request, &mut |_| {})?;
    for (q, a) in request.questions.iter().zip(&response.answers) {
        println!("{q}\n  -> {}", a.text.trim());
    }
    let (before, after) = response.kv_bytes;
    println!("{press} at ratio {ratio}: KV cache {before} -> {after} bytes, compressed in {:.1} s", response.timings.compress);
    Ok(response.answers.into_iter().map(|a| a.text).collect())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let press = args.get(1).map_or("kvcompose", String::as_str);
    let ratio = args.get(2).map_or(Ok(0.5), |r| r.parse::<f64>())?;
    run::<burn::backend::Flex>(Default::default(), press, ratio).map(|_| ())
}

#[test]
fn compress_answers_both_questions() {
    let answers = run::<burn::backend::Flex>(Default::default(), "snapkv", 0.5).unwrap();
    assert_eq!(answers.len(), 2);
    assert!(answers.iter().all(|a| !a.trim().is_empty()), "{answers:?}");
}
