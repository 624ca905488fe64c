//! Every ggml tensor type the GGUF reader dequantizes, checked bit for bit against gguf-py.
//!
//! The real models exercise only Q4_1, Q4_K, Q5_0, Q6_K and Q8_0. The fixture
//! `tests/fixtures/gguf_types/` (made by `tools/make_gguf_type_fixtures.py`; see its README)
//! holds one small GGUF file, `types.gguf.bin`, with per type gguf-py-quantized normal data
//! (`<type>.quant`, all but the K-quants, which gguf-py cannot quantize) and random valid raw
//! blocks (`<type>.random`), and `reference.safetensors`: every tensor dequantized to f32 by
//! `gguf.quants.dequantize`, with each tensor's type name in the metadata (`type.<name>`).

use std::collections::BTreeSet;
use std::path::PathBuf;

use kvc_models::gguf::{GgmlType, GgufFile};
use safetensors::{Dtype, SafeTensors};

/// Every type `kvc_models::gguf::dequantize` supports; the fixture must hold each of them.
const SUPPORTED: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Exhaustive on purpose: a new `GgmlType` variant stops this test compiling until it is added
/// to `SUPPORTED` here and to the fixture script.
fn listed(kind: GgmlType) -> bool {
    use GgmlType::*;
    match kind {
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q5K | Q6K => SUPPORTED.contains(&kind),
        Other(_) => false,
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_types").join(name)
}

#[test]
fn every_supported_type_dequantizes_like_gguf_py() {
    let gguf = GgufFile::open(&fixture("types.gguf.bin")).expect("open the fixture GGUF");
    let bytes = std::fs::read(fixture("reference.safetensors")).expect("read the reference");
    let refs = SafeTensors::deserialize(&bytes).expect("valid reference safetensors");
    let (_, header) = SafeTensors::read_metadata(&bytes).expect("reference header");
    let types = header.metadata().clone().expect("reference metadata with the type names");

    let mut in_gguf: Vec<&str> = gguf.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut in_ref = refs.names();
    in_gguf.sort_unstable();
    in_ref.sort_unstable();
    assert_eq!(in_gguf, in_ref, "the GGUF and the reference list different tensors");

    for info in &gguf.tensors {
        let (name, kind) = (&info.name, info.kind.name());
        assert!(listed(info.kind), "{name}: type {kind} is not one the reader supports");
        assert_eq!(types.get(&format!("type.{name}")), Some(&kind), "{name}: gguf-py's type vs kvc's");
        let want = refs.tensor(name).unwrap();
        assert_eq!(want.dtype(), Dtype::F32, "{name}");
        let (got, shape) = gguf.tensor_f32(name).unwrap_or_else(|e| panic!("{name} ({kind}): {e}"));
        assert_eq!(shape, want.shape(), "{name} ({kind}): shape");
        let want: Vec<f32> =
            want.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(got.len(), want.len(), "{name} ({kind}): element count");
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!(
                "{name} ({kind}): first mismatch at flat index {i}: kvc {:e} ({:#010x}), gguf-py {:e} ({:#010x})",
                got[i],
                got[i].to_bits(),
                want[i],
                want[i].to_bits()
            );
        }
    }

    let covered: BTreeSet<String> = gguf.tensors.iter().map(|t| t.kind.name()).collect();
    let supported: BTreeSet<String> = SUPPORTED.iter().map(GgmlType::name).collect();
    assert_eq!(covered, supported, "the fixture must hold every supported type (rerun the script?)");
}

/// The block codes a model holds (`quant_codes`, and `k_quant_parts` for the K-quants, read by
/// `kvc_core::QuantMatrix`) give back gguf-py's dequantized weights as `code * scale + min`, bit
/// for bit, for every quantized type (Q4_0 included: its codes are `q - 8`); the float types have
/// no codes (they stay dense).
#[test]
fn quant_codes_give_back_the_dequantized_weights() {
    let gguf = GgufFile::open(&fixture("types.gguf.bin")).expect("open the fixture GGUF");
    let bytes = std::fs::read(fixture("reference.safetensors")).expect("read the reference");
    let refs = SafeTensors::deserialize(&bytes).expect("valid reference safetensors");
    let mut with_codes = BTreeSet::new();
    for info in &gguf.tensors {
        let (name, kind) = (&info.name, info.kind);
        let raw = gguf.tensor_bytes(info).expect("in the file");
        let want: Vec<f32> = refs.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        if let Some(p) = kvc_models::gguf::k_quant_parts(kind, raw) {
            with_codes.insert(kind.name());
            let n = p.codes.len();
            let m = kvc_core::QuantMatrix::from_k_quants(1, n, &p.codes, p.group, p.d, p.dmin, p.sc, p.m).expect("a valid K-quant");
            assert_eq!(bits(&m.dequantize()), bits(&want), "{name} ({})", kind.name());
            continue;
        }
        let Some((codes, scale, min)) = kvc_models::gguf::quant_codes(kind, raw) else {
            assert!(matches!(kind, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16), "{name}: no codes for {}", kind.name());
            continue;
        };
        with_codes.insert(kind.name());
        assert_eq!((codes.len(), scale.len() * 32, min.len() * 32), (want.len(), want.len(), want.len()), "{name}");
        for (i, (&c, &w)) in codes.iter().zip(&want).enumerate() {
            let got = c as f32 * scale[i / 32] + min[i / 32];
            assert_eq!(got.to_bits(), w.to_bits(), "{name} ({}) [{i}]: code {c}: {got} vs {w}", kind.name());
        }
        let n = codes.len();
        let m = kvc_core::QuantMatrix::from_codes(1, n, &codes, scale, min).expect("whole blocks");
        assert_eq!(bits(&m.dequantize()), bits(&want), "{name} ({}) through QuantMatrix", kind.name());
    }
    let want: BTreeSet<String> = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"].iter().map(|s| s.to_string()).collect();
    assert_eq!(with_codes, want);
}
