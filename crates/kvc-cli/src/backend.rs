//! The one place that maps backend names to burn backend types, by cargo feature. Shared by the
//! `kvc` and `kvc-bench` binaries (the bench includes this file), which have the same features:
//! `ndarray`, `flex` (default), `wgpu`, `cuda`. The libraries never name a backend.

use anyhow::{bail, Result};
use kvc_core::KvcBackend;

/// Names of the backends compiled into this binary, fastest CPU backend first.
pub const COMPILED: &[&str] = &[
    #[cfg(feature = "flex")]
    "flex",
    #[cfg(feature = "ndarray")]
    "ndarray",
    #[cfg(feature = "wgpu")]
    "wgpu",
    #[cfg(feature = "cuda")]
    "cuda",
];

/// The default backend: flex when compiled in (the default build; decoding ~5x faster than
/// ndarray on CPU), else the first compiled one.
pub fn default_backend() -> &'static str {
    COMPILED.first().copied().unwrap_or("none")
}

/// Makes a write to a closed stdout (`kvc inspect | head`) end the process quietly with code 141
/// (a shell's code for SIGPIPE) instead of `println!`'s panic and backtrace. Other panics keep the
/// default hook.
pub fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload_as_str().unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info)
    }));
}

/// Makes the calling (main) thread thread 0 of rayon's global pool. kvc's CPU kernels and burn's
/// GEMMs make a few hundred parallel calls per decode step; from a thread outside the pool each
/// one hands its work over and blocks until a pool thread has woken and run it, from a pool
/// thread it starts at once while the other threads join. Measured on the 2-core VM of README
/// Speed: decode 95 -> 119-129 tokens/s after 1024 tokens, prefill 528 -> 562-609 tokens/s. Call
/// before any parallel work (a global pool already built is left as it is).
pub fn join_rayon_pool() {
    let _ = rayon::ThreadPoolBuilder::new().use_current_thread().build_global();
}

/// Float type names a user may give (`--dtype`), as parsed by clap's `value_parser`.
pub const DTYPES: [&str; 3] = ["f32", "f16", "bf16"];

/// The burn dtype of a name of [`DTYPES`] (`f32` for anything else: clap has checked the name).
pub fn dtype(name: &str) -> burn::tensor::DType {
    match name {
        "f16" => burn::tensor::DType::F16,
        "bf16" => burn::tensor::DType::BF16,
        _ => burn::tensor::DType::F32,
    }
}

/// Work to run on a backend chosen at run time.
pub trait BackendJob {
    /// What the work returns.
    type Output;
    /// Runs the work on backend `B`, device `device`.
    ///
    /// # Errors
    /// The work's own errors.
    fn run<B: KvcBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the backend called `name` (its default device).
///
/// # Errors
/// A backend that is not compiled in; the job's errors.
pub fn run<J: BackendJob>(name: &str, job: J) -> Result<J::Output> {
    match name {
        #[cfg(feature = "flex")]
        "flex" => job.run::<burn::backend::Flex>(Default::default()),
        #[cfg(feature = "ndarray")]
        "ndarray" => job.run::<burn::backend::NdArray<f32>>(Default::default()),
        #[cfg(feature = "wgpu")]
        "wgpu" => job.run::<burn::backend::Wgpu>(Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => job.run::<burn::backend::Cuda>(Default::default()),
        other => {
            bail!("backend {other} is not compiled in (compiled: {}); rebuild with `--features {other}`", COMPILED.join(", "))
        }
    }
}
