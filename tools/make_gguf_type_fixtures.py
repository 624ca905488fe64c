#!/usr/bin/env python3
"""Regenerate the GGUF tensor-type fixture used by crates/kvc-models/tests/gguf_types.rs
(crates/kvc-models/tests/fixtures/gguf_types/).

    python3 -m pip install gguf==0.19.0 numpy safetensors
    python3 tools/make_gguf_type_fixtures.py [--out DIR]

Writes one GGUF file, `types.gguf.bin` (named so the repository's `*.gguf` ignore rule
misses it), holding tensors of every ggml type kvc's GGUF reader
dequantizes (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), and
`reference.safetensors`: each tensor dequantized to little-endian f32 by gguf-py's own
`gguf.quants.dequantize`, after reading the file back with `gguf.GGUFReader` (so the
reference is what gguf-py makes of the bytes actually on disk).

Per type up to two tensors:

* `<type>.quant` [3, 256] -- random normal data (rows scaled by 0.01, 1 and 30) passed through
  `gguf.quants.quantize`, for the types gguf-py can quantize (all but the K-quants).
* `<type>.random` [2, 768] (F16: [2, 3, 256]) -- random raw blocks: every byte random except
  the f16 scale fields (d, and m / dmin where the type has one), which are set to finite,
  moderate values (|x| log-uniform in [1e-3, 0.5], random sign), so no NaN or inf can appear. For F32 / F16 / BF16 the elements are random bit patterns with the all-ones
  exponent excluded (so subnormals and -0 occur, NaN / inf do not). This is the only source
  for Q4_K / Q5_K / Q6_K (gguf-py has no quantizer for them) and, for the other types,
  reaches bit patterns a quantizer never emits (e.g. Q8_0's -128).

Rows of 256 / 768 span several blocks of every type (32 or 256 elements per block).
Deterministic: numpy `default_rng(SEED)` with SEED = 20240909; the safetensors file is written
here with a sorted header (the safetensors package orders `__metadata__` at random), and
checked by loading it back with `safetensors.numpy.load_file`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file

SEED = 20240909
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "crates/kvc-models/tests/fixtures/gguf_types"

# every type kvc_models::gguf::dequantize supports
TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]

# byte offsets of the f16 scale fields (d, m / dmin) inside one block, per type (ggml's block_*)
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],  # d, dmin
    T.Q5_K: [0, 2],  # d, dmin
    T.Q6_K: [208],   # d at the end of the block
}


def moderate_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    mag = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), n))
    sign = rng.choice([-1.0, 1.0], n)
    out = (mag * sign).astype(np.float16)
    assert np.all(np.isfinite(out)) and np.all(out != 0)
    return out


def random_float_bits(rng: np.random.Generator, n: int, kind: T) -> np.ndarray:
    """Random finite bit patterns (exponent field never all ones) of F32 / F16 / BF16."""
    if kind == T.F32:
        bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
        exp = (bits >> 23) & 0xFF
        bits = np.where(exp == 0xFF, bits & ~np.uint32(0x40000000), bits).astype(np.uint32)
        return bits.view(np.float32)
    bits = rng.integers(0, 2**16, n, dtype=np.uint32).astype(np.uint16)
    shift, mask, clear = (10, 0x1F, 0x4000) if kind == T.F16 else (7, 0xFF, 0x4000)
    exp = (bits >> shift) & mask
    bits = np.where(exp == mask, bits & ~np.uint16(clear), bits).astype(np.uint16)
    return bits.view(np.float16) if kind == T.F16 else bits.view(np.uint8)


def random_blocks(rng: np.random.Generator, kind: T, rows: int, cols: int) -> np.ndarray:
    """Random raw blocks of `kind`, shaped [rows, bytes per row], f16 scales finite."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8, endpoint=False)
    for off in F16_FIELDS[kind]:
        raw[:, off:off + 2] = moderate_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, cols // block * size)


def build(rng: np.random.Generator) -> list[tuple[str, T, np.ndarray]]:
    tensors = []
    for kind in TYPES:
        name = kind.name.lower()
        if kind not in (T.Q4_K, T.Q5_K, T.Q6_K):
            data = rng.standard_normal((3, 256)).astype(np.float32)
            data *= np.array([[0.01], [1.0], [30.0]], dtype=np.float32)
            tensors.append((f"{name}.quant", kind, gguf.quants.quantize(data, kind)))
        if kind == T.F32:
            raw = random_float_bits(rng, 2 * 768, kind).reshape(2, 768)
        elif kind == T.F16:
            raw = random_float_bits(rng, 2 * 3 * 256, kind).reshape(2, 3, 256)
        elif kind == T.BF16:
            raw = random_float_bits(rng, 2 * 768, kind).reshape(2, 768 * 2)
        else:
            raw = random_blocks(rng, kind, 2, 768)
        tensors.append((f"{name}.random", kind, raw))
    return tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gguf_path = args.out / "types.gguf.bin"  # not `.gguf`: the repo .gitignore drops *.gguf
    ref_path = args.out / "reference.safetensors"

    rng = np.random.default_rng(SEED)
    tensors = build(rng)

    w = gguf.GGUFWriter(str(gguf_path), arch="kvc-types")
    w.add_name("kvc ggml tensor-type fixture")
    w.add_description(f"tools/make_gguf_type_fixtures.py, seed {SEED}")
    for name, kind, arr in tensors:
        if kind in (T.F32, T.F16):
            w.add_tensor(name, arr)  # dtype gives the type, shape as is
        else:
            # uint8 bytes: the writer converts the byte shape (last dim = bytes per row) to the
            # element shape itself (quant_shape_from_byte_shape), so raw_shape is the byte shape
            w.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    reader = gguf.GGUFReader(str(gguf_path))
    refs: dict[str, np.ndarray] = {}
    meta: dict[str, str] = {"gguf_py_version": _gguf_version(), "seed": str(SEED)}
    expected = {name: kind for name, kind, _ in tensors}
    assert [t.name for t in reader.tensors] == [n for n, _, _ in tensors]
    for t in reader.tensors:
        kind = T(t.tensor_type)
        assert kind == expected[t.name], (t.name, kind, expected[t.name])
        y = np.ascontiguousarray(gguf.quants.dequantize(t.data, kind), dtype="<f4")
        assert np.all(np.isfinite(y)), t.name
        refs[t.name] = y
        meta[f"type.{t.name}"] = kind.name
    covered = {T(t.tensor_type) for t in reader.tensors}
    assert covered == set(TYPES), covered ^ set(TYPES)
    save_sorted(refs, meta, ref_path)
    back = load_file(str(ref_path))
    assert list(back) == sorted(refs) and all(np.array_equal(back[k].view(np.uint32), refs[k].view(np.uint32)) for k in refs)

    for name, y in refs.items():
        print(f"{name:14s} {meta['type.' + name]:5s} {list(y.shape)}")
    for p in (gguf_path, ref_path):
        print(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}: {os.path.getsize(p):,} bytes")


def save_sorted(tensors: dict[str, np.ndarray], meta: dict[str, str], path: Path) -> None:
    """safetensors with a deterministic header: keys sorted, data in key order, f32 only."""
    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    blobs, pos = [], 0
    for name in sorted(tensors):
        b = tensors[name].astype("<f4", copy=False).tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def _gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # pragma: no cover
        return "unknown"


if __name__ == "__main__":
    main()
