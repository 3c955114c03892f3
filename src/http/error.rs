//! Every way a request can fail, and its HTTP status, in one place.

use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use thiserror::Error;

use crate::infobip::PayloadError;
use crate::queue::QueueError;

/// Seconds a client is asked to wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "5";

/// An error answered to an HTTP client.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("the request body is empty: send an Infobip callback as JSON")]
    EmptyBody,
    #[error("the request body is not valid UTF-8 (invalid byte at offset {0})")]
    InvalidUtf8(usize),
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(#[from] serde_json::Error),
    #[error("{0}")]
    NotACallback(#[from] PayloadError),
    #[error("the request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("could not read the request body: {0}")]
    BadBody(String),
    #[error("missing or invalid credentials")]
    Unauthorized { basic: bool },
    #[error("the request was not completed within the deadline (a slow or stalled body?)")]
    Timeout,
    #[error("no such route: mailhook serves POST /email and GET /health")]
    NotFound,
    #[error("method not allowed: send callbacks with POST /email")]
    MethodNotAllowed,
    #[error("the service is busy; retry later")]
    Overloaded,
    #[error("the queue is unavailable; retry later")]
    QueueUnavailable,
}

impl ApiError {
    /// Maps a body-extraction failure, turning axum's plain-text 413 into our JSON one.
    pub fn from_body_rejection(r: BytesRejection, limit: usize) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(limit)
        } else {
            ApiError::BadBody(r.body_text())
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::EmptyBody
            | ApiError::InvalidUtf8(_)
            | ApiError::InvalidJson(_)
            | ApiError::BadBody(_) => StatusCode::BAD_REQUEST,
            ApiError::NotACallback(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Overloaded | ApiError::QueueUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::EmptyBody => "empty_body",
            ApiError::InvalidUtf8(_) => "invalid_utf8",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::NotACallback(_) => "not_an_infobip_callback",
            ApiError::TooLarge(_) => "body_too_large",
            ApiError::BadBody(_) => "bad_body",
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::Timeout => "timeout",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Overloaded => "overloaded",
            ApiError::QueueUnavailable => "queue_unavailable",
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Overloaded(why) => {
                tracing::warn!(reason = why, "shedding load");
                ApiError::Overloaded
            }
            other => {
                // Internal detail goes to the log, not to the caller.
                tracing::error!(error = &other as &dyn std::error::Error, "publish failed");
                ApiError::QueueUnavailable
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = json!({ "error": self.to_string(), "kind": self.kind() });
        if let ApiError::InvalidJson(e) = &self {
            body["line"] = json!(e.line());
            body["column"] = json!(e.column());
        }
        if status.is_client_error() {
            tracing::info!(status = status.as_u16(), error = %self, "callback refused");
        }
        let mut resp = (status, Json(body)).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::Overloaded | ApiError::QueueUnavailable => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
            }
            ApiError::Unauthorized { basic: true } => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Basic realm="mailhook", charset="UTF-8""#),
                );
            }
            _ => {}
        }
        resp
    }
}
