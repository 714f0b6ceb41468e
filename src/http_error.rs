//! The one status table: every error the HTTP layer can answer, and its status code.
//! A 500 is opaque to the caller; the error itself is logged.
//!
//! What this module must never do: show a 500's cause to the caller, or let a handler
//! choose a status itself.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Errors answered over HTTP.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404: no such tenant, or the tenant does not accept this provider.
    #[error("unknown tenant or provider: {0}")]
    UnknownTarget(String),
    /// 401: the signature did not verify.
    #[error("signature rejected: {0}")]
    Unauthorized(String),
    /// 400: the body could not be decoded.
    #[error("undecodable body: {0}")]
    BadRequest(String),
    /// 413: the body is larger than the limit.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// 408: the body did not arrive in time.
    #[error("body not received within {0} s")]
    BodyTimeout(u64),
    /// 400: a request the admin API cannot take; the message says what is wrong.
    #[error("{0}")]
    Invalid(String),
    /// 404: no such member or event.
    #[error("not found")]
    NotFound,
    /// 401: admin token missing or wrong.
    #[error("admin token missing or wrong")]
    AdminUnauthorized,
    /// 403: a tenant's admin token on an endpoint for every tenant.
    #[error("this token may not do that")]
    Forbidden,
    /// 409: the request conflicts with what is stored (an event that may not run again).
    #[error("{0}")]
    Conflict(String),
    /// 422: a reload found problems in the files; the rules in force stay.
    #[error("reload refused: {} problem(s) in the files", .errors.len())]
    ReloadRefused { version: String, errors: Vec<String> },
    /// 503 with Retry-After: the write queue is full.
    #[error("busy, retry later")]
    Busy,
    /// 503: the store hit an I/O error and takes no writes (`/healthz`; restart it).
    #[error("{0}")]
    Unhealthy(String),
    /// 500: anything else (logged, not shown).
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::UnknownTarget(_) | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) | ApiError::AdminUnauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) | ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Busy | ApiError::Unhealthy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::ReloadRefused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<crate::store::Error> for ApiError {
    fn from(e: crate::store::Error) -> Self {
        match e {
            crate::store::Error::Busy
            | crate::store::Error::Closed
            | crate::store::Error::Failed(_)
            | crate::store::Error::Contended => ApiError::Busy,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// The body of every error answer: what went wrong, and for some errors more (a refused
/// reload's problems and the version still in force; a failed store's status).
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    /// `false` on a refused reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// The rule-set version still in force (a refused reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Every problem found (a refused reload), each `file:line:column: message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<String>>,
    /// `failed` when the store takes no writes (`/healthz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl ErrorBody {
    /// The body of an error that says only what went wrong.
    pub fn saying(error: impl Into<String>) -> ErrorBody {
        ErrorBody { error: error.into(), ok: None, version: None, errors: None, status: None }
    }
}

/// `Query`, whose rejection is an [`ApiError`] (400, the error body) rather than text.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `Path`, whose rejection is an [`ApiError`] (400, the error body) rather than text.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::Invalid(r.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        ApiError::Invalid(r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let message = match &self {
            ApiError::Internal(e) => {
                tracing::error!(error = %e, "Internal error.");
                "internal error".to_string()
            }
            other => other.to_string(),
        };
        let mut body = ErrorBody::saying(message);
        match &self {
            // What was wrong, every problem, and the version still in force.
            ApiError::ReloadRefused { version, errors } => {
                body.ok = Some(false);
                body.version = Some(version.clone());
                body.errors = Some(errors.clone());
            }
            ApiError::Unhealthy(_) => body.status = Some("failed".into()),
            _ => {}
        }
        let mut resp = (status, Json(body)).into_response();
        if matches!(self, ApiError::Busy) {
            resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Gives every error answer outside the console the error body. The handlers' errors have it
/// already; this rewrites the rest: the router's own (404 for an unknown path, 405 with
/// `Allow`) and the MCP transport's (415, 406, 405 in text; 400 as a JSON-RPC error). The
/// console passes as it is: its pages are for people.
pub async fn uniform(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let console = req.uri().path() == "/console" || req.uri().path().starts_with("/console/");
    let resp = next.run(req).await;
    let status = resp.status();
    if console || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    let (mut parts, body) = resp.into_parts();
    // Small: an error's body is a message. One too long to be one is not kept.
    let bytes = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let said: Option<serde_json::Value> = if json { serde_json::from_slice(&bytes).ok() } else { None };
    if said.as_ref().is_some_and(|v| v["error"].is_string()) {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    // What the answer said, briefly and on one line: a JSON-RPC error's message, or text.
    let text = match &said {
        Some(v) => v["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| v.to_string()),
        None => String::from_utf8_lossy(&bytes).trim().to_string(),
    };
    let error = match status {
        _ if !text.is_empty() => crate::logging::one_line(&text, 300),
        StatusCode::NOT_FOUND => "no such route".to_string(),
        StatusCode::METHOD_NOT_ALLOWED => {
            "method not allowed on this route (the Allow header names those that are)".to_string()
        }
        other => other.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let body = ErrorBody::saying(error);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, axum::body::Body::from(serde_json::to_vec(&body).unwrap_or_default()))
}

/// The token of an `Authorization: Bearer …` header; the scheme in any case (RFC 9110), the
/// token with surrounding blanks trimmed. Empty when there is none.
pub fn bearer(headers: &axum::http::HeaderMap) -> &str {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or("")
}
