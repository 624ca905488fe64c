//! `kvc-bench products`: the kernels on the codes alone. One product (`kvc_core::kernels::quant::
//! linear`) of `--tokens` rows of activations (1: a decode step's matrix-vector product; up to
//! 32: a batched decode step's, each weight row's codes read once for all of them; more: a
//! prefill chunk's, dequantized tiles and an f32 GEMM, or with int8 activations the int8 kernels
//! over all the rows) on a `Q4_K`-like and a `Q6_K`-like matrix of random codes and scales, with f32
//! and int8 activations, on the threads of rayon's pool: the best time of `--calls` calls after
//! one warm-up, GB/s of codes (4 bits a weight for `Q4_K`, 6 for `Q6_K`) and multiply-adds per
//! second. The default shape is Qwen2.5-Coder-1.5B's gate/up projection (8960 x 1536). One JSON
//! line per product, then a table. Machines are noisy: compare figures of one run.

use anyhow::{bail, Result};
use kvc_core::kernels::quant::{linear, SUPER_BLOCK};
use kvc_core::{Activations, QuantMatrix};

/// The arguments of `kvc-bench products`.
#[derive(clap::Args)]
pub struct ProductsArgs {
    /// Output features (rows of the matrices).
    #[arg(long, default_value_t = 8960)]
    rows: usize,
    /// Input features (a multiple of 256, as the K-quants' super-blocks).
    #[arg(long, default_value_t = 1536)]
    cols: usize,
    /// Timed calls per product (the best is reported).
    #[arg(long, default_value_t = 100)]
    calls: usize,
    /// Rows of activations (tokens): 1 is a decode step, up to 32 a batched decode step, more a
    /// prefill chunk. Each line reports GB/s of codes read and GMAC/s (billions of
    /// multiply-adds a second).
    #[arg(long, default_value_t = 1)]
    tokens: usize,
}

/// A deterministic stream of pseudo-random numbers (the same matrices every run).
fn lcg(s: &mut u64) -> u32 {
    *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (*s >> 33) as u32
}

/// Runs `kvc-bench products`.
///
/// # Errors
/// `--cols` not a multiple of 256, `--rows`, `--calls` or `--tokens` 0.
pub fn run(a: ProductsArgs) -> Result<()> {
    if a.cols == 0 || a.cols % SUPER_BLOCK != 0 || a.rows == 0 || a.calls == 0 || a.tokens == 0 {
        bail!("--cols must be a positive multiple of {SUPER_BLOCK}, --rows, --calls and --tokens at least 1");
    }
    let (rows, cols, n) = (a.rows, a.cols, a.tokens);
    let mut s = 1u64;
    let supers = rows * cols / SUPER_BLOCK;
    let d: Vec<f32> = (0..supers).map(|_| 1e-3 * (1 + lcg(&mut s) % 100) as f32).collect();
    let c6: Vec<i8> = (0..rows * cols).map(|_| (lcg(&mut s) % 64) as i8 - 32).collect();
    let sc6: Vec<i8> = (0..rows * cols / 16).map(|_| (lcg(&mut s) % 200) as i8 - 100).collect();
    let q6 = QuantMatrix::from_k_quants(rows, cols, &c6, 16, d.clone(), vec![], sc6, vec![])?;
    let c4: Vec<i8> = (0..rows * cols).map(|_| (lcg(&mut s) % 16) as i8).collect();
    let sc4: Vec<i8> = (0..rows * cols / 32).map(|_| (lcg(&mut s) % 64) as i8).collect();
    let m4: Vec<i8> = (0..rows * cols / 32).map(|_| (lcg(&mut s) % 64) as i8).collect();
    let q4 = QuantMatrix::from_k_quants(rows, cols, &c4, 32, d.clone(), d, sc4, m4)?;
    let x: Vec<f32> = (0..n * cols).map(|_| (lcg(&mut s) % 2001) as f32 / 1000.0 - 1.0).collect();
    let mut table = Vec::new();
    for (name, w, bits) in [("Q4_K", &q4, 4.0), ("Q6_K", &q6, 6.0)] {
        for (act, act_name) in [(Activations::F32, "f32"), (Activations::Int8, "int8")] {
            std::hint::black_box(linear(&x, n, &[w], act));
            let best = (0..a.calls)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(linear(&x, n, &[w], act));
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            let gbs = (rows * cols) as f64 * bits / 8.0 / best / 1e9;
            let gmacs = (rows * cols * n) as f64 / best / 1e9;
            let packing = format!("{:?}", w.codes());
            println!("{}", serde_json::json!({"format": name, "codes": packing, "activations": act_name, "rows": rows, "cols": cols, "tokens": n, "threads": rayon::current_num_threads(), "best_ms": best * 1e3, "codes_gb_s": gbs, "gmac_s": gmacs}));
            table.push(format!("| {name} ({packing}) | {act_name} | {:.3} | {gbs:.1} | {gmacs:.1} |", best * 1e3));
        }
    }
    println!("\n| matrix {rows} x {cols}, {n} token(s) | activations | best ms | GB/s of codes | GMAC/s |\n|---|---|---|---|---|");
    for line in table {
        println!("{line}");
    }
    Ok(())
}
