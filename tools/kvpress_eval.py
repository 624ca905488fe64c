#!/usr/bin/env python3
"""Run NVIDIA kvpress 0.5.5 on RULER rows with kvpress's own evaluation
protocol and write the results in kvc's eval format, so that

    kvc-bench eval --compare DIR/summary.json

can print kvc and kvpress side by side.

    OMP_WAIT_POLICY=PASSIVE python3 tools/kvpress_eval.py \
        --data ../shared/data/ruler/smollm2_2048_dev.jsonl \
        --presses kvcompose,snapkv,tova,pyramidkv,streaming_llm,knorm,expected_attention \
        --ratios 0.25,0.5,0.75 [--rows-per-task K] --out DIR [--model smollm2|qwen|qwen15]
        [--quantized-cache 4]   (every press but kvcompose: see --help)

Data: JSONL rows with kvpress's RULER columns `context`, `question`,
`answer_prefix`, `answer` (list of str), `task`, `max_new_tokens`, `length`.
`--rows-per-task K` keeps the first K rows of every task in file order.

Model: SmolLM2-135M-Instruct Q4_1 (or Qwen2.5-Coder-0.5B-Instruct Q4_K_M with
`--model qwen`, Qwen2.5-Coder-1.5B-Instruct Q4_K_M with `--model qwen15`) dequantized to float32 by transformers' GGUF loader, with the
patched tokenizer, located and loaded exactly as tools/make_model_fixtures.py /
tools/make_kvcompose_fixtures.py do (both imported). CPU, 2 torch threads,
attn_implementation "sdpa" (none of the presses here needs eager; KVComposePress
switches to eager by itself for its prefill/scoring pass and restores sdpa).

Protocol (kvpress's evaluation/evaluate.py): one
`pipeline("kv-press-text-generation", model=model, tokenizer=tok)` and per row
`pipe(context, question=question, answer_prefix=answer_prefix, press=press,
max_new_tokens=row["max_new_tokens"])`. The pipeline applies the chat template
(the context is wrapped as the user message, followed by a separator; everything
after the separator -- "<|im_end|>\\n<|im_start|>assistant\\n" -- is the
question suffix), prefills the context under `with press(model)`, then feeds
`question + question_suffix + answer_prefix` at positions T.. and decodes
greedily (argmax), stopping on `model.generation_config.eos_token_id` (the
first generated token is not checked, as in kvpress), and decodes the ids with
skip_special_tokens=True. The prediction is recorded as the pipeline returns it.
Presses: kvpress defaults with compression_ratio = ratio, plus one uncompressed
run per row (press "none", ratio 0.0).

KNOWN kvpress/transformers 5.2 bug worked around: presses that leave layers
with different cache lengths (KVCompose, PyramidKV) crash when the multi-token
question is fed (the attention mask is sized from layer 0's cache length). The
pipeline instance's `generate_answer` is wrapped: after the pipeline's own
preprocess and prefill (`with press(model): model.model(input_ids=context_ids,
past_key_values=cache)`), if the layer lengths differ, the question is fed ONE
TOKEN AT A TIME and every single-query step (question and generated tokens)
runs through `kvc_eager_1q` (tools/make_kvcompose_fixtures.py: transformers'
eager math for one query, no mask), with the same explicit position ids, the
same greedy/EOS rule and the same skip_special_tokens decode as
`generate_answer`. Otherwise the pipeline's own `generate_answer` runs. Each
prediction line records `"decode": "pipeline"` or `"single_query_workaround"`.

Scoring (kvpress evaluation/benchmarks/ruler/calculate_metrics.py):
prediction -> re.sub(r"[\\x00-\\x1f]", "", pred.strip()).strip(); qa_* tasks:
string_match_part (100 if any reference is a case-insensitive substring),
other tasks: string_match_all (100 x fraction of references found,
case-insensitive). Per-task score = mean over rows (calculate_metrics then
rounds it to 2 decimals; the summary does the same); overall = mean over tasks.

Outputs: DIR/predictions.jsonl (one line per (row, press, ratio), appended and
flushed; a rerun skips what is there) and DIR/summary.json (rewritten after
every row).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(2)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_kvcompose_fixtures as mkc  # noqa: E402  (imports kvpress, registers kvc_eager_1q)
import bench_common  # noqa: E402
import make_model_fixtures as mmf  # noqa: E402

import kvpress  # noqa: E402,F401  (registers the "kv-press-text-generation" pipeline)
from kvpress import (  # noqa: E402
    ExpectedAttentionPress,
    KnormPress,
    KVComposePress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.utils import extract_keys_and_values  # noqa: E402
from transformers import QuantizedCache, pipeline  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

torch.set_num_threads(2)
hf_logging.set_verbosity_error()

TOOL = "kvpress " + (mmf._dist_version("kvpress") or "?")
KV_FLOAT = "DynamicCache (the model's float type)"

PRESSES = {
    "kvcompose": KVComposePress,
    "snapkv": SnapKVPress,
    "tova": TOVAPress,
    "pyramidkv": PyramidKVPress,
    "streaming_llm": StreamingLLMPress,
    "knorm": KnormPress,
    "expected_attention": ExpectedAttentionPress,
}


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def load(model_name: str):
    path, tok = bench_common.locate(model_name)  # the GGUF and patched tokenizer of make_model_fixtures
    model = mmf.load_gguf_model(path)
    # make_model_fixtures loads with eager; kvpress's evaluate.py uses the default (sdpa) unless
    # a press needs eager. transformers reads config._attn_implementation on every forward.
    model.config._attn_implementation = "sdpa"
    return model.eval(), tok, path


def layer_lens(cache) -> list[int]:
    if isinstance(cache, QuantizedCache):  # the quantized part plus the full-precision residual
        return [int(extract_keys_and_values(cache, i)[0].shape[-2])
                + (int(layer.keys.shape[-2]) if layer.keys.dim() == 4 else 0) for i, layer in enumerate(cache.layers)]
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def make_pipe(model, tok):
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    pipe._kvc = {}
    orig_pre = pipe.preprocess
    orig_gen = pipe.generate_answer

    def preprocess(self, *args, **kwargs):
        out = orig_pre(*args, **kwargs)
        self._kvc["context_tokens"] = int(out["context_ids"].shape[1])
        self._kvc["question_tokens"] = [int(q.shape[1]) for q in out["questions_ids"]]
        return out

    def generate_answer(self, question_ids, cache, context_length, max_new_tokens):
        lens = layer_lens(cache)
        self._kvc["cache_lens"] = (min(lens), max(lens))
        if len(set(lens)) == 1:
            self._kvc["decode"] = "pipeline"
            return orig_gen(question_ids=question_ids, cache=cache, context_length=context_length,
                            max_new_tokens=max_new_tokens)
        self._kvc["decode"] = "single_query_workaround"
        return workaround_answer(self, question_ids, cache, context_length, max_new_tokens)

    pipe.preprocess = types.MethodType(preprocess, pipe)
    pipe.generate_answer = types.MethodType(generate_answer, pipe)
    return pipe


@torch.no_grad()
def workaround_answer(pipe, question_ids, cache, context_length: int, max_new_tokens: int) -> str:
    """kvpress's generate_answer, except that the question is fed one token at a time and
    every step runs through the single-query attention kvc_eager_1q (ragged-cache bug)."""
    model = pipe.model
    q = question_ids.shape[1]
    with mkc.attn_impl(model, "kvc_eager_1q"):
        for i in range(q):
            out = model(input_ids=question_ids[:, i:i + 1], past_key_values=cache,
                        position_ids=torch.tensor([[context_length + i]]), logits_to_keep=1)
        position_ids = torch.tensor([[context_length + q]])
        generated_ids = [out.logits[0, -1].argmax()]
        stop = model.generation_config.eos_token_id
        if not isinstance(stop, list):
            stop = [stop]
        for i in range(max_new_tokens - 1):
            out = model(input_ids=generated_ids[-1].unsqueeze(0).unsqueeze(0), past_key_values=cache,
                        position_ids=position_ids + i)
            new_id = out.logits[0, -1].argmax()
            generated_ids.append(new_id)
            if new_id.item() in stop:
                break
    return str(pipe.tokenizer.decode(torch.stack(generated_ids), skip_special_tokens=True))


# ---------------------------------------------------------------------------
# Scoring (kvpress evaluation/benchmarks/ruler/calculate_metrics.py)
# ---------------------------------------------------------------------------

NP_PATTERN = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str) -> str:
    return NP_PATTERN.sub("", pred.strip()).strip()


def score_row(task: str, pred: str, refs: list[str]) -> float:
    p = postprocess(pred).lower()
    hits = [1.0 if r.lower() in p else 0.0 for r in refs]
    if task.split("_")[0] == "qa":  # string_match_part
        return max(hits) * 100.0
    return sum(hits) / len(refs) * 100.0  # string_match_all


def aggregate(lines: list[dict]) -> dict:
    by_task = defaultdict(list)
    for d in lines:
        by_task[d["task"]].append(d["score"])
    tasks = {t: round(sum(v) / len(v), 2) for t, v in sorted(by_task.items())}
    return {"score": sum(tasks.values()) / len(tasks) if tasks else 0.0, "tasks": tasks}


def rkey(r: float) -> str:
    return str(float(r))  # 0.25 -> "0.25", 0.5 -> "0.5"


def summarize(out: Path, preds: list[dict], meta: dict, planned_rows: list[int]) -> None:
    unc = aggregate([d for d in preds if d["press"] == "none"])
    presses: dict = {}
    order = [p for p in meta["presses"]] + sorted({d["press"] for d in preds} - set(meta["presses"]) - {"none"})
    for name in order:
        mine = [d for d in preds if d["press"] == name]
        if not mine:
            continue
        ratios = sorted({float(d["ratio"]) for d in mine})
        rs = {rkey(r): aggregate([d for d in mine if float(d["ratio"]) == r]) for r in ratios}
        xs = [0.0] + ratios
        ys = [unc["score"]] + [rs[rkey(r)]["score"] for r in ratios]
        area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
        within = [r for r in ratios if rs[rkey(r)]["score"] >= 0.9 * unc["score"]]
        presses[name] = {"ratios": rs, "auc": area / ratios[-1] if ratios[-1] > 0 else unc["score"],
                         "max_ratio_within_10pct": max(within) if within else 0}
    rows_done = sorted({d["row"] for d in preds})
    notes = list(meta["notes"])
    wa = defaultdict(list)
    for d in preds:
        if d.get("decode") == "single_query_workaround":
            wa[d["press"]].append(float(d["ratio"]))
    if wa:
        notes.insert(0, "single_query_workaround decode (ragged per-layer cache after the press; question fed one "
                        "token at a time, every single-query step through kvc_eager_1q) used for: " + "; ".join(
                            f"{p} ({len(v)} runs, ratios {sorted(set(v))})" for p, v in sorted(wa.items())))
    else:
        notes.insert(0, "single_query_workaround decode used for: none (every run decoded by the pipeline)")
    missing = [r for r in planned_rows if r not in rows_done]
    if missing:
        notes.insert(1, f"PARTIAL: {len(rows_done)} of {len(planned_rows)} planned rows have results")
    summary = {
        "tool": TOOL,
        "model": meta["model"],
        "data": meta["data"],
        "rows": rows_done,
        "uncompressed": unc,
        "presses": presses,
        "kv_cache": meta.get("kv_cache", KV_FLOAT),
        "seconds_per_run": sum(d["seconds"] for d in preds) / len(preds) if preds else 0.0,
        "notes": notes,
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def read_predictions(path: Path) -> list[dict]:
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # a run killed mid-write: drop the torn last line
        cut = raw.rfind(b"\n") + 1
        print(f"dropping a torn last line of {path} ({len(raw) - cut} bytes)", flush=True)
        with open(path, "r+b") as f:
            f.truncate(cut)
        raw = raw[:cut]
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


def read_rows(data: str, rows_per_task: int | None) -> tuple[Path, list[dict], list[int]]:
    """The data file's resolved path, its JSONL rows, and the indices of the first
    `rows_per_task` rows of every task in file order (all rows when None)."""
    data_path = Path(data).resolve()
    rows = [json.loads(line) for line in data_path.read_text().splitlines() if line.strip()]
    seen: dict = defaultdict(int)
    selected = []
    for i, r in enumerate(rows):
        if rows_per_task is None or seen[r["task"]] < rows_per_task:
            seen[r["task"]] += 1
            selected.append(i)
    return data_path, rows, selected


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--rows-per-task", type=int, default=None, help="first K rows of each task (file order)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "qwen", "qwen15"])
    ap.add_argument("--quantized-cache", type=int, choices=[2, 4], default=None, metavar="NBITS",
                    help="run every prediction on transformers' QuantizedCache(backend='quanto', nbits=NBITS; "
                         "its defaults: groups of 64 along axis 0, a 128-token full-precision residual) "
                         "as kvpress's README shows; needs `pip install optimum-quanto ninja` and the venv's "
                         "bin on PATH (quanto builds a C++ extension); not with kvcompose")
    a = ap.parse_args()

    presses = [p.strip() for p in a.presses.split(",") if p.strip()]
    for p in presses:
        if p not in PRESSES:
            raise SystemExit(f"unknown press {p!r}; known: {', '.join(PRESSES)}")
    if a.quantized_cache and "kvcompose" in presses:
        # kvpress 0.5.5's KVComposePress rewrites only `layer.keys/values` (on a QuantizedCache: the
        # residual window), leaving the quantized copy of the context and its length untouched
        raise SystemExit("kvcompose does not run on a QuantizedCache in kvpress 0.5.5 (its compression "
                         "rewrites only the full-precision residual): leave it out of --presses")
    ratios = [float(r) for r in a.ratios.split(",") if r.strip()]
    data_path, rows, selected = read_rows(a.data, a.rows_per_task)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    preds = read_predictions(pred_path)
    old = out / "summary.json"
    prev = json.loads(old.read_text()) if old.exists() else None
    kv_cache = (f"transformers QuantizedCache(backend='quanto', nbits={a.quantized_cache}, q_group_size=64, "
                f"residual_length=128, axis_key=0, axis_value=0), optimum-quanto "
                f"{mmf._dist_version('optimum-quanto')}") if a.quantized_cache else KV_FLOAT
    if prev is not None:  # checked before the model loads
        if prev.get("data") != str(data_path):
            raise SystemExit(f"{out} holds results for data {prev.get('data')!r}, not {str(data_path)!r}")
        if prev.get("kv_cache", KV_FLOAT) != kv_cache:
            raise SystemExit(f"{out} holds results for another KV cache ({prev.get('kv_cache', KV_FLOAT)})")
    done = {(d["row"], d["press"], rkey(d["ratio"])) for d in preds}

    model, tok, model_path = load(a.model)
    if prev is not None and prev.get("model") != model_path.name:
        raise SystemExit(f"{out} holds results for another model")
    pipe = make_pipe(model, tok)
    eos = model.generation_config.eos_token_id
    meta = {
        "kv_cache": kv_cache,
        "model": model_path.name,
        "data": str(data_path),
        "presses": presses,
        "notes": [
            f"KV cache: {kv_cache}",
            f"model {model_path.name} dequantized to float32 by transformers {mmf._dist_version('transformers')} "
            f"GGUF loader, patched tokenizer as tools/make_model_fixtures.py; CPU, torch "
            f"{torch.__version__}, 2 threads, attn_implementation sdpa (KVComposePress switches to eager for "
            "its own prefill/scoring pass)",
            "protocol: kvpress KVPressTextGenerationPipeline, one question per context; chat template applied "
            "by the pipeline (context = user message; question + question suffix + answer_prefix fed after "
            f"the prefill at positions T..); greedy argmax, stop at generation_config.eos_token_id={eos} "
            f"({tok.convert_ids_to_tokens(eos) if isinstance(eos, int) else eos}), "
            "max_new_tokens from the row; prediction = pipeline output (skip_special_tokens)",
            "presses at kvpress defaults with compression_ratio set: " + "; ".join(
                f"{p}={PRESSES[p]()!r}".replace("compression_ratio=0.0, ", "").replace("compression_ratio=0, ", "")
                for p in presses),
            "kvpress's evaluate_registry.py uses 'expected_attention' = AdaKVPress(ExpectedAttentionPress("
            "epsilon=1e-2)); here it is plain ExpectedAttentionPress() (kvpress defaults, epsilon=0, no AdaKV)",
            "score: kvpress evaluation/benchmarks/ruler/calculate_metrics.py (repo snapshot, identical at tag "
            "v0.5.4 and at the snapshot HEAD; last changed in 'Refactor evaluation (#96)'): pred -> re.sub('[\\x00-\\x1f]', '', pred.strip()).strip() "
            "(also removes newlines/tabs), qa_*: string_match_part, else string_match_all, case-insensitive "
            "substring; per-task mean rounded to 2 decimals as there; score = mean over tasks",
            "context_tokens = length of the chat-templated context the pipeline prefills",
        ],
    }
    print(f"{len(selected)} rows x (1 + {len(presses)} x {len(ratios)}) runs; "
          f"{len(done)} already in {pred_path}", flush=True)

    f = open(pred_path, "a", encoding="utf-8")
    t_all = time.time()
    for ri in selected:
        row = rows[ri]
        runs = [("none", 0.0)] + [(p, r) for p in presses for r in ratios]
        for pname, ratio in runs:
            if (ri, pname, rkey(ratio)) in done:
                continue
            press = None if pname == "none" else PRESSES[pname](compression_ratio=ratio)
            pipe._kvc.clear()
            t0 = time.perf_counter()
            cache = QuantizedCache("quanto", model.config, nbits=a.quantized_cache) if a.quantized_cache else None
            res = pipe(row["context"], question=row["question"], answer_prefix=row["answer_prefix"],
                       press=press, max_new_tokens=int(row["max_new_tokens"]), cache=cache)
            dt = time.perf_counter() - t0
            pred = res["answer"]
            d = {"row": ri, "task": row["task"], "press": pname, "ratio": float(ratio), "prediction": pred,
                 "score": score_row(row["task"], pred, row["answer"]), "answer": row["answer"],
                 "context_tokens": pipe._kvc["context_tokens"], "seconds": round(dt, 3),
                 "decode": pipe._kvc["decode"]}
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            preds.append(d)
            done.add((ri, pname, rkey(ratio)))
            lo, hi = pipe._kvc.get("cache_lens", (0, 0))
            print(f"row {ri} {row['task']} {pname}@{ratio}: score {d['score']:.1f} {dt:.1f}s "
                  f"T={d['context_tokens']} cache {lo}..{hi} {d['decode']} :: {postprocess(pred)[:100]!r}",
                  flush=True)
        summarize(out, preds, meta, selected)
    f.close()
    summarize(out, preds, meta, selected)
    print(f"done in {time.time() - t_all:.0f}s -> {out}", flush=True)


if __name__ == "__main__":
    main()
