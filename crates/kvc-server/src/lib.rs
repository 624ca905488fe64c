//! # kvc-server
//!
//! `kvc serve`: an OpenAI-compatible HTTP server that keeps documents as compressed KV caches.
//! A document is prefilled and compressed once (`POST /v1/documents`); every question on it
//! (`POST /v1/chat/completions` with `"document": id`) is answered on its own copy of the
//! compressed cache, as `kvc generate --question` does. See `docs/serving.md`.
//!
//! Layout: [`routes`] (axum handlers), [`engine`] (the one thread that owns the model),
//! [`state`] (the document registry and the disk tier), [`openai`] (wire types), [`metrics`].
//!
//! [`serve`] binds the socket, serves HTTP on a few runtime threads (`/health` answers 503 while
//! the model loads), loads the model and runs the engine on the calling thread (the CLI's main
//! thread, which is also thread 0 of rayon's pool: the kernels' parallel calls start at once).

pub mod engine;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod state;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use burn::tensor::DType;
use kvc_core::{KvQuant, KvcBackend, PressSpec};

use crate::state::{Disk, DocId, DocMeta, Registry};

/// Everything `kvc serve` is started with.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The model: a file, a folder or a known name (`kvc_models::default_model::resolve`;
    /// `None`: the default model), fetched if needed while `/health` answers 503.
    pub model: Option<PathBuf>,
    /// The model's name in `/v1/models` and responses.
    pub model_name: String,
    /// Address to bind (default 127.0.0.1).
    pub host: IpAddr,
    /// Port to bind.
    pub port: u16,
    /// The press of documents that name none (`None`: kept whole).
    pub press: Option<PressSpec>,
    /// Bytes of document KV caches kept in RAM; beyond it the least recently used go to disk
    /// only (with `cache_dir`), or new documents are refused (without). `None`: no bound.
    pub cache_memory: Option<usize>,
    /// Folder of the disk tier (every document is written there once ready; found again on
    /// restart).
    pub cache_dir: Option<PathBuf>,
    /// Answers advanced together per step.
    pub max_batch: usize,
    /// Answers that may wait for a place in the batch; beyond: 429.
    pub max_queue: usize,
    /// Bearer token every route but `/health` (and the page) needs.
    pub api_key: Option<String>,
    /// Largest request body in bytes (413 beyond).
    pub body_limit: usize,
    /// Float type of weights, activations and KV caches.
    pub dtype: DType,
    /// How documents that name no `kv_dtype` store their compressed caches (`None`: in `dtype`;
    /// else quantized after the press).
    pub kv_quant: Option<KvQuant>,
    /// The backend's name (for messages).
    pub backend: String,
    /// Hold dense copies of the weights instead of a GGUF's blocks of codes.
    pub dense_weights: bool,
    /// Decode steps on int8 activations ([`kvc_models::Decoder::set_activations`]).
    pub int8_activations: bool,
}

/// The name of a float dtype as `--dtype` spells it (`f32`, `f16`, `bf16`).
pub fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// Parses a KV cache format (a document's `kv_dtype`, `kvc serve --kv-dtype`): `float` or the
/// model's dtype name (`model_dtype`: the cache stays in it) -> `None`; `int8` / `int4` -> that
/// quantization; `f16` / `bf16` for a model in f32 -> 16-bit storage ([`KvQuant::parse_for`]).
/// Names are exact (lowercase).
///
/// # Errors
/// A message naming the accepted values (another float dtype is refused: a half-precision
/// model's float cache is in its own dtype).
pub fn parse_kv_dtype(name: &str, model_dtype: DType) -> Result<Option<KvQuant>, String> {
    KvQuant::parse_for(name, model_dtype).map_err(|e| e.to_string())
}

/// Why the server stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The cache folder could not be created.
    #[error(transparent)]
    Disk(#[from] state::DiskError),
    /// The model could not be loaded.
    #[error("loading model {path}: {source}")]
    Model {
        /// The model path.
        path: PathBuf,
        /// The cause.
        source: kvc_models::ModelError,
    },
    /// The backend cannot run the dtype.
    #[error("--dtype {0} is not supported by the {1} backend")]
    Dtype(String, String),
    /// The default KV cache format cannot hold the model's heads.
    #[error("--kv-dtype: {0}")]
    KvDtype(String),
    /// `--int8-activations` on a model without quantized weights in use
    /// ([`kvc_models::ModelError::Int8Activations`]).
    #[error(transparent)]
    Int8Activations(kvc_models::ModelError),
    /// The HTTP runtime failed.
    #[error("HTTP server: {0}")]
    Runtime(std::io::Error),
}

/// State shared by the handlers and the engine.
pub struct Shared {
    /// The configuration.
    pub config: ServeConfig,
    /// Every document.
    pub registry: Mutex<Registry>,
    /// The disk tier.
    pub disk: Option<Disk>,
    /// Counters of `/metrics`.
    pub metrics: metrics::Metrics,
    /// The model is loaded and the engine runs.
    pub ready: AtomicBool,
    /// The model's context window in tokens (0 until loaded).
    pub window: AtomicUsize,
    /// Answers admitted and not finished (running or waiting).
    pub in_flight: Arc<AtomicUsize>,
    /// The engine's inbox.
    pub engine: Mutex<std::sync::mpsc::Sender<engine::Command>>,
}

impl Shared {
    /// The registry, locked (a panic elsewhere while it was held does not lock it for ever).
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a command to the engine; false when the engine has stopped.
    pub fn send(&self, command: engine::Command) -> bool {
        self.engine.lock().unwrap_or_else(|e| e.into_inner()).send(command).is_ok()
    }
}

/// Runs the server (for ever; the process ends if the HTTP server fails): binds `config.host:config.port`, serves HTTP on
/// runtime threads, loads the model on this thread (meanwhile `/health` is 503) and runs the
/// engine here.
///
/// # Errors
/// [`ServeError`]: the address, the cache folder, the model, the runtime.
pub fn serve<B: KvcBackend>(config: ServeConfig, device: B::Device) -> Result<(), ServeError> {
    if !B::supports_dtype(&device, config.dtype) {
        return Err(ServeError::Dtype(dtype_name(config.dtype), config.backend.clone()));
    }
    let addr = SocketAddr::new(config.host, config.port);
    let listener = std::net::TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
    listener.set_nonblocking(true).map_err(|source| ServeError::Bind { addr, source })?;
    let disk = config.cache_dir.as_deref().map(Disk::open).transpose()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        config: config.clone(),
        registry: Mutex::new(Registry::default()),
        disk,
        metrics: metrics::Metrics::default(),
        ready: AtomicBool::new(false),
        window: AtomicUsize::new(0),
        in_flight: Arc::new(AtomicUsize::new(0)),
        engine: Mutex::new(tx),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kvc-http")
        .enable_io()
        .enable_time()
        .build()
        .map_err(ServeError::Runtime)?;
    let app = routes::router(shared.clone());
    std::thread::Builder::new()
        .name("kvc-http-main".into())
        .spawn(move || {
            let served = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, app).await
            });
            // the engine has nothing to do without the HTTP server
            eprintln!("kvc serve: the HTTP server stopped: {}", served.err().map_or("no error".into(), |e| e.to_string()));
            std::process::exit(1);
        })
        .map_err(ServeError::Runtime)?;
    eprintln!("kvc serve: listening on http://{addr}, loading the model");
    let given = config.model.clone().unwrap_or_default();
    let path = kvc_models::default_model::resolve(config.model.as_deref()).map_err(|source| ServeError::Model { path: given, source })?;
    let storage = kvc_models::WeightStorage::dense_only_if(config.dense_weights);
    let mut loaded = kvc_models::load_with::<B>(&path, &device, Some(config.dtype), storage).map_err(|source| ServeError::Model { path: path.clone(), source })?;
    if config.int8_activations {
        let native = loaded.model.enable_int8_activations().map_err(ServeError::Int8Activations)?;
        eprintln!("kvc serve: decode steps on int8 activations{}", if native { "" } else { " (plain loops)" });
        if !native {
            eprintln!("kvc serve: warning: {}", kvc_models::INT8_PLAIN_LOOPS_WARNING);
        }
    }
    if let Some(q) = config.kv_quant {
        q.check(loaded.config.head_dim).map_err(|e| ServeError::KvDtype(e.to_string()))?;
    }
    let fingerprint = loaded.model.fingerprint();
    if let Some(disk) = &shared.disk {
        let (found, removed) = disk.recover(&fingerprint);
        for line in removed {
            eprintln!("kvc serve: removed {line}");
        }
        let mut registry = shared.registry();
        for meta in found {
            if let Some(id) = DocId::parse(&meta.id) {
                registry.insert(DocMeta::from_disk(meta, id));
            }
        }
        eprintln!("kvc serve: {} document(s) found in {}", registry.list().len(), disk.cache_path(&DocId::random()).parent().map(|p| p.display().to_string()).unwrap_or_default());
    }
    shared.window.store(loaded.config.max_position_embeddings, Ordering::SeqCst);
    let engine = engine::Engine::new(&loaded, shared.clone(), fingerprint);
    shared.ready.store(true, Ordering::SeqCst);
    eprintln!("kvc serve: ready");
    drop(shared);
    engine.run(rx);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_dtype_names_float_int8_int4_or_the_models_dtype() {
        assert_eq!(parse_kv_dtype("float", DType::F32), Ok(None));
        assert_eq!(parse_kv_dtype("f32", DType::F32), Ok(None));
        assert_eq!(parse_kv_dtype("bf16", DType::BF16), Ok(None));
        assert_eq!(parse_kv_dtype("int8", DType::F32), Ok(Some(KvQuant::int8())));
        assert_eq!(parse_kv_dtype("int4", DType::BF16), Ok(Some(KvQuant::int4())));
        assert_eq!(parse_kv_dtype("bf16", DType::F32), Ok(Some(KvQuant::bf16())));
        assert_eq!(parse_kv_dtype("f16", DType::F32), Ok(Some(KvQuant::f16())));
        for bad in ["F16", "INT8", " int8", "int2", "", "q4_0"] {
            assert!(parse_kv_dtype(bad, DType::F32).is_err(), "{bad:?}");
        }
        assert!(parse_kv_dtype("f16", DType::BF16).is_err() && parse_kv_dtype("f32", DType::BF16).is_err());
    }
}
