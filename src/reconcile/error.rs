//! Why reconciling a membership stopped short of a comparison: the provider could not be
//! read (`Unreachable`, the membership's sync status becomes `provider_unreachable`), or
//! the request could not be made for it (`MissingValue`, the membership is not asked).
//!
//! What this module must never do: carry the API key or a header value in a message; the
//! messages are stored and shown.

/// The provider's view could not be had: nothing changes but the sync status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unreachable {
    #[error("invalid header name `{0}`")]
    HeaderName(String),
    #[error("header `{0}` has an invalid value")]
    HeaderValue(String),
    #[error("no answer within {secs:.1} s ({request})")]
    Timeout { secs: f64, request: String },
    #[error("request failed ({request}): {cause}")]
    Transport { request: String, cause: String },
    #[error("429 Too Many Requests: waiting as asked (Retry-After) would take {wait_secs} s in all, longer than the {max_secs} s a request waits ({request})")]
    WaitTooLong { wait_secs: u64, max_secs: u64, request: String },
    #[error("still 429 Too Many Requests after {tries} waits ({request})")]
    StillTooMany { tries: usize, request: String },
    #[error("HTTP {status} from {request}: {excerpt}")]
    Status { status: String, request: String, excerpt: String },
    #[error("the answer is not JSON: {0}")]
    NotJson(String),
    #[error("no {0} to select with")]
    NothingToSelectWith(String),
    #[error("the answer has no list at `{0}`")]
    NoList(String),
    #[error("the answer's `{list}` lists no item with {key} = {want}")]
    NoItem { list: String, key: String, want: String },
    #[error("no status extractor")]
    NoStatusReader,
    #[error("the answer has no status at `{0}`")]
    NoStatus(String),
    /// A field of the answer that is not of its type.
    #[error("{field}: {problem}")]
    Field { field: &'static str, problem: String },
}

/// A template names a value this membership has not (`{customer_id}`, say).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the request needs {0}, which this membership has not")]
pub struct MissingValue(pub String);
