//! Evaluation rows: JSONL with kvpress's RULER columns.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::EvalError;

/// One evaluation row (kvpress's RULER columns; `length` and other columns are ignored).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Row {
    /// The document, prefilled and compressed.
    pub context: String,
    /// The question, fed after compression at the original positions.
    pub question: String,
    /// Text the answer starts with, after the chat template's assistant header (byte for byte).
    pub answer_prefix: String,
    /// Reference answers.
    pub answer: Vec<String>,
    /// Task name (`niah_single_1`, `qa_2`, ...): picks the metric and groups the means.
    pub task: String,
    /// Generation budget.
    pub max_new_tokens: usize,
}

/// Rows of a JSONL file with their 0-based line index, keeping the first `per_task` rows of each
/// task in file order (all when `None`). Blank lines are skipped.
///
/// # Errors
/// [`EvalError::Io`]; [`EvalError::Data`] naming the file and 1-based line of invalid JSON, a
/// missing column or a wrong type; an empty file.
pub fn load_rows(path: &Path, per_task: Option<usize>) -> Result<Vec<(usize, Row)>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io { path: path.to_path_buf(), source })?;
    let mut rows = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(line)
            .map_err(|e| EvalError::Data { path: path.to_path_buf(), line: i + 1, message: e.to_string() })?;
        if row.answer.is_empty() || row.max_new_tokens == 0 || row.context.is_empty() {
            let message = "a row needs a context, at least one answer and max_new_tokens >= 1".to_string();
            return Err(EvalError::Data { path: path.to_path_buf(), line: i + 1, message });
        }
        let n = seen.entry(row.task.clone()).or_default();
        *n += 1;
        if per_task.is_none_or(|k| *n <= k) {
            rows.push((i, row));
        }
    }
    if rows.is_empty() {
        return Err(EvalError::Data { path: path.to_path_buf(), line: 0, message: "no rows".into() });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    const ROW: &str = r#"{"context": "c", "question": "q", "answer_prefix": " A:", "answer": ["x"], "task": "qa_1", "max_new_tokens": 8, "length": 3}"#;

    #[test]
    fn rows_load_and_bad_rows_name_file_and_line() {
        let f = write(&format!("{ROW}\n\n{ROW}\n{}\n", ROW.replace("qa_1", "vt")));
        let rows = load_rows(f.path(), None).unwrap();
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 2, 3]);
        assert_eq!(rows[0].1.answer_prefix, " A:");
        assert_eq!(load_rows(f.path(), Some(1)).unwrap().iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 3]);
        for (bad, want) in [
            (ROW.replace(r#""task": "qa_1", "#, ""), "missing field `task`"),
            (ROW.replace(r#""max_new_tokens": 8"#, r#""max_new_tokens": "8""#), "invalid type"),
            ("{not json".to_string(), "key must be a string"),
            (ROW.replace(r#"["x"]"#, "[]"), "at least one answer"),
        ] {
            let f = write(&format!("{ROW}\n{bad}\n"));
            let e = load_rows(f.path(), None).unwrap_err().to_string();
            assert!(e.contains(&format!("{}:2:", f.path().display())) && e.contains(want), "{e}");
        }
    }
}
