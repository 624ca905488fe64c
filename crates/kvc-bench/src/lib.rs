//! # kvc-bench
//!
//! Benchmarks of kvc as a library: [`eval`], the accuracy benchmark (RULER-style rows, score vs
//! compression ratio per press, kvpress's protocol), and [`scaling`]'s table and plot of time
//! against context length. The `kvc-bench` binary adds the speed measurements and the command line. Generic over `B: Backend`; backends are named only in the
//! binary (feature-gated).

pub mod batch;
pub mod eval;
pub mod scaling;
