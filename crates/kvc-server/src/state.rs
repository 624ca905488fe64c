//! The document store's shared half: what every handler may read (ids, status, sizes, which
//! tier holds each cache, recency), and the disk tier's files.
//!
//! A document in `--cache-dir` is two files: `<id>.kvc` (the compressed cache in kvc's
//! saved-cache format, [`kvc_core::KvCache::save`]) and `<id>.json` (a [`DiskMeta`]: the text,
//! the press, sizes, and the CRC-32 and length of the `.kvc` file). Both are written to a
//! temporary name, flushed to disk and renamed; the `.json` last. At start-up a document counts
//! only when its `.json` parses and its `.kvc` has the recorded length and checksum; anything else
//! (a file cut short by a crash, a `.kvc` without its `.json`, `*.partial` leftovers) is removed.
//! The caches themselves (tensors of the engine's backend) live in the engine.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use kvc_core::{KvQuant, PressSpec};
use serde::{Deserialize, Serialize, Serializer};

/// A document id: 32 lowercase hex digits (128 random bits).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DocId(String);

impl DocId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(format!("{:032x}", rand::random::<u128>()))
    }

    /// Parses an id given by a client: exactly 32 characters `0-9a-f`, so that it can never name
    /// another file than its own (no `/`, `.`, or anything else).
    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == 32 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then(|| Self(text.to_string()))
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DocId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a document is in its life.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Waiting for the engine, prefilling or compressing.
    Processing {
        /// `queued`, `prefill` or `compress`.
        phase: &'static str,
        /// Tokens done in the phase.
        done: usize,
        /// Tokens of the phase.
        total: usize,
    },
    /// Compressed; questions may be asked.
    Ready,
    /// Prefill, compression or saving failed.
    Failed {
        /// Why.
        error: String,
    },
}

/// What the server knows about a document (the `/v1/documents` object, plus the text).
#[derive(Clone, Debug, Serialize)]
pub struct DocMeta {
    /// The id.
    pub id: DocId,
    /// `document`.
    pub object: &'static str,
    /// Unix seconds of creation.
    pub created: u64,
    /// Context tokens (before compression).
    pub tokens: usize,
    /// KV cache bytes after compression (and quantization: codes, scales and the residual
    /// window; 0 while processing).
    pub kv_bytes: usize,
    /// KV cache bytes of the uncompressed context (in the model's float dtype).
    pub kv_bytes_uncompressed: usize,
    /// The press that compressed it; `None`: kept whole.
    pub press: Option<PressSpec>,
    /// How the compressed cache stores keys and values (`None`: the model's float dtype); shown
    /// as `"kv_dtype": "float" | "int8" | "int4" | "f16" | "bf16"`.
    #[serde(rename = "kv_dtype", serialize_with = "kv_dtype_name")]
    pub kv_quant: Option<KvQuant>,
    /// Kept tokens per layer (largest head), `[layers]`.
    pub kept_per_layer: Vec<usize>,
    /// Wrapped in the chat template.
    pub chat: bool,
    /// Status (flattened: `status`, and `phase` / `done` / `total` or `error`).
    #[serde(flatten)]
    pub status: Status,
    /// The cache is in RAM.
    pub in_memory: bool,
    /// The cache is in `--cache-dir`.
    pub on_disk: bool,
    /// The text (not listed; used to match chat prompts that begin with it).
    #[serde(skip)]
    pub text: String,
    /// Recency for the LRU (a counter, larger = more recent).
    #[serde(skip)]
    pub last_used: u64,
}

/// `kv_dtype`'s JSON: `float`, or the quantization's name.
fn kv_dtype_name<S: Serializer>(q: &Option<KvQuant>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(q.map_or("float", |q| q.name()))
}

/// All documents, shared by handlers (read, list, delete) and the engine (everything else).
#[derive(Debug, Default)]
pub struct Registry {
    docs: HashMap<DocId, DocMeta>,
    clock: u64,
}

impl Registry {
    /// The document `id`.
    pub fn get(&self, id: &DocId) -> Option<&DocMeta> {
        self.docs.get(id)
    }

    /// The document `id`, mutable.
    pub fn get_mut(&mut self, id: &DocId) -> Option<&mut DocMeta> {
        self.docs.get_mut(id)
    }

    /// Adds or replaces a document.
    pub fn insert(&mut self, meta: DocMeta) {
        self.docs.insert(meta.id.clone(), meta);
    }

    /// Removes a document; `None` if unknown.
    pub fn remove(&mut self, id: &DocId) -> Option<DocMeta> {
        self.docs.remove(id)
    }

    /// Every document, oldest first.
    pub fn list(&self) -> Vec<DocMeta> {
        let mut all: Vec<DocMeta> = self.docs.values().cloned().collect();
        all.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        all
    }

    /// Marks `id` as just used.
    pub fn touch(&mut self, id: &DocId) {
        self.clock += 1;
        if let Some(d) = self.docs.get_mut(id) {
            d.last_used = self.clock;
        }
    }

    /// (documents, KV bytes) in RAM and on disk.
    pub fn tiers(&self) -> ((usize, usize), (usize, usize)) {
        let (mut ram, mut disk) = ((0, 0), (0, 0));
        for d in self.docs.values() {
            if d.in_memory {
                ram = (ram.0 + 1, ram.1 + d.kv_bytes);
            }
            if d.on_disk {
                disk = (disk.0 + 1, disk.1 + d.kv_bytes);
            }
        }
        (ram, disk)
    }

    /// KV bytes of the caches in RAM.
    pub fn ram_bytes(&self) -> usize {
        self.tiers().0 .1
    }

    /// The least recently used document in RAM that is also on disk (may be dropped from RAM),
    /// other than `keep`.
    pub fn eviction_candidate(&self, keep: Option<&DocId>) -> Option<DocId> {
        self.docs.values().filter(|d| d.in_memory && d.on_disk && Some(&d.id) != keep).min_by_key(|d| d.last_used).map(|d| d.id.clone())
    }

    /// The ready chat document whose text the prompt `text` begins with (the longest such), and
    /// the rest of the prompt (non-empty).
    pub fn prefix_match(&self, text: &str) -> Option<(DocId, String)> {
        self.docs
            .values()
            .filter(|d| d.status == Status::Ready && d.chat && !d.text.is_empty() && text.len() > d.text.len() && text.starts_with(&d.text))
            .max_by_key(|d| d.text.len())
            .map(|d| (d.id.clone(), text[d.text.len()..].to_string()))
    }
}

/// The `.json` file beside a saved cache.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskMeta {
    /// The id (must match the file name).
    pub id: String,
    /// Unix seconds of creation.
    pub created: u64,
    /// The document's text.
    pub text: String,
    /// Context tokens.
    pub tokens: usize,
    /// Compressed KV bytes.
    pub kv_bytes: usize,
    /// Uncompressed KV bytes.
    pub kv_bytes_uncompressed: usize,
    /// The press.
    pub press: Option<PressSpec>,
    /// The quantization of the saved cache (as its header's); absent in files of servers
    /// before quantized caches: float.
    #[serde(default)]
    pub kv_quant: Option<KvQuant>,
    /// Kept tokens per layer.
    pub kept_per_layer: Vec<usize>,
    /// Chat template.
    pub chat: bool,
    /// Fingerprint of the model that wrote the cache.
    pub model: String,
    /// Length of the `.kvc` file in bytes.
    pub file_bytes: u64,
    /// CRC-32 (IEEE) of the `.kvc` file.
    pub crc32: u32,
}

/// An I/O error of the disk tier, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DiskError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// The disk tier: a folder of documents.
#[derive(Clone, Debug)]
pub struct Disk {
    dir: PathBuf,
}

impl Disk {
    /// The tier in `dir` (created if missing).
    ///
    /// # Errors
    /// [`DiskError`] when the folder cannot be created.
    pub fn open(dir: &Path) -> Result<Self, DiskError> {
        std::fs::create_dir_all(dir).map_err(|e| DiskError { path: dir.to_path_buf(), message: e.to_string() })?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// The `.kvc` file of `id`.
    pub fn cache_path(&self, id: &DocId) -> PathBuf {
        self.dir.join(format!("{id}.kvc"))
    }

    fn meta_path(&self, id: &DocId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Flushes the `.kvc` file just written by [`kvc_core::KvCache::save`] and writes `meta`
    /// (with the file's length and checksum) beside it, durably: temp file, flush, rename, flush
    /// the folder. The document counts on disk from the rename of the `.json` on.
    ///
    /// # Errors
    /// [`DiskError`] for any I/O failure.
    pub fn commit(&self, id: &DocId, mut meta: DiskMeta) -> Result<(), DiskError> {
        let cache = self.cache_path(id);
        let err = |path: &Path, e: std::io::Error| DiskError { path: path.to_path_buf(), message: e.to_string() };
        let bytes = std::fs::read(&cache).map_err(|e| err(&cache, e))?;
        std::fs::File::open(&cache).and_then(|f| f.sync_all()).map_err(|e| err(&cache, e))?;
        meta.file_bytes = bytes.len() as u64;
        meta.crc32 = crc32fast::hash(&bytes);
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| DiskError { path: cache.clone(), message: e.to_string() })?;
        let path = self.meta_path(id);
        let tmp = self.dir.join(format!("{id}.json.partial"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // the rename itself survives a power cut once the folder is flushed
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| err(&path, e))
    }

    /// Checks the `.kvc` file of `id` against its recorded length and checksum.
    ///
    /// # Errors
    /// [`DiskError`] naming the mismatch or the I/O error.
    pub fn verify(&self, id: &DocId, meta: &DiskMeta) -> Result<(), DiskError> {
        let path = self.cache_path(id);
        let bytes = std::fs::read(&path).map_err(|e| DiskError { path: path.clone(), message: e.to_string() })?;
        if bytes.len() as u64 != meta.file_bytes || crc32fast::hash(&bytes) != meta.crc32 {
            return Err(DiskError { path, message: "length or checksum differs from the one recorded (damaged or cut short)".into() });
        }
        Ok(())
    }

    /// Removes both files of `id` (missing files are fine).
    pub fn remove(&self, id: &DocId) {
        for path in [self.cache_path(id), self.meta_path(id)] {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Finds the documents of the folder written by the model `fingerprint`: every `<id>.json`
    /// that parses and whose `.kvc` checks out. Removes leftovers of interrupted writes
    /// (`*.partial`, a `.kvc` without `.json`, a document that does not check out); leaves files
    /// of other models and names it does not know alone. Returns the documents and one line per
    /// file removed.
    pub fn recover(&self, fingerprint: &str) -> (Vec<DiskMeta>, Vec<String>) {
        let (mut found, mut removed) = (Vec::new(), Vec::new());
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return (found, removed) };
        let names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        let mut drop = |path: PathBuf, why: &str| {
            if std::fs::remove_file(&path).is_ok() {
                removed.push(format!("{}: {why}", path.display()));
            }
        };
        for name in &names {
            if name.ends_with(".partial") {
                drop(self.dir.join(name), "an interrupted write");
            }
        }
        for name in &names {
            let Some(id) = name.strip_suffix(".kvc").and_then(DocId::parse) else { continue };
            if !self.meta_path(&id).exists() {
                drop(self.cache_path(&id), "a cache whose description was never written");
            }
        }
        for name in &names {
            let Some(id) = name.strip_suffix(".json").and_then(DocId::parse) else { continue };
            let meta = std::fs::read(self.meta_path(&id)).ok().and_then(|b| serde_json::from_slice::<DiskMeta>(&b).ok());
            match meta {
                Some(m) if m.id == id.as_str() && m.model != fingerprint => {} // another model's
                Some(m) if m.id == id.as_str() && self.verify(&id, &m).is_ok() => found.push(m),
                _ => {
                    drop(self.cache_path(&id), "damaged or cut short");
                    drop(self.meta_path(&id), "its cache is damaged or missing");
                }
            }
        }
        found.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        (found, removed)
    }
}

impl DocMeta {
    /// The registry entry of a document recovered from disk (not in RAM).
    pub fn from_disk(m: DiskMeta, id: DocId) -> Self {
        Self {
            id,
            object: "document",
            created: m.created,
            tokens: m.tokens,
            kv_bytes: m.kv_bytes,
            kv_bytes_uncompressed: m.kv_bytes_uncompressed,
            press: m.press,
            kv_quant: m.kv_quant,
            kept_per_layer: m.kept_per_layer,
            chat: m.chat,
            status: Status::Ready,
            in_memory: false,
            on_disk: true,
            text: m.text,
            last_used: 0,
        }
    }

    /// The `.json` description of this document (checksum filled in by [`Disk::commit`]).
    pub fn to_disk(&self, model: &str) -> DiskMeta {
        DiskMeta {
            id: self.id.to_string(),
            created: self.created,
            text: self.text.clone(),
            tokens: self.tokens,
            kv_bytes: self.kv_bytes,
            kv_bytes_uncompressed: self.kv_bytes_uncompressed,
            press: self.press.clone(),
            kv_quant: self.kv_quant,
            kept_per_layer: self.kept_per_layer.clone(),
            chat: self.chat,
            model: model.to_string(),
            file_bytes: 0,
            crc32: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_hex_digits_and_nothing_else() {
        let id = DocId::random();
        assert_eq!(DocId::parse(id.as_str()), Some(id.clone()));
        assert_ne!(DocId::random(), id);
        for bad in ["", "../etc/passwd", "0123456789abcdef0123456789abcdeF", "0123456789abcdef0123456789abcde", "0123456789abcdef0123456789abcdef0", "../3456789abcdef0123456789abcdef0", "0123456789abcdef/123456789abcdef"] {
            assert_eq!(DocId::parse(bad), None, "{bad:?}");
        }
    }

    fn meta(id: &DocId) -> DiskMeta {
        DiskMeta {
            id: id.to_string(),
            created: 1,
            text: "t".into(),
            tokens: 3,
            kv_bytes: 4,
            kv_bytes_uncompressed: 8,
            press: None,
            kv_quant: None,
            kept_per_layer: vec![3],
            chat: true,
            model: "m".into(),
            file_bytes: 0,
            crc32: 0,
        }
    }

    #[test]
    fn kv_dtype_is_shown_and_old_descriptions_without_it_load_as_float() {
        let id = DocId::random();
        let mut old = serde_json::to_value(meta(&id)).unwrap();
        old.as_object_mut().unwrap().remove("kv_quant");
        let m: DiskMeta = serde_json::from_value(old).unwrap();
        assert_eq!(m.kv_quant, None);
        assert_eq!(serde_json::to_value(DocMeta::from_disk(m, id.clone())).unwrap()["kv_dtype"], "float");
        let q = DiskMeta { kv_quant: Some(KvQuant::int4()), ..meta(&id) };
        let back: DiskMeta = serde_json::from_slice(&serde_json::to_vec(&q).unwrap()).unwrap();
        assert_eq!(back.kv_quant, Some(KvQuant::int4()));
        let doc = serde_json::to_value(DocMeta::from_disk(back, id)).unwrap();
        assert_eq!(doc["kv_dtype"], "int4", "{doc}");
    }

    #[test]
    fn recovery_keeps_whole_documents_and_removes_damaged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::open(dir.path()).unwrap();
        let (good, cut, orphan, other) = (DocId::random(), DocId::random(), DocId::random(), DocId::random());
        for id in [&good, &cut, &other] {
            std::fs::write(disk.cache_path(id), b"cache bytes").unwrap();
            let mut m = meta(id);
            if id == &other {
                m.model = "another".into();
            }
            disk.commit(id, m).unwrap();
        }
        // a crash while rewriting: the cache cut short after its description was written
        std::fs::write(disk.cache_path(&cut), b"cache").unwrap();
        std::fs::write(disk.cache_path(&orphan), b"cache bytes").unwrap();
        std::fs::write(dir.path().join("x.kvc.partial"), b"half").unwrap();
        let (found, removed) = disk.recover("m");
        assert_eq!(found.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), vec![good.as_str()]);
        assert_eq!(removed.len(), 4, "{removed:?}");
        assert!(!disk.cache_path(&cut).exists() && !disk.cache_path(&orphan).exists());
        assert!(disk.cache_path(&other).exists(), "another model's documents are left alone");
    }

    #[test]
    fn prefix_match_takes_the_longest_ready_chat_document() {
        let mut r = Registry::default();
        for (text, status) in [("Once upon", Status::Ready), ("Once upon a time", Status::Ready), ("Once upon a time there", Status::Failed { error: "x".into() })] {
            let id = DocId::random();
            let mut m = DocMeta::from_disk(meta(&id), id);
            m.text = text.into();
            m.status = status;
            r.insert(m);
        }
        let (id, rest) = r.prefix_match("Once upon a time there was").unwrap();
        assert_eq!(r.get(&id).unwrap().text, "Once upon a time");
        assert_eq!(rest, " there was");
        let (id, rest) = r.prefix_match("Once upon a time").unwrap();
        assert_eq!((r.get(&id).unwrap().text.as_str(), rest.as_str()), ("Once upon", " a time"), "a document equal to the prompt leaves no question");
        assert!(r.prefix_match("Once upon").is_none(), "no question left");
        assert!(r.prefix_match("Twice").is_none());
    }
}
