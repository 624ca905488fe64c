"""`kvc serve`'s page (`GET /`) in headless Chromium, driven by Playwright as a user would.

Starts the real server on 127.0.0.1 with a free port (with an API key, typed into the page),
opens the page, pastes a document into the textarea, picks the int8 KV cache and clicks Add: the
page must show the document's compression (tokens, KV bytes before -> after, the KV format, one
bar per layer), the same figures as the API's `GET /v1/documents/{id}`. Then types a question and clicks Ask: the streamed answer must
appear and equal the non-streamed answer of `/v1/chat/completions` on the same document and
question. Every wait is bounded; the server and the browser are closed at the end, also when a
check fails.

Run: python page_test.py [path/to/kvc] [--screenshot FILE.png]
Needs `playwright` (PyPI; no browser download: it drives the system's Chromium, `$CHROMIUM` or
/usr/bin/chromium, Debian's package `chromium`) and `openai` (for client_test's helpers). `.ci/run`
runs it in the same venv as client_test.py.
"""

import os
import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

# `--screenshot FILE` is taken out of argv before client_test reads argv[1] (the kvc binary)
SCREENSHOT = None
if "--screenshot" in sys.argv:
    i = sys.argv.index("--screenshot")
    SCREENSHOT = sys.argv[i + 1]
    del sys.argv[i:i + 2]

from client_test import KEY, QUESTION, document_text, http, start_server  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
MAX_TOKENS = 24
WAIT_MS = 120_000  # at most for a document to be added, or an answer to end


def main():
    work = tempfile.mkdtemp(prefix="kvc-page-test-")
    text = document_text()
    server, port, log = start_server(work)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, timeout=60_000,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                run_page(browser, port, text)
            finally:
                browser.close()
        print("page_test.py: ok (Chromium", browser.version + ")")
    except BaseException:
        log.flush()
        with open(os.path.join(work, "serve.log"), encoding="utf-8", errors="replace") as f:
            sys.stderr.write("server log (tail):\n" + f.read()[-4000:] + "\n")
        raise
    finally:
        server.kill()
        server.wait(timeout=60)
        log.close()


def run_page(browser, port, text):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(WAIT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{port}/")
    assert page.title() == "kvc serve", page.title()

    # add a document: the page shows its compression, as the API describes it
    page.fill("#key", KEY)
    page.fill("#text", text)
    page.select_option("#kvDtype", "int8")  # the cache stored as int8 codes (the server's default: float)
    page.click("#add")
    page.wait_for_function("document.getElementById('addStatus').textContent.startsWith('added ')"
                           " && document.querySelectorAll('#chart div').length > 0")
    status, listing = http(port, "GET", "/v1/documents")
    assert status == 200 and len(listing["data"]) == 1, listing
    doc = listing["data"][0]
    assert doc["status"] == "ready" and doc["kv_dtype"] == "int8", doc
    detail = page.inner_text("#detail")
    assert f"Document {doc['id']}: {doc['tokens']} tokens" in detail, (detail, doc)
    saved = 100 * (1 - doc["kv_bytes"] / doc["kv_bytes_uncompressed"])
    assert f"({saved:.1f}% saved, stored as int8)" in detail and 0 < saved < 100, (detail, doc)
    assert page.locator("#chart div").count() == len(doc["kept_per_layer"]), doc
    row = [c.strip() for c in page.locator("#docs tr.selected td").all_inner_texts()]
    assert row[0] == doc["id"][:8] + "…" and row[1] == str(doc["tokens"]) and row[5] == "int8" and row[6] == "ready", row

    # ask: the streamed answer appears in the page and equals the API's (non-streamed) answer
    status, r = http(port, "POST", "/v1/chat/completions",
                     {"model": "kvc", "document": doc["id"], "max_tokens": MAX_TOKENS,
                      "messages": [{"role": "user", "content": QUESTION}]})
    assert status == 200, r
    expected = r["choices"][0]["message"]["content"]
    assert expected.strip(), r
    page.fill("#question", QUESTION)
    page.fill("#maxTokens", str(MAX_TOKENS))
    page.click("#ask")
    page.wait_for_function("document.getElementById('askStatus').textContent === 'done'"
                           " || document.getElementById('answer').className === 'error'")
    # the text no longer changes (bounded: 20 polls)
    answer, last = page.text_content("#answer"), None
    for _ in range(20):
        if answer == last:
            break
        time.sleep(0.1)
        answer, last = page.text_content("#answer"), answer
    assert page.get_attribute("#answer", "class") != "error", answer
    assert answer == expected, (answer, expected)
    assert not errors, errors

    if SCREENSHOT:
        page.eval_on_selector("#text", "e => { e.scrollTop = 0; }")  # the document's beginning
        page.screenshot(path=SCREENSHOT, full_page=True)
        print("screenshot:", SCREENSHOT)


if __name__ == "__main__":
    main()
