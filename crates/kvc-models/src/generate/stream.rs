//! Incremental detokenization: text deltas as generated ids arrive (whole characters only; a
//! byte-level BPE token can end inside a UTF-8 character).

use crate::error::Result;
use crate::Tokenizer;

/// Turns a growing list of generated ids into text pieces.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    /// An empty stream.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self { tokenizer, ids: Vec::new(), emitted: 0 }
    }

    /// Adds one id; returns the text it completes (empty while a character is incomplete).
    ///
    /// # Errors
    /// Tokenizer errors.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        let text = text.trim_end_matches('\u{FFFD}');
        if text.len() > self.emitted && text.is_char_boundary(self.emitted) {
            let delta = text[self.emitted..].to_string();
            self.emitted = text.len();
            return Ok(delta);
        }
        Ok(String::new())
    }

    /// The whole text, and what [`TextStream::push`] held back.
    ///
    /// # Errors
    /// Tokenizer errors.
    pub fn finish(self) -> Result<(String, String)> {
        let text = self.tokenizer.decode(&self.ids, true)?;
        let rest = text.get(self.emitted..).unwrap_or("").to_string();
        Ok((text, rest))
    }
}
