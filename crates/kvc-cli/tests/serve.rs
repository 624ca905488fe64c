//! `kvc serve` end to end: the real binary started on 127.0.0.1 with a free port, spoken to over
//! plain HTTP/1.1 (a small client on `std::net::TcpStream` below: no HTTP dependency for the
//! tests), on the default model. Answers are compared with `kvc generate --json` on the same
//! document, token for token. Every wait is bounded; a server is killed when its guard drops
//! (also when a test fails).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Servers of different tests would share the 2 cores of CI: one at a time.
static ONE_SERVER: Mutex<()> = Mutex::new(());

const KEY: &str = "test-key-123";
const Q1: &str = "Who has taken Netherfield Park?";
const Q2: &str = "What does Mrs. Bennet want?";
const Q3: &str = "How many daughters do the Bennets have?";
const Q4: &str = "Who is Mr. Bennet?";
/// The questions of the concurrent clients, on every document.
const QUESTIONS: [&str; 4] = [Q1, Q2, Q3, Q4];
const MAX_TOKENS: usize = 12;

/// A `kvc serve` process; killed on drop.
struct Server {
    child: Child,
    port: u16,
    key: Option<&'static str>,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of the server's stderr so far (for failure messages).
fn log_of(s: &Server) -> String {
    std::fs::read_to_string(&s.log).unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `kvc serve` with `args` on a free loopback port and waits (at most 3 minutes) for
/// `/health` to answer 200.
fn start(args: &[&str], key: Option<&'static str>, log_dir: &Path) -> Server {
    let port = free_port();
    let log = log_dir.join(format!("serve-{port}.log"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvc"));
    cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()]).args(args);
    if let Some(k) = key {
        cmd.args(["--api-key", k]);
    }
    let child = cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().expect("start kvc serve");
    let mut server = Server { child, port, key, log };
    let start = Instant::now();
    for _ in 0..1800 {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("kvc serve exited with {status}: {}", log_of(&server));
        }
        match try_http(port, "GET", "/health", &[], None) {
            Ok((200, _, _)) => return server,
            Ok((503, _, body)) => {
                assert!(String::from_utf8_lossy(&body).contains("\"error\""), "503 in OpenAI's shape");
            }
            _ => {}
        }
        assert!(start.elapsed() < Duration::from_secs(180), "kvc serve not healthy after 3 minutes: {}", log_of(&server));
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("kvc serve not healthy: {}", log_of(&server));
}

/// Status, headers (lowercase names), body.
type Reply = (u16, Vec<(String, String)>, Vec<u8>);

/// One HTTP/1.1 exchange on a new connection (`Connection: close`): status, headers (lowercase
/// names), body (chunked transfer decoded).
fn try_http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes())?;
    // a server may answer (413) before reading the whole body and close: keep what it sent
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<Reply> {
    let bad = |m: &str| std::io::Error::other(m.to_string());
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).ok_or_else(|| bad("no status"))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let mut body = raw[end + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        let (mut out, mut rest) = (Vec::new(), body.as_slice());
        for _ in 0..1_000_000 {
            let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") else { break };
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16).map_err(|_| bad("chunk size"))?;
            if size == 0 {
                break;
            }
            let start = nl + 2;
            out.extend_from_slice(rest.get(start..start + size).ok_or_else(|| bad("short chunk"))?);
            rest = rest.get(start + size + 2..).unwrap_or_default();
        }
        body = out;
    }
    Ok((status, headers, body))
}

fn auth(s: &Server) -> Vec<(&'static str, String)> {
    s.key.map(|k| vec![("Authorization", format!("Bearer {k}"))]).unwrap_or_default()
}

/// A request with the server's key; status, headers and the body as JSON (`Value::Null` when it
/// is not JSON).
fn call(s: &Server, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<(String, String)>, Value, Vec<u8>) {
    let a = auth(s);
    let headers: Vec<(&str, &str)> = a.iter().map(|(k, v)| (*k, v.as_str())).chain([("Content-Type", "application/json")]).collect();
    let (status, h, raw) = try_http(s.port, method, path, &headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}; log: {}", log_of(s)));
    (status, h, serde_json::from_slice(&raw).unwrap_or(Value::Null), raw)
}

fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, v, _) = call(s, "POST", path, Some(body.to_string().as_bytes()));
    (status, v)
}

fn get(s: &Server, path: &str) -> (u16, Value) {
    let (status, _, v, _) = call(s, "GET", path, None);
    (status, v)
}

fn create_document(s: &Server, text: &str) -> Value {
    let (status, doc) = post(s, "/v1/documents", &json!({ "text": text }));
    assert_eq!(status, 201, "{doc}; log: {}", log_of(s));
    assert_eq!(doc["status"], "ready", "{doc}");
    assert_eq!(doc["id"].as_str().map(str::len), Some(32), "{doc}");
    doc
}

fn ask_body(doc: &str, question: &str, stream: bool) -> Value {
    json!({ "model": "kvc", "document": doc, "messages": [{ "role": "user", "content": question }], "max_tokens": MAX_TOKENS, "stream": stream })
}

/// (completion ids, text) of a non-streamed answer.
fn ask(s: &Server, doc: &str, question: &str) -> (Vec<u64>, String, Value) {
    let (status, v) = post(s, "/v1/chat/completions", &ask_body(doc, question, false));
    assert_eq!(status, 200, "{v}; log: {}", log_of(s));
    let ids = v["kvc"]["completion_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    (ids, v["choices"][0]["message"]["content"].as_str().unwrap().to_string(), v)
}

/// The text of a streamed answer, checking the events' shape: chunks, a finish reason, `[DONE]`
/// last.
fn ask_streamed(s: &Server, doc: &str, question: &str) -> String {
    let (status, headers, _, raw) = call(s, "POST", "/v1/chat/completions", Some(ask_body(doc, question, true).to_string().as_bytes()));
    let text = String::from_utf8_lossy(&raw).to_string();
    assert_eq!(status, 200, "{text}");
    assert!(headers.iter().any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")), "{headers:?}");
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let mut answer = String::new();
    let mut finish = None;
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}"));
        assert_eq!(chunk["object"], "chat.completion.chunk", "{d}");
        if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
            answer.push_str(c);
        }
        if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert!(finish.is_some(), "no finish_reason: {text}");
    answer
}

/// `kvc generate --json` on `text` with the questions, the server's default press and --chat:
/// context tokens, compressed bytes, kept tokens per layer, and (ids, text) per question.
fn reference(text_file: &Path, questions: &[&str]) -> (Value, Vec<(Vec<u64>, String)>) {
    reference_with(text_file, questions, &[])
}

/// [`reference`] with more arguments for `kvc generate` (`extra`).
fn reference_with(text_file: &Path, questions: &[&str], extra: &[&str]) -> (Value, Vec<(Vec<u64>, String)>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvc"));
    cmd.args(["generate", "--prompt-file"]).arg(text_file);
    for q in questions {
        cmd.args(["--question", q]);
    }
    cmd.args(["--press", "kvcompose", "--ratio", "0.5", "--chat", "--max-new-tokens", &MAX_TOKENS.to_string(), "--json"]).args(extra);
    let out = cmd.output().expect("run kvc generate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let answers = v["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect(), a["text"].as_str().unwrap().to_string()))
        .collect();
    (v, answers)
}

/// Two short documents (~500 tokens each) cut from the asset at line ends.
fn documents() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/pride_and_prejudice_ch1-2.txt")).unwrap();
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        current.push_str(line);
        current.push('\n');
        if current.len() > 1800 {
            docs.push(std::mem::take(&mut current));
        }
    }
    docs
}

fn assert_error(status: u16, expected: u16, v: &Value, what: &str) {
    assert_eq!(status, expected, "{what}: {v}");
    assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string(), "{what}: not an OpenAI error: {v}");
}

#[test]
fn serve_answers_as_kvc_generate_and_refuses_bad_input() {
    let _one = ONE_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let docs = documents();
    let mut refs = Vec::new();
    for (i, d) in docs[..3].iter().enumerate() {
        let f = dir.path().join(format!("doc{i}.txt"));
        std::fs::write(&f, d).unwrap();
        refs.push(reference(&f, &QUESTIONS));
    }
    let s = start(&["--max-body", "1MiB", "--max-batch", "8"], Some(KEY), dir.path());

    // documents: compressed once, as kvc generate compresses them
    let mut ids = Vec::new();
    for (d, (r, _)) in docs.iter().zip(&refs) {
        let doc = create_document(&s, d);
        assert_eq!(doc["tokens"], r["context_tokens"], "{doc}");
        assert_eq!(doc["kv_bytes"], r["kv_cache_bytes_compressed"], "{doc}");
        assert_eq!(doc["kv_bytes_uncompressed"], r["kv_cache_bytes_context"], "{doc}");
        assert_eq!(doc["kept_per_layer"], r["press"]["kept_per_layer"], "{doc}");
        assert_eq!(doc["press"]["name"], "kvcompose", "{doc}");
        ids.push(doc["id"].as_str().unwrap().to_string());
    }
    let (status, list) = get(&s, "/v1/documents");
    assert_eq!(status, 200);
    assert_eq!(list["data"].as_array().map(Vec::len), Some(3), "{list}");
    let (status, one) = get(&s, &format!("/v1/documents/{}", ids[0]));
    assert_eq!((status, &one["status"]), (200, &json!("ready")), "{one}");

    // answers: token for token kvc generate's, streamed or not
    let (answer_ids, text, v) = ask(&s, &ids[0], Q1);
    assert_eq!((answer_ids, text.clone()), refs[0].1[0], "{v}");
    let usage = &v["usage"];
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], refs[0].0["context_tokens"], "{v}");
    assert_eq!(usage["prompt_tokens"], refs[0].0["prompt_tokens"], "{v}");
    assert_eq!(usage["completion_tokens"].as_u64(), Some(refs[0].1[0].0.len() as u64), "{v}");
    assert_eq!(ask_streamed(&s, &ids[0], Q1), text);
    // a prompt that begins with a stored document's text reads that document's cache
    let (status, v) = post(&s, "/v1/chat/completions", &json!({ "messages": [{ "role": "user", "content": format!("{}{Q1}", docs[0]) }], "max_tokens": MAX_TOKENS }));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], json!(text), "{v}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], refs[0].0["context_tokens"], "{v}");
    // plain chat: no cached tokens
    let (status, v) = post(&s, "/v1/chat/completions", &json!({ "messages": [{ "role": "user", "content": "What is the capital of France?" }], "max_tokens": 4 }));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 5, "{v}");

    // 8 concurrent clients x 4 questions over 3 documents (every client starts at another
    // question; half of them stream): each answer equals its sequential one, and the engine fed
    // more than one answer in one batched step
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|c| {
                let (s, ids, refs) = (&s, &ids, &refs);
                scope.spawn(move || {
                    let d = c % 3;
                    for i in 0..QUESTIONS.len() {
                        let q = (i + c) % QUESTIONS.len();
                        if c % 2 == 0 {
                            let (got, text, _) = ask(s, &ids[d], QUESTIONS[q]);
                            assert_eq!((got, text), refs[d].1[q], "client {c}, document {d}, question {q}");
                        } else {
                            assert_eq!(ask_streamed(s, &ids[d], QUESTIONS[q]), refs[d].1[q].1, "client {c}, document {d}, question {q}");
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a client failed");
        }
    });
    let (st, _, _, raw) = call(&s, "GET", "/metrics", None);
    let metrics = String::from_utf8_lossy(&raw).to_string();
    let batch_max: usize = metrics.lines().find_map(|l| l.strip_prefix("kvc_batch_size_max ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    assert!(st == 200 && (2..=8).contains(&batch_max), "kvc_batch_size_max {batch_max}: answers not batched (--max-batch 8)\n{metrics}");

    // bad input: the right status, an OpenAI error, and the server answers after
    let chat = |body: &[u8]| {
        let (status, _, v, _) = call(&s, "POST", "/v1/chat/completions", Some(body));
        (status, v)
    };
    let (st, v) = chat(b"{\"messages\": [");
    assert_error(st, 400, &v, "malformed JSON");
    let (st, v) = chat(br#"{"messages": "hello"}"#);
    assert_error(st, 400, &v, "wrong type");
    let (st, v) = chat(br#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}"#);
    assert_error(st, 400, &v, "wrong type of max_tokens");
    let (st, v) = chat(br#"{"messages": []}"#);
    assert_error(st, 400, &v, "empty messages");
    assert_eq!(v["error"]["param"], "messages", "{v}");
    let (st, v) = chat(br#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}"#);
    assert_error(st, 400, &v, "max_tokens 0");
    assert_eq!(v["error"]["param"], "max_tokens", "{v}");
    let (st, v) = chat(br#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000000}"#);
    assert_error(st, 400, &v, "max_tokens above the window");
    assert_eq!((&v["error"]["code"], &v["error"]["param"]), (&json!("context_length_exceeded"), &json!("max_tokens")), "{v}");
    let (st, v) = chat(br#"{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}"#);
    assert_error(st, 400, &v, "top_p 0");
    assert_eq!(v["error"]["param"], "top_p", "{v}");
    let (st, v) = chat(br#"{"document": "00000000000000000000000000000000", "messages": [{"role": "user", "content": "hi"}]}"#);
    assert_error(st, 404, &v, "unknown document");
    assert_eq!(v["error"]["param"], "document", "{v}");
    let (st, v) = chat(br#"{"document": "../../../../etc/passwd", "messages": [{"role": "user", "content": "hi"}]}"#);
    assert_error(st, 400, &v, "document id with ../");
    assert_eq!(v["error"]["param"], "document", "{v}");
    let (st, _, v, _) = call(&s, "GET", "/v1/documents/..%2F..%2F..%2Fetc%2Fpasswd", None);
    assert_error(st, 400, &v, "document id with ../ in the path");
    let (st, _, v, _) = call(&s, "DELETE", "/v1/documents/ffffffffffffffffffffffffffffffff", None);
    assert_error(st, 404, &v, "deleting an unknown document");
    let (st, v) = post(&s, "/v1/documents", &json!({ "text": 42 }));
    assert_error(st, 400, &v, "document of the wrong type");
    let (st, v) = post(&s, "/v1/documents", &json!({ "text": "some text", "press": "nopress", "ratio": 0.5 }));
    assert_error(st, 400, &v, "unknown press");
    let big = vec![b'a'; 2 << 20];
    let (st, _, v, _) = call(&s, "POST", "/v1/documents", Some(&big));
    assert_error(st, 413, &v, "oversized body");
    let (st, _, raw) = try_http(s.port, "GET", "/v1/models", &[], None).unwrap();
    assert_error(st, 401, &serde_json::from_slice(&raw).unwrap(), "missing API key");
    let (st, _, raw) = try_http(s.port, "GET", "/v1/documents", &[("Authorization", "Bearer wrong")], None).unwrap();
    assert_error(st, 401, &serde_json::from_slice(&raw).unwrap(), "wrong API key");
    let (st, v) = get(&s, "/v1/models");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"][0]["object"], "model", "{v}");

    // delete
    let (st, _, v, _) = call(&s, "DELETE", &format!("/v1/documents/{}", ids[1]), None);
    assert_eq!((st, &v["deleted"]), (200, &json!(true)), "{v}");
    assert_eq!(get(&s, &format!("/v1/documents/{}", ids[1])).0, 404);
    let (st, v) = post(&s, "/v1/chat/completions", &ask_body(&ids[1], Q1, false));
    assert_error(st, 404, &v, "a deleted document");

    // still healthy, still answering the same; the metrics saw it all
    assert_eq!(try_http(s.port, "GET", "/health", &[], None).unwrap().0, 200);
    assert_eq!(ask(&s, &ids[0], Q1).1, text);
    let (st, _, _, raw) = call(&s, "GET", "/metrics", None);
    let metrics = String::from_utf8_lossy(&raw);
    assert_eq!(st, 200);
    for needle in ["kvc_requests_total{route=\"/v1/chat/completions\",status=\"200\"}", "kvc_requests_total{route=\"/v1/documents\",status=\"413\"}", "kvc_cache_hits_total ", "kvc_time_to_first_token_seconds_count", "kvc_documents{tier=\"memory\"} 2"] {
        assert!(metrics.contains(needle), "{needle} missing in\n{metrics}");
    }
    let (st, _, _, raw) = call(&s, "GET", "/", None);
    assert!(st == 200 && String::from_utf8_lossy(&raw).contains("<html"), "the page");
}

/// The ids of the documents a server lists, with their `in_memory` flags.
fn listed(s: &Server) -> Vec<(String, bool)> {
    let (status, list) = get(s, "/v1/documents");
    assert_eq!(status, 200, "{list}");
    list["data"].as_array().unwrap().iter().map(|d| (d["id"].as_str().unwrap().to_string(), d["in_memory"] == json!(true))).collect()
}

fn in_memory(s: &Server, id: &str) -> bool {
    listed(s).iter().find(|(i, _)| i == id).unwrap_or_else(|| panic!("{id} not listed")).1
}

/// The value of a metric line `name value`.
fn metric(s: &Server, name: &str) -> f64 {
    let (_, _, _, raw) = call(s, "GET", "/metrics", None);
    let text = String::from_utf8_lossy(&raw).to_string();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn serve_keeps_documents_on_disk_across_eviction_restart_and_kill() {
    let _one = ONE_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let cache = cache_dir.to_str().unwrap();
    let docs = documents();
    // two compressed documents (~12 MiB each) fit, three do not
    let limit = 28usize << 20;
    let s = start(&["--cache-dir", cache, "--cache-memory", "28MiB", "--max-batch", "1", "--max-queue", "0"], None, dir.path());
    let mut ids = Vec::new();
    let mut answers = Vec::new();
    for d in &docs[..3] {
        let doc = create_document(&s, d);
        let id = doc["id"].as_str().unwrap().to_string();
        let bytes = doc["kv_bytes"].as_u64().unwrap() as usize;
        assert!(bytes > limit / 3 && bytes <= limit / 2, "the test needs documents of a third to half of --cache-memory: {doc}");
        answers.push(ask(&s, &id, Q1).1);
        ids.push(id);
    }
    // the third evicted the least recently used, the first: on disk only
    assert!(!in_memory(&s, &ids[0]) && in_memory(&s, &ids[1]) && in_memory(&s, &ids[2]), "{:?}", listed(&s));
    assert_eq!(metric(&s, "kvc_cache_evictions_total"), 1.0);
    assert_eq!(ask(&s, &ids[0], Q1).1, answers[0], "read back from disk");
    assert_eq!(metric(&s, "kvc_cache_disk_loads_total"), 1.0);
    assert!(in_memory(&s, &ids[0]) && !in_memory(&s, &ids[1]), "{:?}", listed(&s));

    // --max-batch 1 --max-queue 0: a second answer while one streams gets 429; the streaming
    // client going away cancels its answer and frees the place
    let long = json!({ "messages": [{ "role": "user", "content": "Count from 1 to 500, separated by commas." }], "max_tokens": 400, "stream": true });
    let mut streaming = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    streaming.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = long.to_string();
    write!(streaming, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..1000 {
        let n = streaming.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).matches("data: ").count() >= 3 {
            break;
        }
    }
    let (status, headers, v, _) = call(&s, "POST", "/v1/chat/completions", Some(ask_body(&ids[1], Q1, false).to_string().as_bytes()));
    assert_error(status, 429, &v, "a full queue");
    assert!(headers.iter().any(|(k, _)| k == "retry-after"), "{headers:?}");
    drop(streaming);
    let start_wait = Instant::now();
    while metric(&s, "kvc_cancelled_total") < 1.0 {
        assert!(start_wait.elapsed() < Duration::from_secs(60), "the answer of a client that went away was not cancelled");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ask(&s, &ids[1], Q1).1, answers[1], "the place is free again");
    drop(s);

    // a document whose cache was cut short, and a leftover of an interrupted write: never listed
    let damaged = "0123456789abcdef0123456789abcdef";
    let kvc = std::fs::read(cache_dir.join(format!("{}.kvc", ids[0]))).unwrap();
    std::fs::write(cache_dir.join(format!("{damaged}.kvc")), &kvc[..kvc.len() / 2]).unwrap();
    let meta = std::fs::read_to_string(cache_dir.join(format!("{}.json", ids[0]))).unwrap().replace(&ids[0], damaged);
    std::fs::write(cache_dir.join(format!("{damaged}.json")), meta).unwrap();
    std::fs::write(cache_dir.join(format!("{}.kvc.partial", "fedcba9876543210fedcba9876543210")), &kvc[..100]).unwrap();

    // restart: every document found, answered the same
    let s = start(&["--cache-dir", cache], None, dir.path());
    let mut found: Vec<String> = listed(&s).into_iter().map(|(id, _)| id).collect();
    found.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(found, expected, "{}", log_of(&s));
    for (id, answer) in ids.iter().zip(&answers) {
        assert_eq!(&ask(&s, id, Q1).1, answer);
    }
    assert!(!cache_dir.join(format!("{damaged}.kvc")).exists(), "the damaged document's files are removed");

    // kill -9 while a new document is being written: after a restart it is whole or absent
    let before: Vec<String> = std::fs::read_dir(&cache_dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let port = s.port;
    let text = format!("{}{}", docs[3], docs[1]);
    let poster = std::thread::spawn(move || try_http(port, "POST", "/v1/documents", &[], Some(json!({ "text": text }).to_string().as_bytes())));
    let waited = Instant::now();
    loop {
        let now: Vec<String> = std::fs::read_dir(&cache_dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        if now.iter().any(|n| !before.contains(n)) || waited.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut s = s;
    s.child.kill().unwrap(); // SIGKILL
    let _ = s.child.wait();
    let _ = poster.join();
    drop(s);
    let s = start(&["--cache-dir", cache], None, dir.path());
    let now = listed(&s);
    for id in &ids {
        assert!(now.iter().any(|(i, _)| i == id), "{id} lost");
    }
    for (id, _) in now.iter().filter(|(i, _)| !ids.contains(i)) {
        let (status, v) = post(&s, "/v1/chat/completions", &ask_body(id, Q1, false));
        assert_eq!(status, 200, "a document saved before the kill must be whole: {v}");
    }
    for entry in std::fs::read_dir(&cache_dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".partial"), "{name} left over");
        if let Some(id) = name.strip_suffix(".kvc") {
            assert!(cache_dir.join(format!("{id}.json")).exists(), "{name} without its description");
        }
    }
}

/// Documents stored quantized (`"kv_dtype"`): the same ~1000-token text as float, int8 and int4
/// under the same press keeps the same tokens in fewer bytes (int8 < 0.6x, int4 < 0.4x of float's
/// f32 bytes); greedy answers on the float and int8 documents are non-empty, the int8 one equals
/// `kvc generate --kv-dtype int8`'s token for token; a bad `kv_dtype` is a 400; after a restart
/// the documents read back from `--cache-dir` keep their format, bytes and answer.
#[test]
fn serve_stores_documents_quantized_with_kv_dtype() {
    let _one = ONE_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let cache = cache_dir.to_str().unwrap();
    let docs = documents();
    // two of the ~500-token pieces: long enough that int4's full-precision tail (at most one
    // 64-token group per layer) does not dominate
    let text = format!("{}{}", docs[0], docs[1]);
    let file = dir.path().join("doc.txt");
    std::fs::write(&file, &text).unwrap();
    let (r8, answers8) = reference_with(&file, &[Q1], &["--kv-dtype", "int8"]);
    assert_eq!(r8["kv_dtype"], "int8", "{r8}");
    let (r16, answers16) = reference_with(&file, &[Q1], &["--kv-dtype", "bf16"]);
    assert_eq!(r16["kv_dtype"], "bf16", "{r16}");

    let s = start(&["--cache-dir", cache], None, dir.path());
    let mut stored = Vec::new();
    for kind in ["float", "int8", "int4", "bf16"] {
        let (status, doc) = post(&s, "/v1/documents", &json!({ "text": text, "kv_dtype": kind }));
        assert_eq!((status, &doc["status"]), (201, &json!("ready")), "{kind}: {doc}; log: {}", log_of(&s));
        assert_eq!(doc["kv_dtype"], kind, "{doc}");
        stored.push(doc);
    }
    let (float, int8, int4, bf16) = (&stored[0], &stored[1], &stored[2], &stored[3]);
    assert!(float["tokens"].as_u64().unwrap() >= 600, "the test needs a long context: {float}");
    for d in [int8, int4, bf16] {
        for field in ["tokens", "kv_bytes_uncompressed", "kept_per_layer", "press"] {
            assert_eq!(d[field], float[field], "{field}: the same press keeps the same tokens\n{d}\n{float}");
        }
    }
    let bytes = |d: &Value| d["kv_bytes"].as_u64().unwrap() as f64;
    assert!(bytes(float) > 0.0 && bytes(float) < float["kv_bytes_uncompressed"].as_u64().unwrap() as f64, "compressed: {float}");
    eprintln!("kv_bytes of {} tokens: float {}, int8 {} ({:.3}x), int4 {} ({:.3}x)", float["tokens"], bytes(float), bytes(int8), bytes(int8) / bytes(float), bytes(int4), bytes(int4) / bytes(float));
    assert!(bytes(int8) < 0.6 * bytes(float), "int8 {} vs float {}", bytes(int8), bytes(float));
    assert!(bytes(int4) < 0.4 * bytes(float), "int4 {} vs float {}", bytes(int4), bytes(float));
    // bf16 storage of the f32 model's cache: half, the newest token of each layer and head in f32,
    // keys padded to whole blocks of 16 tokens
    assert!(bytes(bf16) >= 0.5 * bytes(float) && bytes(bf16) < 0.53 * bytes(float), "bf16 {} vs float {}", bytes(bf16), bytes(float));
    assert_eq!(int8["kv_bytes"], r8["kv_cache_bytes_compressed"], "kvc generate --kv-dtype int8 stores the same bytes: {int8}");
    let (status, one) = get(&s, &format!("/v1/documents/{}", int4["id"].as_str().unwrap()));
    assert_eq!((status, &one["kv_dtype"], &one["kv_bytes"]), (200, &json!("int4"), &int4["kv_bytes"]), "{one}");

    // greedy answers (the default temperature 0)
    let id = |d: &Value| d["id"].as_str().unwrap().to_string();
    let (_, float_answer, v) = ask(&s, &id(float), Q1);
    assert!(!float_answer.trim().is_empty(), "{v}");
    let (int8_ids, int8_answer, v) = ask(&s, &id(int8), Q1);
    assert!(!int8_answer.trim().is_empty(), "{v}");
    assert_eq!((int8_ids.clone(), int8_answer.clone()), answers8[0], "the int8 document answers as kvc generate --kv-dtype int8");
    let (bf16_ids, bf16_answer, v) = ask(&s, &id(bf16), Q1);
    assert!(!bf16_answer.trim().is_empty(), "{v}");
    assert_eq!((bf16_ids.clone(), bf16_answer), answers16[0].clone(), "the bf16 document answers as kvc generate --kv-dtype bf16");
    assert_eq!(bf16["kv_bytes"], r16["kv_cache_bytes_compressed"], "kvc generate --kv-dtype bf16 stores the same bytes: {bf16}");

    // a bad kv_dtype: 400 in OpenAI's shape, nothing stored
    for bad in [json!("int3"), json!("f8"), json!("INT8"), json!(8), json!(null)] {
        let (st, v) = post(&s, "/v1/documents", &json!({ "text": "some text", "kv_dtype": bad }));
        if bad.is_null() {
            assert_eq!(st, 201, "null is absent: the server's default: {v}");
            assert_eq!(v["kv_dtype"], "float", "{v}");
            let (st, _, _, _) = call(&s, "DELETE", &format!("/v1/documents/{}", id(&v)), None);
            assert_eq!(st, 200);
            continue;
        }
        assert_error(st, 400, &v, &format!("kv_dtype {bad}"));
        if bad.is_string() {
            assert_eq!((&v["error"]["code"], &v["error"]["param"]), (&json!("invalid_kv_dtype"), &json!("kv_dtype")), "{v}");
        }
    }
    assert_eq!(listed(&s).len(), 4);
    drop(s);

    // restart (server default int4): the stored documents keep their own format and bytes, and
    // the int8 one read back from disk answers the same
    let s = start(&["--cache-dir", cache, "--kv-dtype", "int4"], None, dir.path());
    let (status, list) = get(&s, "/v1/documents");
    assert_eq!(status, 200, "{list}");
    for d in &stored {
        let found = list["data"].as_array().unwrap().iter().find(|x| x["id"] == d["id"]).unwrap_or_else(|| panic!("{} lost: {list}", d["id"]));
        assert_eq!((&found["kv_dtype"], &found["kv_bytes"], &found["in_memory"]), (&d["kv_dtype"], &d["kv_bytes"], &json!(false)), "{found}");
    }
    assert_eq!(ask(&s, &id(int8), Q1).0, int8_ids, "read back from --cache-dir");
    assert_eq!(ask(&s, &id(bf16), Q1).0, bf16_ids, "bf16, read back from --cache-dir");
    // a document that names none takes the server's --kv-dtype
    let (status, doc) = post(&s, "/v1/documents", &json!({ "text": docs[2] }));
    assert_eq!((status, &doc["kv_dtype"]), (201, &json!("int4")), "{doc}");
}

/// `kvc serve --int8-activations`: decode steps on int8 activations (said in the log), and the
/// greedy answers on a compressed document equal `kvc generate --int8-activations`'s token for
/// token, non-streamed and streamed — answers that differ from the default f32 activations' on
/// at least one of the questions (on SmolLM2 they change from the first token), so the equality
/// shows the server decodes on int8; `--dense-weights` with it is a usage error (exit 2) that
/// names the conflict.
#[test]
fn serve_with_int8_activations_answers_as_kvc_generate() {
    let _one = ONE_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let docs = documents();
    let file = dir.path().join("doc.txt");
    std::fs::write(&file, &docs[0]).unwrap();
    let (r, answers) = reference_with(&file, &[Q1, Q2], &["--int8-activations"]);
    assert_eq!(r["activations"], "int8", "{r}");
    let (_, f32_answers) = reference(&file, &[Q1, Q2]);
    assert_ne!(answers, f32_answers, "int8 activations change an answer of this document");

    let s = start(&["--int8-activations"], None, dir.path());
    assert!(log_of(&s).contains("decode steps on int8 activations"), "{}", log_of(&s));
    let doc = create_document(&s, &docs[0]);
    let id = doc["id"].as_str().unwrap();
    for (q, want) in [Q1, Q2].iter().zip(&answers) {
        let (ids, text, v) = ask(&s, id, q);
        assert_eq!(&(ids, text.clone()), want, "{q}: the server answers as kvc generate --int8-activations: {v}");
        assert_eq!(ask_streamed(&s, id, q), text, "{q}: streamed as a whole");
    }
    drop(s);

    let out = Command::new(env!("CARGO_BIN_EXE_kvc")).args(["serve", "--port", "0", "--int8-activations", "--dense-weights"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("cannot be used with"), "{:?}: {err}", out.status);
}

/// A small deterministic generator (no dependency): xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A mutation of `seed` (a JSON body): a field set to a value of another type, or bytes flipped,
/// deleted, inserted, duplicated or cut.
fn mutate(rng: &mut Rng, seed: &Value) -> Vec<u8> {
    let odd = [
        json!(null),
        json!(-1),
        json!(1e308),
        json!(18446744073709551615u64),
        json!("x"),
        json!([]),
        json!({}),
        json!(true),
        json!("\u{0}\u{ffff}../../etc/passwd"),
        serde_json::from_str(&format!("{}1{}", "[".repeat(40), "]".repeat(40))).unwrap(),
        json!([{ "role": 7, "content": [{ "type": "image_url" }] }]),
        json!("a".repeat(3000)),
    ];
    if rng.below(2) == 0 {
        let mut v = seed.clone();
        let keys: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        let key = keys[rng.below(keys.len())].clone();
        let value = odd[rng.below(odd.len())].clone();
        match rng.below(3) {
            0 => v[key.as_str()] = value,
            1 => {
                v.as_object_mut().map(|o| o.remove(&key));
            }
            _ => v[format!("extra{}", rng.below(9)).as_str()] = value,
        }
        if !v.get("max_tokens").is_some_and(Value::is_u64) && seed.get("max_tokens").is_some() {
            v["max_tokens"] = json!(2); // a valid request stays short
        }
        return v.to_string().into_bytes();
    }
    let mut b = seed.to_string().into_bytes();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len());
        match rng.below(5) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => {
                let end = (at + 1 + rng.below(8)).min(b.len());
                b.drain(at..end);
            }
            2 => b.insert(at, [b'{', b'}', b'[', b'"', b'\\', b',', b':', 0xff, b'0'][rng.below(9)]),
            3 => b.truncate(at),
            _ => {
                let piece = b[at..(at + 8).min(b.len())].to_vec();
                b.splice(at..at, piece);
            }
        }
        if b.is_empty() {
            break;
        }
    }
    b
}

/// Mutated request bodies (and ids) on every route that reads one, sent one after another for at
/// most 400 requests or 60 seconds: every reply is a status the API documents, every error is in
/// OpenAI's shape, the server never stops answering, and a plain request still works after.
#[test]
fn serve_survives_mutated_requests() {
    let _one = ONE_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let server = start(&["--max-queue", "4"], None, dir.path());
    let doc = create_document(&server, "Mr. Bennet had five daughters. Netherfield Park is let at last.");
    let id = doc["id"].as_str().unwrap().to_string();
    let seeds = [
        ("/v1/chat/completions", json!({ "model": "kvc", "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 2 })),
        ("/v1/chat/completions", json!({ "model": "kvc", "document": id, "messages": [{ "role": "user", "content": "Who?" }], "max_tokens": 2, "stream": true })),
        ("/v1/documents", json!({ "text": "A short text.", "ratio": 0.5 })),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let begin = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..400 {
        if begin.elapsed() > Duration::from_secs(60) {
            break;
        }
        let (path, seed) = &seeds[i % seeds.len()];
        let body = mutate(&mut rng, seed);
        let (status, _, raw) = try_http(server.port, "POST", path, &[("Content-Type", "application/json")], Some(&body))
            .unwrap_or_else(|e| panic!("request {i} ({}): {e}; log: {}", String::from_utf8_lossy(&body), log_of(&server)));
        *statuses.entry(status).or_insert(0) += 1;
        assert!([200, 201, 400, 404, 413, 415, 422, 429].contains(&status), "request {i}: status {status} for {}", String::from_utf8_lossy(&body));
        if status >= 400 {
            let v: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
            assert!(v["error"]["message"].is_string(), "request {i}: error not in OpenAI's shape: {}", String::from_utf8_lossy(&raw));
        }
        // a mutated document id on the routes that take one
        let mut bad = id.clone().into_bytes();
        let at = rng.below(bad.len());
        bad[at] = [b'.', b'/', b'%', b'g', b'Z', b'0'][rng.below(6)];
        let path = format!("/v1/documents/{}", String::from_utf8_lossy(&bad));
        let (status, _, _) = try_http(server.port, "GET", &path, &[], None).unwrap();
        assert!([200, 400, 404].contains(&status), "GET {path}: {status}");
    }
    assert!(statuses.keys().any(|&s| s >= 400) && statuses.keys().any(|&s| s < 300), "both errors and successes: {statuses:?}");
    eprintln!("mutated requests: {statuses:?} in {:.0} s", begin.elapsed().as_secs_f64());
    assert_eq!(get(&server, "/health").0, 200, "healthy after; log: {}", log_of(&server));
    let (status, v) = post(&server, "/v1/chat/completions", &json!({ "model": "kvc", "document": id, "messages": [{ "role": "user", "content": "Who?" }], "max_tokens": 4 }));
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
}
