#!/usr/bin/env python3
r"""Run llama.cpp's own server (`llama-server`, built from the llama-cpp-python 0.3.36
sdist's sources) on RULER rows with its KV cache stored as f16, q8_0 or q4_0
(`-ctk/-ctv`), and write the results in the format of tools/kvpress_eval.py, so that

    kvc-bench eval --data ROWS --rows-per-task 1 --kv-dtypes int8 --out KVC_DIR/kv-int8 \
        --report-only --compare DIR/q8_0/summary.json   (plus the kvc run's --model/--presses/--ratios)

prints kvc's scores beside llama.cpp's on the same rows (issue 21: the quantized
KV cache's side by side).

    python3 tools/llamacpp_eval.py --model qwen15 \
        --data ../shared/data/ruler/qwen25_4096_dev.jsonl --rows-per-task 1 \
        --cache-types f16,q8_0,q4_0 --out DIR [--llama-bin DIR_OF_LLAMA_SERVER]

Runs in the kvpress venv (`pip install -r tools/requirements.txt kvpress==0.5.5`): transformers
is used for the tokenizer only, no model weights are loaded by Python. llama-server comes from
`--llama-bin` or `$LLAMA_BIN` (how to build it: the header of tools/bench_weights.sh).

Prompt (kvpress's KVPressTextGenerationPipeline.preprocess, as tools/kvpress_eval.py
runs it): the chat template is applied to `context + separator` as the user message
with the generation prompt; the text before the separator is the context, the text
after it the question suffix; `question + question_suffix + answer_prefix` follows.
Both parts are tokenized by the same patched tokenizer as tools/make_model_fixtures.py
(add_special_tokens=False) and the concatenated ids are sent to llama-server's
`/completion` as a token array, so llama.cpp sees exactly kvpress's and kvc's tokens
(no press: the uncompressed cache, stored in the chosen type).

Decoding: greedy (`temperature` 0, `top_k` 1), `n_predict` = the row's
`max_new_tokens`, llama.cpp stops at its end-of-generation tokens; the generated
token ids (`return_tokens`) are decoded by the same tokenizer with
skip_special_tokens=True. Scoring is tools/kvpress_eval.py's (kvpress
calculate_metrics.py). Every prediction line records llama.cpp's prompt and decode
timings; summary.json's notes record the KV cache bytes llama-server reported.

Server: one `llama-server` per cache type, `-t 2 -tb 2 -np 1 -fa on --no-warmup
-c <longest prompt + max_new_tokens, rounded up to 256> -lv 4` (`-fa on`: llama.cpp
quantizes V only with flash attention; f16 runs with it too, so that the three
differ in storage only), bound to 127.0.0.1 on a free port; the script waits for
`/health` (bounded) and stops the server at the end. Outputs: DIR/<type>/
predictions.jsonl (appended, a rerun skips what is there), DIR/<type>/summary.json,
DIR/<type>/server.log.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402  (the known models' GGUF and reference tokenizer)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")


def prompt_ids(tok, row: dict) -> tuple[list[int], int]:
    """kvpress pipeline.preprocess (kvpress 0.5.5): context ids + question ids, and the context length."""
    context = row["context"]
    separator = "#" * (len(context) + 10)
    text = tok.apply_chat_template([{"role": "user", "content": context + separator}],
                                   add_generation_prompt=True, tokenize=False)
    context, suffix = text.split(separator)
    question = row["question"] + suffix + row["answer_prefix"]
    c = tok.encode(context, add_special_tokens=False)
    q = tok.encode(question, add_special_tokens=False)
    return c + q, len(c)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, bin_dir: Path, gguf: Path, cache_type: str, ctx: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "-c", str(ctx), "-t", "2", "-tb", "2",
                    "-np", "1", "-fa", "on", "-ctk", cache_type, "-ctv", cache_type, "--no-warmup",
                    "--no-webui", "-lv", "4", "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log
        self.log = open(log, "w")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = str(bin_dir) + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        for _ in range(600):  # bounded: 600 x 0.5 s
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"llama-server did not become healthy in 300 s; see {log}")

    def kv_report(self) -> str:
        text = self.log_path.read_text(errors="replace")
        lines = [ln.strip() for ln in text.splitlines() if "llama_kv_cache: size =" in ln]
        return lines[-1].split("llama_kv_cache: ", 1)[1] if lines else "not found in the server log"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def write_summary(ke, out: Path, preds: list[dict], meta: dict, selected: list[int], ct: str) -> dict:
    """tools/kvpress_eval.py's summary.json (what `kvc-bench eval --compare` reads), naming llama.cpp."""
    ke.summarize(out, preds, meta, selected)
    s = json.loads((out / "summary.json").read_text())
    s["tool"] = f"llama.cpp llama-server, KV cache {ct} (-ctk/-ctv)"
    s["kv_cache"] = f"llama.cpp {ct} (-ctk {ct} -ctv {ct})"
    s["notes"] = [n for n in s["notes"] if not n.startswith("single_query_workaround")]
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(s, indent=2) + "\n")
    tmp.replace(out / "summary.json")
    return s


def main() -> None:
    import kvpress_eval as ke  # scoring, summary and resume, shared with the kvpress side (imports torch/kvpress)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache-types", default="f16,q8_0,q4_0", help=f"comma list of {', '.join(CACHE_TYPES)}")
    ap.add_argument("--rows-per-task", type=int, default=None, help="first K rows of each task (file order)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "qwen", "qwen15"])
    ap.add_argument("--llama-bin", default=os.environ.get("LLAMA_BIN"),
                    help="folder holding llama-server (default: $LLAMA_BIN)")
    a = ap.parse_args()

    types_ = [t.strip() for t in a.cache_types.split(",") if t.strip()]
    for t in types_:
        if t not in CACHE_TYPES:
            raise SystemExit(f"unknown cache type {t!r}; known: {', '.join(CACHE_TYPES)}")
    if not a.llama_bin:
        raise SystemExit("give --llama-bin or set LLAMA_BIN: the folder of llama.cpp's llama-server (built from the "
                         "llama-cpp-python 0.3.36 sdist's sources: the header of tools/bench_weights.sh says how)")
    bin_dir = Path(a.llama_bin)
    if not (bin_dir / "llama-server").exists():
        raise SystemExit(f"no llama-server in {bin_dir} (build llama.cpp from the llama-cpp-python 0.3.36 sdist's "
                         "sources: the header of tools/bench_weights.sh says how)")
    version = subprocess.run([str(bin_dir / "llama-server"), "--version"], capture_output=True, text=True,
                             env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir)})
    version = " ".join((version.stdout + version.stderr).split())[:200]

    data_path, rows, selected = ke.read_rows(a.data, a.rows_per_task)

    gguf, tok = bench_common.locate(a.model)
    prompts = {i: prompt_ids(tok, rows[i]) for i in selected}
    longest = max(len(p[0]) + int(rows[i]["max_new_tokens"]) for i, p in prompts.items())
    ctx = (longest + 255) // 256 * 256

    for ct in types_:
        out = Path(a.out) / ct
        out.mkdir(parents=True, exist_ok=True)
        pred_path = out / "predictions.jsonl"
        preds = ke.read_predictions(pred_path)
        old = out / "summary.json"
        if old.exists():
            s = json.loads(old.read_text())
            if s.get("data") != str(data_path) or s.get("model") != gguf.name:
                raise SystemExit(f"{out} holds results for another data file or model")
        done = {d["row"] for d in preds}
        todo = [i for i in selected if i not in done]
        print(f"{ct}: {len(selected)} rows, {len(selected) - len(todo)} already in {pred_path}", flush=True)
        server = None
        meta = {"model": gguf.name, "data": str(data_path), "presses": [], "notes": []}
        try:
            if todo:
                server = Server(bin_dir, gguf, ct, ctx, out / "server.log")
                meta["notes"] = [
                    f"llama.cpp llama-server ({version}), KV cache K and V stored as {ct}: "
                    + " ".join(server.cmd[1:]).replace(str(gguf), gguf.name),
                    f"KV cache from llama-server's log (context {ctx} cells): {server.kv_report()}",
                    "prompt: kvpress pipeline.preprocess's chat-templated context + question + question suffix "
                    "+ answer_prefix, tokenized by the patched tokenizer of tools/make_model_fixtures.py and "
                    "sent as token ids; no press (uncompressed cache)",
                    "decoding: greedy (temperature 0, top_k 1), n_predict = max_new_tokens, stop at llama.cpp's "
                    "end-of-generation tokens; prediction = generated ids decoded with skip_special_tokens",
                    "score: kvpress calculate_metrics.py as in tools/kvpress_eval.py",
                ]
            for ri in todo:
                row = rows[ri]
                ids, n_ctx = prompts[ri]
                t0 = time.perf_counter()
                try:
                    res = post(server.url + "/completion",
                               {"prompt": ids, "n_predict": int(row["max_new_tokens"]), "temperature": 0.0,
                                "top_k": 1, "cache_prompt": False, "return_tokens": True, "stream": False},
                               timeout=3600)
                except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                    detail = e.read().decode(errors="replace")[:300] if isinstance(e, urllib.error.HTTPError) else ""
                    raise SystemExit(f"{ct}: llama-server failed on row {ri} ({len(ids)} prompt tokens): {e} {detail}; "
                                     f"see {out / 'server.log'}")
                dt = time.perf_counter() - t0
                pred = tok.decode(res.get("tokens", []), skip_special_tokens=True)
                tm = res.get("timings", {})
                d = {"row": ri, "task": row["task"], "press": "none", "ratio": 0.0, "prediction": pred,
                     "score": ke.score_row(row["task"], pred, row["answer"]), "answer": row["answer"],
                     "context_tokens": n_ctx, "prompt_tokens": len(ids), "seconds": round(dt, 3),
                     "llama_prompt_ms": tm.get("prompt_ms"), "llama_predicted_n": tm.get("predicted_n"),
                     "llama_predicted_ms": tm.get("predicted_ms"), "cache_type": ct}
                with open(pred_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                preds.append(d)
                print(f"{ct} row {ri} {row['task']}: score {d['score']:.1f} {dt:.1f}s T={len(ids)} "
                      f":: {ke.postprocess(pred)[:100]!r}", flush=True)
                write_summary(ke, out, preds, meta, selected, ct)
        finally:
            if server is not None:
                server.stop()
        if preds:
            if not meta["notes"] and old.exists():
                meta["notes"] = [n for n in json.loads(old.read_text()).get("notes", [])
                                 if not n.startswith(("single_query", "PARTIAL"))]
            s = write_summary(ke, out, preds, meta, selected, ct)
            print(f"{ct}: score {s['uncompressed']['score']:.2f} over {len(s['rows'])} rows -> {out}", flush=True)


if __name__ == "__main__":
    main()
