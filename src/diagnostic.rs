//! Diagnostics about operator files (config, provider YAML, Rhai rules): each names
//! `file:line:column`, so an operator can jump straight to the mistake.
//!
//! What this module must never do: decide what is wrong; each layer does, and reports
//! through here.

use serde::Serialize;
use std::fmt;

/// One problem in an operator-edited file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(file: impl Into<String>, line: usize, column: usize, message: impl Into<String>) -> Self {
        Diagnostic { file: file.into(), line, column, message: message.into(), hint: None }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The one "did you mean" of the project: hints the candidate `word` is a likely typo
    /// of; failing that, with `or_list`, every candidate (and `also`).
    pub fn suggest(self, word: &str, candidates: &[&str], or_list: bool, also: &[&str]) -> Self {
        match closest(word, candidates) {
            Some(best) => self.with_hint(format!("did you mean `{best}`?")),
            None if or_list => {
                let all: Vec<&str> = candidates.iter().chain(also).copied().collect();
                self.with_hint(format!("one of: {}", all.join(", ")))
            }
            None => self,
        }
    }

    /// A diagnostic from a serde_yaml error, at the location it reports.
    pub fn from_yaml(file: &str, err: &serde_yaml::Error) -> Self {
        let (line, column) = err.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
        let msg = err.to_string();
        // serde_yaml appends " at line X column Y"; the location is already in front.
        let msg = match msg.find(" at line ") {
            Some(i) => msg[..i].to_string(),
            None => msg,
        };
        Diagnostic::new(file, line, column, msg)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Renders a list of diagnostics, one per line.
pub fn render(diags: &[Diagnostic]) -> String {
    diags.iter().map(|d| format!("{d}\n")).collect()
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a typo.
/// A name nobody knows, said with the closest known one and the whole list:
/// "no provider `strpe` (did you mean `stripe`?); known: memberful, stripe, …".
pub fn unknown(what: &str, word: &str, known: &[&str]) -> String {
    let mut out = format!("no {what} `{word}`");
    if let Some(best) = closest(word, known) {
        out.push_str(&format!(" (did you mean `{best}`?)"));
    }
    out.push_str(&format!("; known: {}", if known.is_empty() { "none".to_string() } else { known.join(", ") }));
    out
}

fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// 1-based line and column of the first occurrence of `needle` in `src` (1:1 if absent).
pub fn locate(src: &str, needle: &str) -> (usize, usize) {
    match src.find(needle) {
        Some(at) => {
            let before = &src[..at];
            let line = before.matches('\n').count() + 1;
            let col = at - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            (line, col)
        }
        None => (1, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_finds_typos_only() {
        assert_eq!(closest("purchsed", &["purchased", "renewed"]), Some("purchased"));
        assert_eq!(closest("zzz", &["purchased", "renewed"]), None);
    }
}
