//! The one status table: every error the HTTP layer can answer, and its status code.
//! A 500 is opaque to the caller; the error itself is logged.
//!
//! What this module must never do: show a 500's cause to the caller, or let a handler
//! choose a status itself.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

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
            crate::store::Error::Busy | crate::store::Error::Closed | crate::store::Error::Failed(_) => ApiError::Busy,
            other => ApiError::Internal(other.to_string()),
        }
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
        let body = match &self {
            // What was wrong, every problem, and the version still in force.
            ApiError::ReloadRefused { version, errors } => {
                json!({ "error": message, "ok": false, "version": version, "errors": errors })
            }
            ApiError::Unhealthy(_) => json!({ "status": "failed", "error": message }),
            _ => json!({ "error": message }),
        };
        let mut resp = (status, Json(body)).into_response();
        if matches!(self, ApiError::Busy) {
            resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}
