//! Tokenizer: HF `tokenizer.json` through the `tokenizers` crate, or the same byte-level BPE
//! rebuilt from a GGUF file's embedded vocabulary, merges and pre-tokenizer type; chat templates
//! rendered with minijinja (the Jinja dialect HF chat templates are written in).

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufValue};

/// GPT-2 split regex (also the second stage of `smollm`).
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Qwen2 split regex (tokenizer.json of Qwen2/2.5/3; llama.cpp pre type `qwen2`).
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3 split regex (llama.cpp pre type `llama-bpe`).
const LLAMA3_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Instructions a chat template may execute per rendering (minijinja fuel): real templates need a
/// few thousand for a conversation; a template that loops over huge ranges stops with an error.
pub const CHAT_TEMPLATE_FUEL: u64 = 20_000_000;

/// One chat message.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A model's tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

impl Tokenizer {
    /// Loads `tokenizer.json` (+ `tokenizer_config.json` for the chat template and special
    /// tokens, `config.json`/`generation_config.json` for EOS ids) from a HF model folder.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when `tokenizer.json` is missing or invalid.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Tokenizer(format!("no tokenizer.json in {}", dir.display())));
        }
        // tokenizers 0.22 panics on some malformed files (an `unwrap` in its decoder
        // deserializer; found by tests/fuzz_parsers.rs): caught and reported as an error
        let inner = catch_quietly(|| tokenizers::Tokenizer::from_file(&path))
            .map_err(|panic| ModelError::Tokenizer(format!("{}: invalid tokenizer file ({panic})", path.display())))?
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let read = |name: &str| -> Value {
            std::fs::read_to_string(dir.join(name)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null)
        };
        let tok_cfg = read("tokenizer_config.json");
        let token_str = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        let bos_token = token_str(&tok_cfg["bos_token"]);
        let eos_token = token_str(&tok_cfg["eos_token"]);
        let chat_template = tok_cfg["chat_template"].as_str().map(str::to_string);
        let mut eos_ids = Vec::new();
        for cfg in [read("generation_config.json"), read("config.json")] {
            match &cfg["eos_token_id"] {
                Value::Number(n) => eos_ids.extend(n.as_u64().map(|v| v as u32)),
                Value::Array(a) => eos_ids.extend(a.iter().filter_map(Value::as_u64).map(|v| v as u32)),
                _ => {}
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Self { inner, eos_ids, bos_token, eos_token, chat_template })
    }

    /// Rebuilds the model's byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`):
    /// vocabulary, merges, token types (control and user-defined tokens become special added
    /// tokens), pre-tokenizer type (`smollm`, `qwen2`, `llama-bpe`, `gpt2`/`default`), BOS
    /// insertion per `tokenizer.ggml.add_bos_token`, and the chat template.
    ///
    /// Pre-tokenizers follow the models' HF `tokenizer.json` files and llama.cpp's
    /// `llama-vocab.cpp` regexes for the same pre type.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] for a missing vocabulary, a tokenizer model other than `gpt2`
    /// (byte-level BPE), or an unknown pre-tokenizer type.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let err = |m: String| ModelError::Tokenizer(m);
        let model = file.get("tokenizer.ggml.model").and_then(GgufValue::as_str).unwrap_or("");
        if model != "gpt2" {
            return Err(err(format!(
                "GGUF tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
            )));
        }
        let strings = |key: &str| -> Option<Vec<String>> {
            file.get(key)?.as_array()?.iter().map(|v| v.as_str().map(str::to_string)).collect()
        };
        let tokens = strings("tokenizer.ggml.tokens").ok_or_else(|| err("GGUF has no tokenizer.ggml.tokens".into()))?;
        let merges = strings("tokenizer.ggml.merges").ok_or_else(|| err("GGUF has no tokenizer.ggml.merges".into()))?;
        let types: Vec<i64> = file
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
            .map(|a| a.iter().map(|v| match v { GgufValue::Int(i) => *i, _ => 1 }).collect())
            .unwrap_or_default();
        let pre = file.get("tokenizer.ggml.pre").and_then(GgufValue::as_str).unwrap_or("default");
        let (normalizer, pre_tokenizer, ignore_merges) = match pre {
            "smollm" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            "qwen2" => (json!({"type": "NFC"}), json!({"type": "Sequence", "pretokenizers": [split(QWEN2_PATTERN), byte_level(false)]}), false),
            "llama-bpe" | "llama3" => {
                (Value::Null, json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_PATTERN), byte_level(false)]}), true)
            }
            "gpt2" | "default" | "gpt-2" => {
                (Value::Null, json!({"type": "Sequence", "pretokenizers": [split(GPT2_PATTERN), byte_level(false)]}), false)
            }
            other => return Err(err(format!("unsupported GGUF pre-tokenizer type {other:?}"))),
        };
        let id_of = |key: &str| file.get(key).and_then(GgufValue::as_u64).map(|v| v as u32);
        let bos_id = id_of("tokenizer.ggml.bos_token_id");
        let eos_id = id_of("tokenizer.ggml.eos_token_id");
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let add_bos = file.get("tokenizer.ggml.add_bos_token").and_then(GgufValue::as_bool).unwrap_or(false);
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types.get(i) == Some(&3)})
            })
            .collect();
        let post_processor = match (add_bos, name(bos_id)) {
            (true, Some(bos)) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.clone(): {"id": bos, "ids": [bos_id], "tokens": [bos]}}
            }),
            _ => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        };
        let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| err(format!("building the tokenizer from GGUF metadata: {e}")))?;
        let mut eos_ids: Vec<u32> = eos_id.into_iter().chain(id_of("tokenizer.ggml.eot_token_id")).collect();
        // chat models end a turn with these; stop there too when the vocabulary has them
        for t in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(i) = tokens.iter().position(|x| x == t) {
                if matches!(types.get(i), Some(3) | Some(4)) {
                    eos_ids.push(i as u32);
                }
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Self {
            inner,
            eos_ids,
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            chat_template: file.get("tokenizer.chat_template").and_then(GgufValue::as_str).map(str::to_string),
        })
    }

    /// Token ids of `text`. `add_special_tokens` applies the tokenizer's post-processor (BOS where
    /// the model's config adds it); special-token text such as `<|im_start|>` is always matched.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`].
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped when `skip_special` is true.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`].
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Ids that end generation (EOS, end of turn).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The same tokenizer with another chat template (`None`: ChatML), e.g. to fix a model file's.
    pub fn with_chat_template(mut self, template: Option<String>) -> Self {
        self.chat_template = template;
        self
    }

    /// Renders `messages` with the model's chat template (generation prompt appended); ChatML when
    /// the model has no template. The template runs on at most [`CHAT_TEMPLATE_FUEL`] minijinja
    /// instructions and its own recursion limit.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when the template fails to parse or render, raises
    /// (`raise_exception`), recurses too deep or runs out of fuel.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let Some(template) = self.chat_template.as_deref() else {
            let mut s = String::new();
            for m in messages {
                s.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
            }
            s.push_str("<|im_start|>assistant\n");
            return Ok(s);
        };
        let mut env = minijinja::Environment::new();
        // templates come with model files: one that loops for ever is an error, not a hang
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let err = |e: minijinja::Error| ModelError::Tokenizer(format!("chat template: {e}"));
        env.add_template("chat", template).map_err(err)?;
        env.get_template("chat")
            .map_err(err)?
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(err)
    }
}

/// Runs `f`, turning a panic into `Err(message)` without printing it. For third-party parsers
/// that panic on malformed input. A panic hook installed once wraps the previous one and stays
/// silent only on a thread inside `catch_quietly` (no hook swapping, so concurrent callers and
/// other threads' panics are unaffected).
fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    use std::cell::Cell;
    use std::sync::Once;
    thread_local! {
        static QUIET: Cell<bool> = const { Cell::new(false) };
    }
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    result.map_err(|p| {
        p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "panic".into())
    })
}
