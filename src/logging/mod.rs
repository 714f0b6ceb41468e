//! The log's writer: stderr, with routine lines written in batches.
//!
//! Lines at `info` and below (one per webhook under `serve`) are gathered and written by a
//! thread of their own at least every [`FLUSH_EVERY`], one `write` for all of them, instead
//! of a `write` call per line on the request's thread. A `warn` or `error` line goes out at
//! once, after every line logged before it, so nothing an operator must see waits; so do
//! the lines of a process that exits (`flush` at the end of `main`) or panics (the panic
//! hook flushes first). A process killed outright loses at most the last
//! [`FLUSH_EVERY`] of routine lines; what happened to each event is in the database, not in
//! the log.
//!
//! Lines are text (`tracing`'s format) or, with `MEMBERSYNC_LOG_FORMAT=json`, one JSON
//! object each (see [`format`]); either way no value can break a line or forge one.
//!
//! What this module must never do: hold back a warning or an error behind routine lines.

pub mod format;

pub use format::{install, Format};

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Longest a routine line waits before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Buffered past this many bytes, the flusher is woken at once.
const WAKE_AT: usize = 64 * 1024;

/// Buffered past this many bytes (the sink cannot keep up), the logging thread writes the
/// lines itself rather than let the buffer grow.
const WRITE_AT: usize = 1024 * 1024;

/// A `MakeWriter` for `tracing_subscriber::fmt` over a sink (stderr in `main`).
pub struct Buffered<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
}

impl<W: Write + Send + 'static> Clone for Buffered<W> {
    fn clone(&self) -> Self {
        Buffered { shared: self.shared.clone() }
    }
}

struct Shared<W> {
    state: Mutex<State<W>>,
    wake: Condvar,
    /// How a risky character is escaped: `\u{..}` in text, `\uXXXX` in JSON (where the
    /// former would not parse).
    format: Format,
}

struct State<W> {
    pending: Vec<u8>,
    sink: W,
    closed: bool,
}

impl<W: Write> State<W> {
    fn write_out(&mut self) {
        if !self.pending.is_empty() {
            // Nowhere to report a failure to write the log: the lines are dropped.
            let _ = self.sink.write_all(&self.pending);
            let _ = self.sink.flush();
            self.pending.clear();
        }
    }
}

impl<W: Write + Send + 'static> Buffered<W> {
    /// A writer of text lines over `sink` and the thread that flushes it every `every`.
    pub fn new(sink: W, every: Duration) -> Buffered<W> {
        Buffered::with_format(sink, every, Format::Text)
    }

    /// A writer over `sink` for lines in `format`, and the thread that flushes it every
    /// `every`.
    pub fn with_format(sink: W, every: Duration, format: Format) -> Buffered<W> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { pending: Vec::with_capacity(WAKE_AT), sink, closed: false }),
            wake: Condvar::new(),
            format,
        });
        let weak = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new().name("membersync-log".into()).spawn(move || loop {
            let Some(shared) = weak.upgrade() else { return };
            let Ok(state) = shared.state.lock() else { return };
            let Ok((mut state, _)) = shared.wake.wait_timeout(state, every) else { return };
            state.write_out();
            if state.closed {
                return;
            }
        });
        let buffered = Buffered { shared };
        if spawned.is_err() {
            // No thread: every line is written at once.
            buffered.close();
        }
        buffered
    }

    /// Writes out every line logged so far.
    pub fn flush(&self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.write_out();
        }
    }

    /// Writes out what is buffered and from then on every line at once (the flusher ends).
    pub fn close(&self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.write_out();
            state.closed = true;
        }
        self.shared.wake.notify_one();
    }
}

/// Appends one formatted line to `out` with every character that could forge a line or
/// restyle a terminal escaped — line breaks (`\n`, `\r`, U+0085, U+2028, U+2029), other
/// control characters (ESC among them) and bidirectional overrides — whichever value of
/// whichever log call carried it (an event id, a provider's answer, an error quoting
/// either); only the line's own final newline stays. In a JSON line the escape is JSON's
/// (`\uXXXX`), so the line still parses and the value reads back as it was.
fn escape_into(buf: &[u8], out: &mut Vec<u8>, format: Format) {
    let (body, end) = match buf.split_last() {
        Some((b'\n', body)) => (body, "\n"),
        _ => (buf, ""),
    };
    // Bytes that start nothing to escape: ASCII printable and tab, and UTF-8 lead bytes other
    // than 0xC2 (C1 controls) and 0xE2 (U+2028.., U+202A.., U+2066..).
    let plain = |b: &u8| matches!(*b, 0x20..=0x7e | b'\t') || (*b >= 0x80 && *b != 0xc2 && *b != 0xe2);
    if body.iter().all(plain) {
        out.extend_from_slice(buf);
        return;
    }
    let text = String::from_utf8_lossy(body);
    for c in text.chars() {
        if risky(c) && format == Format::Json {
            // Within a string: JSON's own structure is ASCII, and `serde_json` has already
            // escaped what JSON requires (below U+0020, `"` and `\`).
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.extend(format!("\\u{unit:04x}").bytes());
            }
        } else if risky(c) {
            out.extend(c.escape_debug().to_string().bytes());
        } else {
            let mut b = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
        }
    }
    out.extend_from_slice(end.as_bytes());
}

/// A character that could break a line, forge one, reorder what a reader sees or hide
/// text from one: line breaks, other control characters but tab, bidirectional marks and
/// overrides, zero-width and other invisible format characters, and the tag characters
/// (which can spell out text no one sees).
fn risky(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

/// Text as one line for a reader that takes lines as structure (an assistant reading a
/// tool's answer): every risky character escaped, at most `max_chars` characters written
/// (escapes counted), the rest cut with `…`.
pub fn one_line(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars * 4));
    let mut written = 0;
    for c in s.chars() {
        let escaped: Option<std::char::EscapeDebug> = risky(c).then(|| c.escape_debug());
        let width = escaped.as_ref().map_or(1, |e| e.clone().count());
        if written + width > max_chars {
            out.push('…');
            break;
        }
        written += width;
        match escaped {
            Some(e) => out.extend(e),
            None => out.push(c),
        }
    }
    out
}

/// One line (as `fmt` writes it: whole, in one `write_all`).
pub struct Line<'a, W> {
    shared: &'a Shared<W>,
    urgent: bool,
}

impl<W: Write> Write for Line<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self.shared.state.lock().map_err(|_| std::io::Error::other("log writer poisoned"))?;
        escape_into(buf, &mut state.pending, self.shared.format);
        if self.urgent || state.closed || state.pending.len() >= WRITE_AT {
            state.write_out();
        } else if state.pending.len() >= WAKE_AT {
            self.shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + Send + 'static> MakeWriter<'a> for Buffered<W> {
    type Writer = Line<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        Line { shared: &self.shared, urgent: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Line { shared: &self.shared, urgent: *meta.level() <= Level::WARN }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    /// A sink the test can read while the writer owns it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn log(w: &Buffered<Sink>, level: Level, text: &str) {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(w.clone())
            .with_max_level(Level::TRACE)
            .without_time()
            .with_target(false)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || match level {
            Level::ERROR => tracing::error!("{text}"),
            Level::WARN => tracing::warn!("{text}"),
            Level::INFO => tracing::info!("{text}"),
            Level::DEBUG => tracing::debug!("{text}"),
            _ => tracing::trace!("{text}"),
        });
    }

    /// Routine lines wait for the flusher; a warning takes them out with it, in order.
    #[test]
    fn routine_lines_wait_and_a_warning_writes_everything_before_it_in_order() {
        let sink = Sink::default();
        // A flusher that would not run within the test on its own.
        let w = Buffered::new(sink.clone(), Duration::from_secs(3600));
        log(&w, Level::INFO, "first");
        log(&w, Level::DEBUG, "second");
        assert_eq!(sink.text(), "", "routine lines are buffered");
        log(&w, Level::WARN, "third");
        let text = sink.text();
        let at = |l: &str| text.find(l).unwrap_or_else(|| panic!("`{l}` not written: {text}"));
        assert!(at("first") < at("second") && at("second") < at("third"), "{text}");
        log(&w, Level::INFO, "fourth");
        assert!(!sink.text().contains("fourth"));
        w.flush();
        assert!(sink.text().contains("fourth"));
        log(&w, Level::ERROR, "fifth");
        assert!(sink.text().contains("fifth"), "errors go out at once");
    }

    /// The flusher writes routine lines out on its own, within its interval.
    #[test]
    fn the_flusher_writes_routine_lines_by_itself() {
        let sink = Sink::default();
        let w = Buffered::new(sink.clone(), Duration::from_millis(10));
        log(&w, Level::INFO, "routine");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !sink.text().contains("routine") {
            assert!(std::time::Instant::now() < deadline, "the flusher never wrote the line");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// After `close`, nothing is buffered: a line is written as it is logged.
    #[test]
    fn after_close_every_line_is_written_at_once() {
        let sink = Sink::default();
        let w = Buffered::new(sink.clone(), Duration::from_secs(3600));
        log(&w, Level::INFO, "before");
        w.close();
        assert!(sink.text().contains("before"));
        log(&w, Level::INFO, "after");
        assert!(sink.text().contains("after"));
        let mut line = w.make_writer();
        line.write_all(b"plain\n").unwrap();
        assert!(sink.text().ends_with("plain\n"));
    }
}

/// How often each kind of unauthenticated failure is written to the log at most.
pub const FAILURE_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// When each kind of unauthenticated failure (bad signature, unknown target…) was last
/// written to the log, and how many were held back since: anyone can send them, so each one
/// must not cost a flushed line.
#[derive(Debug, Default)]
pub struct Throttle(std::sync::Mutex<std::collections::HashMap<&'static str, (std::time::Instant, u64)>>);

impl Throttle {
    /// Whether a WARN line for `cause` may be written now: the first in each
    /// [`FAILURE_LOG_INTERVAL`] is, with how many of its kind were held back since the last
    /// one written; the others are only counted.
    pub fn first_in_interval(&self, cause: &'static str) -> Option<u64> {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match seen.get_mut(cause) {
            Some((at, held)) if now.duration_since(*at) < FAILURE_LOG_INTERVAL => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let n = *held;
                (*at, *held) = (now, 0);
                Some(n)
            }
            None => {
                seen.insert(cause, (now, 0));
                Some(0)
            }
        }
    }
}

/// A value taken from a request (a URL segment, a header, an id), as a log line may show
/// it: control characters — a newline that would forge a line, an ANSI escape — escaped,
/// and at most 200 characters.
pub fn shown(s: impl AsRef<str>) -> String {
    let s = s.as_ref();
    let mut out: String = s.chars().take(200).flat_map(char::escape_debug).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod shown_tests {
    #[test]
    fn a_written_line_keeps_its_own_newline_and_escapes_every_other_break_or_control() {
        let line = |s: &str| {
            let mut out = Vec::new();
            super::escape_into(s.as_bytes(), &mut out, super::Format::Text);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(line("INFO plain line é ü 名\n"), "INFO plain line é ü 名\n");
        assert_eq!(line("a\tb\n"), "a\tb\n", "tabs stay");
        assert_eq!(line("id=x\nERROR forged\n"), "id=x\\nERROR forged\n");
        assert_eq!(line("x\r\u{1b}[31m\u{85}\u{2028}\u{202e}y\n"), "x\\r\\u{1b}[31m\\u{85}\\u{2028}\\u{202e}y\n");
        assert_eq!(line("no newline"), "no newline");
        assert_eq!(line("— “quotes” stay\n"), "— “quotes” stay\n", "other U+20xx characters stay");
    }

    #[test]
    fn a_json_line_stays_json_and_reads_back_the_value_it_was_given() {
        let hostile = "x\u{85}\u{2028}\u{202e}\u{7f}\u{e0041}\u{200b}é名y";
        let line = format!("{}\n", serde_json::json!({ "fields": { "tenant": hostile } }));
        let mut out = Vec::new();
        super::escape_into(line.as_bytes(), &mut out, super::Format::Json);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(out.ends_with('\n') && !out.contains('\u{2028}') && !out.contains('\u{85}'), "{out}");
        assert!(out.contains(r"\udb40\udc41"), "a character past U+FFFF as a surrogate pair: {out}");
        let back: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(back["fields"]["tenant"], hostile);
    }

    #[test]
    fn request_values_cannot_forge_lines_or_colour_the_log() {
        assert_eq!(super::shown("demo"), "demo");
        assert_eq!(super::shown("demo\nFORGED WARN"), "demo\\nFORGED WARN");
        assert_eq!(super::shown("x\u{1b}[31mred"), "x\\u{1b}[31mred");
        assert_eq!(super::shown("a".repeat(500)).chars().count(), 201);
    }
}
