"""`kvc serve` with the official OpenAI Python client (PyPI `openai`) and plain HTTP.

Starts the real server on 127.0.0.1 with a free port, waits for /health (bounded), creates a
document over plain HTTP, asks a question through the client with and without streaming and
checks the answer against `kvc generate --json` on the same document, token for token (same
text); checks the client's error classes on bad input. The server is killed at the end, also
when a check fails.

Run: python client_test.py [path/to/kvc]   (default: target/release/kvc). `.ci/run` runs it in a
venv with a pinned `openai`.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import openai

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
KVC = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "kvc")
KEY = "client-test-key"
QUESTION = "Who has taken Netherfield Park?"
MAX_TOKENS = 12


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port, method, path, body=None, key=KEY):
    """(status, parsed JSON body) of one plain HTTP request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_healthy(server, port, seconds=180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kvc serve exited with {server.returncode}")
        try:
            if http(port, "GET", "/health", key=None)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"kvc serve not healthy after {seconds} s")


def start_server(work):
    """`kvc serve` with the API key on a free loopback port, healthy: (process, port, log file)."""
    port = free_port()
    log = open(os.path.join(work, "serve.log"), "w")
    server = subprocess.Popen([KVC, "serve", "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY],
                              stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_healthy(server, port)
    except BaseException:
        server.kill()
        server.wait(timeout=60)
        log.close()
        raise
    return server, port, log


def document_text():
    """About 500 tokens of the asset, cut at a line end (as the Rust test's first document)."""
    with open(os.path.join(ROOT, "assets", "pride_and_prejudice_ch1-2.txt"), encoding="utf-8") as f:
        text = ""
        for line in f.read().splitlines():
            text += line + "\n"
            if len(text) > 1800:
                return text
    return text


def reference(path):
    out = subprocess.run(
        [KVC, "generate", "--prompt-file", path, "--question", QUESTION, "--press", "kvcompose", "--ratio", "0.5",
         "--chat", "--max-new-tokens", str(MAX_TOKENS), "--json"],
        check=True, capture_output=True, timeout=600)
    return json.loads(out.stdout)


def expect_error(cls, call):
    try:
        call()
    except cls as e:
        body = e.body if isinstance(e.body, dict) else {}
        assert "message" in body, f"{cls.__name__} without an OpenAI error body: {e.body!r}"
        return
    raise AssertionError(f"expected {cls.__name__}")


def main():
    work = tempfile.mkdtemp(prefix="kvc-client-test-")
    doc_file = os.path.join(work, "doc.txt")
    text = document_text()
    with open(doc_file, "w", encoding="utf-8") as f:
        f.write(text)
    ref = reference(doc_file)
    server, port, log = start_server(work)
    try:
        status, doc = http(port, "POST", "/v1/documents", {"text": text})
        assert status == 201 and doc["status"] == "ready", doc
        assert doc["tokens"] == ref["context_tokens"], (doc, ref["context_tokens"])
        assert doc["kv_bytes"] == ref["kv_cache_bytes_compressed"], doc

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=300)
        models = client.models.list()
        assert len(models.data) == 1, models

        messages = [{"role": "user", "content": QUESTION}]
        r = client.chat.completions.create(model="kvc", messages=messages, max_tokens=MAX_TOKENS,
                                           extra_body={"document": doc["id"]})
        assert r.choices[0].message.content == ref["completion"], (r.choices[0].message.content, ref["completion"])
        assert r.usage.prompt_tokens_details.cached_tokens == ref["context_tokens"], r.usage
        assert r.usage.completion_tokens == ref["new_tokens"], r.usage

        stream = client.chat.completions.create(model="kvc", messages=messages, max_completion_tokens=MAX_TOKENS,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"document": doc["id"]})
        pieces, usage, finish = [], None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    pieces.append(c.delta.content)
                finish = c.finish_reason or finish
        assert "".join(pieces) == ref["completion"], ("".join(pieces), ref["completion"])
        assert finish in ("stop", "length") and usage.completion_tokens == ref["new_tokens"], (finish, usage)

        # the client's error classes on bad input; the server answers after
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0, timeout=60)
        expect_error(openai.AuthenticationError, lambda: bad.models.list())
        expect_error(openai.NotFoundError, lambda: client.chat.completions.create(
            model="kvc", messages=messages, max_tokens=4, extra_body={"document": "0" * 32}))
        expect_error(openai.BadRequestError, lambda: client.chat.completions.create(
            model="kvc", messages=messages, max_tokens=0))
        expect_error(openai.BadRequestError, lambda: client.chat.completions.create(model="kvc", messages=[], max_tokens=4))
        expect_error(openai.BadRequestError, lambda: client.chat.completions.create(
            model="kvc", messages=messages, max_tokens=4, extra_body={"document": "../" * 11}))
        plain = client.chat.completions.create(model="kvc", messages=[{"role": "user", "content": "Say hello."}], max_tokens=4)
        assert plain.usage.prompt_tokens_details.cached_tokens == 0 and plain.choices[0].message.content, plain
        print("client_test.py: ok (openai", openai.__version__ + ")")
    finally:
        server.kill()
        server.wait(timeout=60)
        log.close()


if __name__ == "__main__":
    main()
