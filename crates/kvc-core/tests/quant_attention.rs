//! Attention over quantized layers through the backends' entry point: the decode kernel
//! ([`kvc_core::kvquant::decode_attention`] behind `KvcBackend::kvc_quant_attention`) against the
//! generic path (codes widened, then the backend's attention), on caches with ragged heads, for
//! int8, int4, f16 and bf16, on flex and ndarray.
#![cfg(all(feature = "flex", feature = "ndarray"))]

use burn::tensor::{Tensor, TensorData};
use kvc_core::kernels::{generic_quant_attention, AttentionArgs};
use kvc_core::{KvCache, KvQuant, KvcBackend};

fn noise<B: KvcBackend>(shape: [usize; 4], seed: usize) -> Tensor<B, 4> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((((i + seed) * 2_654_435_761) >> 7) % 2000) as f32 / 1000.0 - 1.0).collect();
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

fn check<B: KvcBackend>(what: &str) {
    let (h, g, d) = (3, 3, 64);
    for (spec, len) in [(KvQuant::int8(), 200), (KvQuant::int8(), 1300), (KvQuant::int4(), 700), (KvQuant { residual: 0, ..KvQuant::int4() }, 300), (KvQuant::f16(), 1300), (KvQuant::bf16(), 700)] {
        let mut cache = KvCache::<B>::new(1);
        cache.append(0, 0, noise([1, h, len, d], 1), noise([1, h, len, d], 2)).unwrap();
        // ragged heads: head 1 keeps every other slot, head 2 a third
        let keep: Vec<Vec<u32>> = vec![(0..len as u32).collect(), (0..len as u32).step_by(2).collect(), (0..len as u32).step_by(3).collect()];
        cache.gather_layer(0, &[keep]).unwrap();
        cache.quantize(spec).unwrap();
        for step in 0..3 {
            let (keys, values) = cache.append(0, len + step, noise([1, h, 1, d], 10 + step), noise([1, h, 1, d], 20 + step)).unwrap();
            let kv = cache.layer(0).unwrap().unwrap();
            let quant = kv.quant.as_deref().unwrap();
            let args = AttentionArgs { queries: noise([1, h * g, 1, d], 30 + step), keys, values, valid: kv.valid.as_deref(), reduce: None, probs: false };
            let got = B::kvc_quant_attention(args.clone(), quant).output.into_data().to_vec::<f32>().unwrap();
            let want = generic_quant_attention(args, quant).output.into_data().to_vec::<f32>().unwrap();
            let gap = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(gap < 1e-5, "{what} {spec:?} len {len} step {step}: {gap}");
        }
    }
}

#[test]
fn decode_kernel_equals_the_generic_path() {
    check::<burn::backend::Flex>("flex");
    check::<burn::backend::NdArray<f32>>("ndarray");
}
