//! Rotary position embedding, rotate-half convention (HF `apply_rotary_pos_emb`).
//!
//! burn's `RotaryEncoding` rotates interleaved pairs; HF checkpoints (and llama.cpp's NEOX mode,
//! after undoing the Q/K permutation of Llama GGUFs) pair dimension `i` with `i + head_dim/2`.
//! Tables are computed on the host for exactly the positions asked for, so decoding after
//! compression continues at any original position.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use crate::config::{ModelConfig, RopeScaling};

/// Inverse frequencies `[head_dim/2]`, f32 as HF computes them (`1 / base^(2i/d)`), with the
/// model's scaling applied (HF `_compute_llama3_parameters`; llama.cpp `rope_freqs` divisors).
pub fn inv_freq(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / d as f32;
            1.0 / (config.rope_theta.powf(exponent as f64) as f32)
        })
        .collect();
    match &config.rope_scaling {
        None => base,
        Some(RopeScaling::FreqFactors(f)) => base.iter().zip(f).map(|(b, f)| b / f).collect(),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let (factor, lo, hi, old) =
                (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *original_max_position_embeddings as f32);
            let low_freq_wavelen = old / lo;
            let high_freq_wavelen = old / hi;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                    let medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
                    if medium {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// cos and sin tables `[1, len, heads, head_dim]` for positions `first..first+len`, repeated over
/// `heads` so that they multiply projections laid out `[batch, len, heads, head_dim]` element by
/// element (no broadcast). Angles are f32 products as in HF, then cos/sin are evaluated exactly and
/// rounded to f32 (then to `dtype`, the activations' float type).
pub fn tables<B: Backend>(inv_freq: &[f32], first: usize, len: usize, heads: usize, device: &B::Device, dtype: DType) -> (Tensor<B, 4>, Tensor<B, 4>) {
    tables_at(inv_freq, first..first + len, heads, device, dtype)
}

/// As [`tables`] for any positions, one per row of the output `[1, positions, heads, head_dim]`
/// (a batched decode step: each sequence's next position).
pub fn tables_at<B: Backend>(
    inv_freq: &[f32],
    positions: impl ExactSizeIterator<Item = usize>,
    heads: usize,
    device: &B::Device,
    dtype: DType,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let half = inv_freq.len();
    let d = 2 * half;
    let len = positions.len();
    let mut cos = Vec::with_capacity(len * heads * d);
    let mut sin = Vec::with_capacity(len * heads * d);
    for p in positions {
        let angles: Vec<f64> = inv_freq.iter().map(|&f| ((p as f32) * f) as f64).collect();
        let c: Vec<f32> = angles.iter().chain(&angles).map(|a| a.cos() as f32).collect();
        let s: Vec<f32> = angles.iter().chain(&angles).map(|a| a.sin() as f32).collect();
        for _ in 0..heads {
            cos.extend_from_slice(&c);
            sin.extend_from_slice(&s);
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [1, len, heads, d]), (device, dtype)),
        Tensor::from_data(TensorData::new(sin, [1, len, heads, d]), (device, dtype)),
    )
}

/// Applies RoPE to `x` `[batch, len, heads, head_dim]` with tables from [`tables`]:
/// `x*cos + rotate_half(x)*sin`.
pub fn apply<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}
