//! The log's format: `text` (the default) or `json` (`MEMBERSYNC_LOG_FORMAT`), and the
//! subscriber that writes it through [`Buffered`].
//!
//! A JSON line is one object: `timestamp` (RFC 3339, UTC), `level`, `target`, and the log
//! call's fields, its sentence among them as `message`, under `fields` (nested, so no field
//! of a log call can collide with `level` or `timestamp`).
//!
//! What this module must never do: start the service with a format nobody asked for (an
//! unknown value is refused, not taken as text), or write past [`Buffered`].

use super::Buffered;
use std::io::Write;
use tracing_subscriber::EnvFilter;

/// The environment variable that chooses the format.
pub const ENV: &str = "MEMBERSYNC_LOG_FORMAT";

/// How each log line is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// `tracing`'s text: time, level, target, the sentence, then `field=value`.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A log format that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// `MEMBERSYNC_LOG_FORMAT` names no format.
    #[error("{ENV}={0} is not a log format: set it to `text` (the default) or `json`, or unset it")]
    Unknown(String),
}

impl Format {
    /// The format `value` names: `text`, `json`; unset or empty is `text`.
    pub fn parse(value: Option<&str>) -> Result<Format, Error> {
        match value {
            None | Some("") | Some("text") => Ok(Format::Text),
            Some("json") => Ok(Format::Json),
            Some(other) => Err(Error::Unknown(format!("`{}`", super::shown(other)))),
        }
    }

    /// The format `MEMBERSYNC_LOG_FORMAT` names (one that is not UTF-8 names none).
    pub fn from_env() -> Result<Format, Error> {
        match std::env::var(ENV) {
            Ok(value) => Format::parse(Some(&value)),
            Err(std::env::VarError::NotPresent) => Format::parse(None),
            Err(std::env::VarError::NotUnicode(raw)) => {
                Err(Error::Unknown(format!("`{}` (not UTF-8)", super::shown(raw.to_string_lossy()))))
            }
        }
    }
}

/// Makes the global subscriber: lines `filter` lets through, in `format`, written by `log`.
pub fn install<W: Write + Send + 'static>(format: Format, log: &Buffered<W>, filter: EnvFilter) {
    // No colours: the writer escapes every control character, ESC among them.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(log.clone());
    match format {
        Format::Text => builder.init(),
        Format::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_are_the_formats_and_anything_else_is_refused_naming_both() {
        assert_eq!(Format::parse(None), Ok(Format::Text));
        assert_eq!(Format::parse(Some("")), Ok(Format::Text));
        assert_eq!(Format::parse(Some("text")), Ok(Format::Text));
        assert_eq!(Format::parse(Some("json")), Ok(Format::Json));
        let refused = Format::parse(Some("JSON\nforged")).unwrap_err().to_string();
        assert_eq!(
            refused,
            "MEMBERSYNC_LOG_FORMAT=`JSON\\nforged` is not a log format: set it to `text` (the default) or `json`, or unset it"
        );
    }
}
