#!/usr/bin/env python3
"""Serving benchmark: K documents of N tokens, C concurrent clients asking Q questions each about
random documents, against `kvc serve` (documents stored once as compressed caches) and llama.cpp's
`llama-server` (the document sent in every prompt; its prompt cache reuses a slot's prefix).

    python3 tools/serve_bench.py --kvc target/release/kvc [--llama-server PATH] \
        [--docs 8] [--doc-chars 4000] [--clients 4] [--questions 4] [--max-tokens 16]

Standard library only (HTTP over urllib, threads). Servers run on 127.0.0.1 with free ports and are
killed at the end; every wait is bounded. Prints one JSON line per server: questions/s, time to
first token p50 / p99 (streamed), generated tokens/s, the server's peak RSS (VmHWM), and the time
spent storing the documents (kvc only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import threading
import time
import urllib.request

QUESTIONS = [
    "Who is mentioned first in this text?",
    "Summarize the text in one sentence.",
    "What place is named in the text?",
    "What does the text say about money?",
]


class _Skip(Exception):
    """`--only-llama`: the kvc side is skipped."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:
        return 0, b""


def wait_healthy(port: int, proc: subprocess.Popen, limit: float = 300) -> None:
    start = time.time()
    while time.time() - start < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if get(port, "/health")[0] == 200:
            return
        time.sleep(0.2)
    raise RuntimeError("server not healthy in time")


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def ask_streamed(port: int, body: dict) -> tuple[float, int]:
    """Time to the first content chunk (s) and the number of content chunks."""
    body = dict(body, stream=True)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start = time.time()
    first, chunks = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            delta = json.loads(line[5:])["choices"][0].get("delta", {}).get("content")
            if delta:
                chunks += 1
                if first is None:
                    first = time.time() - start
    return (first if first is not None else time.time() - start), chunks


def workload(port: int, make_body, docs: int, clients: int, questions: int, seed: int) -> dict:
    rng = random.Random(seed)
    plan = [[(rng.randrange(docs), rng.choice(QUESTIONS)) for _ in range(questions)] for _ in range(clients)]
    ttft: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def client(items):
        for d, q in items:
            try:
                t, n = ask_streamed(port, make_body(d, q))
            except Exception as e:  # noqa: BLE001 - reported, counted
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                ttft.append(t)
                tokens[0] += n

    start = time.time()
    threads = [threading.Thread(target=client, args=(p,)) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3600)
    wall = time.time() - start
    ttft.sort()
    pick = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else None  # noqa: E731
    return {"questions": len(ttft), "errors": errors[:3], "wall_s": wall, "questions_per_s": len(ttft) / wall,
            "ttft_p50_s": pick(0.5), "ttft_p99_s": pick(0.99), "generated_tokens_per_s": tokens[0] / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvc", required=True)
    ap.add_argument("--llama-server")
    ap.add_argument("--text", default="assets/pride_and_prejudice_ch1-2.txt")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-chars", type=int, default=4000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only-llama", action="store_true", help="skip kvc serve (re-run the llama-server side)")
    a = ap.parse_args()
    text = open(a.text).read()
    # K different documents: windows of the text at different offsets
    step = max(1, (len(text) - a.doc_chars) // max(1, a.docs))
    docs = [text[i * step:i * step + a.doc_chars] for i in range(a.docs)]

    port = free_port()
    proc = None if a.only_llama else subprocess.Popen([a.kvc, "serve", "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(a.clients)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if proc is None:
            raise SystemExit(0) if not a.llama_server else _Skip()
        wait_healthy(port, proc)
        start = time.time()
        ids = []
        for d in docs:
            doc = post(port, "/v1/documents", {"text": d})
            for _ in range(3000):
                if doc["status"] == "ready":
                    break
                time.sleep(0.2)
                doc = json.loads(get(port, f"/v1/documents/{doc['id']}")[1])
            ids.append((doc["id"], doc["tokens"], doc["kv_bytes"], doc["kv_bytes_uncompressed"]))
        store = time.time() - start
        body = lambda d, q: {"model": "kvc", "document": ids[d][0], "messages": [{"role": "user", "content": q}], "max_tokens": a.max_tokens}  # noqa: E731
        r = workload(port, body, a.docs, a.clients, a.questions, a.seed)
        r.update(server="kvc serve (KVCompose 0.5)", store_documents_s=store, doc_tokens=[i[1] for i in ids],
                 kv_bytes=sum(i[2] for i in ids), kv_bytes_uncompressed=sum(i[3] for i in ids), peak_rss=peak_rss(proc.pid))
        print(json.dumps(r), flush=True)
    except _Skip:
        pass
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()

    if a.llama_server:
        port = free_port()
        gguf = os.path.join(os.environ.get("KVC_CACHE", os.path.expanduser("~/.cache/kvc")), "SmolLM2-135M-Instruct.Q4_1.gguf")
        proc = subprocess.Popen([a.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(a.clients),
                                 "-c", str(a.clients * 8192), "-t", str(a.threads), "--no-webui"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(port, proc)
            # the document and the question in one user message, as `kvc serve` splits them
            body = lambda d, q: {"messages": [{"role": "user", "content": docs[d] + q}], "max_tokens": a.max_tokens, "temperature": 0, "cache_prompt": True}  # noqa: E731
            r = workload(port, body, a.docs, a.clients, a.questions, a.seed)
            r.update(server=f"llama-server -np {a.clients} (f16 cache, prompt cache on)", peak_rss=peak_rss(proc.pid))
            print(json.dumps(r), flush=True)
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
