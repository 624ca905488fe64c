"""What the reference speed scripts (bench_transformers.py, bench_llamacpp.py) share: their command
line and the token ids they time, identical to `kvc-bench speed`'s (the text tokenized with the
model's reference tokenizer -- SmolLM2's, or Qwen2.5's with `--model qwen|qwen15` -- repeated to
the longest length)."""

import argparse
from pathlib import Path

from transformers import AutoTokenizer

import make_model_fixtures as mmf


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", default="1024,2048")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smollm2", default=None, help="path to the SmolLM2 GGUF (default: kvc's cache)")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "qwen", "qwen15"],
                    help="smollm2 (default), qwen (Qwen2.5-Coder-0.5B) or qwen15 (Qwen2.5-Coder-1.5B), "
                         "located as tools/make_model_fixtures.py does")
    return ap


def locate(model: str, smollm2_arg=None):
    """The GGUF path and the reference tokenizer of a known model (tools/make_model_fixtures.py)."""
    if model == "smollm2":
        path, fix = mmf.locate_smollm2(smollm2_arg, True), mmf.smollm2_reference_tokenizer
    elif model in ("qwen", "qwen15"):
        path = (mmf.locate_qwen if model == "qwen" else mmf.locate_qwen15)(None, True)
        fix = mmf.qwen_reference_tokenizer
    else:
        raise SystemExit(f"unknown model {model!r} (smollm2|qwen|qwen15)")
    gguf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return path, fix(gguf_tok, mmf.gguf_meta(path))


def model_and_ids(args) -> tuple[Path, list[int], list[int]]:
    """The model's GGUF path, the token ids (at least as many as the longest length), the lengths."""
    path, tok = locate(args.model, args.smollm2)
    ids = tok(Path(args.text).read_text(), add_special_tokens=False)["input_ids"]
    lens = [int(x) for x in args.tokens.split(",")]
    return path, repeated(ids, max(lens)), lens


def repeated(ids: list[int], n: int) -> list[int]:
    """`ids` repeated until there are at least `n` (as `kvc-bench speed/compress --text` repeat a short text)."""
    if not ids:
        raise SystemExit("the text has no tokens")
    while len(ids) < n:
        ids = ids + ids
    return ids
