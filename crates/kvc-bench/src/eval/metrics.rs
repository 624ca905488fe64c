//! RULER's scores as kvpress computes them (`evaluation/benchmarks/ruler/calculate_metrics.py`).

/// The prediction as scored: stripped, control characters (`\x00`-`\x1f`) removed, stripped again.
pub fn postprocess(prediction: &str) -> String {
    prediction.trim().chars().filter(|c| !('\x00'..='\x1f').contains(c)).collect::<String>().trim().to_string()
}

/// `string_match_all`: 100 x the fraction of references found in the prediction
/// (case-insensitive substring).
pub fn string_match_all(prediction: &str, references: &[String]) -> f64 {
    let p = prediction.to_lowercase();
    let found = references.iter().filter(|r| p.contains(&r.to_lowercase())).count();
    100.0 * found as f64 / references.len().max(1) as f64
}

/// `string_match_part`: 100 when any reference is found in the prediction (case-insensitive).
pub fn string_match_part(prediction: &str, references: &[String]) -> f64 {
    let p = prediction.to_lowercase();
    if references.iter().any(|r| p.contains(&r.to_lowercase())) {
        100.0
    } else {
        0.0
    }
}

/// The row's score: `string_match_part` for `qa_*` tasks (the task's prefix before `_` is `qa`),
/// `string_match_all` for every other task, on the postprocessed prediction.
pub fn score(task: &str, prediction: &str, references: &[String]) -> f64 {
    let p = postprocess(prediction);
    if task.split('_').next() == Some("qa") {
        string_match_part(&p, references)
    } else {
        string_match_all(&p, references)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn hand_made_cases() {
        let four = refs(&["7067228", "5918715", "2166941", "4226067"]);
        assert_eq!(score("niah_multiquery", "7067228, 5918715 and 4226067.", &four), 75.0);
        assert_eq!(score("niah_multiquery", "", &four), 0.0);
        assert_eq!(score("qa_1", "  It is FRANCE\n", &refs(&["France", "Paris"])), 100.0);
        assert_eq!(score("qa_2", "Spain", &refs(&["France", "Paris"])), 0.0);
        // qa is any-of, everything else all-of
        assert_eq!(score("vt", "France", &refs(&["France", "Paris"])), 50.0);
        // control characters are removed, not replaced: "71\n23" matches "7123"
        assert_eq!(score("niah_single_1", "71\n23", &refs(&["7123"])), 100.0);
        assert_eq!(postprocess("\t answer \x07 \n"), "answer");
    }
}
