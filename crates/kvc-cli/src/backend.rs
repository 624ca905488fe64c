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
