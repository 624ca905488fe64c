//! Accuracy benchmark: score vs compression ratio per press on RULER-style rows, with kvpress's
//! protocol (`evaluation/evaluate.py` + `pipeline.py`), so that the numbers compare with
//! kvpress's (`tools/kvpress_eval.py` writes the same summary format).
//!
//! Protocol: the chat template wraps context and question as one user message split where the
//! question starts; `answer_prefix` follows the assistant header byte for byte (tokenized with the
//! question); BOS only as the template writes it; greedy, `max_new_tokens` per row, stop at EOS;
//! predictions decoded from the generated ids only; one prefill per row serves every press and
//! ratio; scores as RULER (`string_match_part` for `qa_*`, `string_match_all` otherwise, x100,
//! mean per task, then mean over tasks).

use std::path::PathBuf;

pub mod data;
pub mod metrics;
pub mod needle;
pub mod plots;
pub mod runner;
pub mod summary;

/// Errors of the evaluation harness.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read or written (the I/O error is the source: `{:#}` prints both).
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A bad row or prediction line.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// 1-based line (0: the whole file).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A row that cannot be run (reported as skipped, the run goes on).
    #[error("skipped: {0}")]
    Skip(String),
    /// A plot could not be drawn.
    #[error("plot {path}: {message}")]
    Plot {
        /// The plot file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// Model, tokenizer or pipeline errors.
    #[error(transparent)]
    Model(#[from] kvc_models::ModelError),
    /// Press specification errors.
    #[error(transparent)]
    Press(#[from] kvc_core::CoreError),
}
