"""What the reference speed scripts (bench_transformers.py, bench_llamacpp.py) share: their command
line and the token ids they time, identical to `kvc-bench speed`'s (the text tokenized with the
reference SmolLM2 tokenizer, repeated to the longest length)."""

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
    ap.add_argument("--smollm2", default=None)
    return ap


def model_and_ids(args) -> tuple[Path, list[int], list[int]]:
    """The SmolLM2 GGUF path, the token ids (at least as many as the longest length), the lengths."""
    path = mmf.locate_smollm2(args.smollm2, True)
    gguf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = mmf.smollm2_reference_tokenizer(gguf_tok, mmf.gguf_meta(path))
    ids = tok(Path(args.text).read_text(), add_special_tokens=False)["input_ids"]
    lens = [int(x) for x in args.tokens.split(",")]
    while len(ids) < max(lens):
        ids = ids + ids
    return path, ids, lens
