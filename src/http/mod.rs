//! The HTTP API: the router, one module per resource, errors mapped in `error.rs`.

pub mod auth;
pub mod email;
pub mod error;
pub mod health;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::health::Health;
use crate::queue::Broker;
use auth::Auth;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Where accepted callbacks go.
    pub broker: Broker,
    /// Celery task name put on each message.
    pub task_name: Arc<str>,
    /// Queue name, echoed in the 202 body.
    pub queue: Arc<str>,
    /// Largest accepted body, in bytes.
    pub body_limit: usize,
    /// Permits for callbacks in flight: when none is left, shed load (503) rather than queue.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// What the queue, the store and the worker last recorded (read by `/health`).
    pub health: Arc<Health>,
    /// Whether this process runs a worker (`/health` reports the store and worker only then).
    pub worker: bool,
}

/// Builds the router with no authentication (anyone may post): for tests and embedding.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    authenticated_router(state, request_timeout, Arc::default())
}

/// Builds the router; `POST /email` requires the credentials in `auth`, `/health` stays open.
pub fn authenticated_router(state: AppState, request_timeout: Duration, auth: Arc<Auth>) -> Router {
    let limit = state.body_limit;
    // The auth middleware wraps the handler only, and the handler is what reads the body (the
    // layers outside it read nothing): a refused request is answered from its headers alone,
    // so an unauthenticated sender cannot make us buffer up to `body_limit`.
    let email = post(email::receive)
        .route_layer(from_fn_with_state(auth, auth::require))
        .route_layer(from_fn_with_state(state.in_flight.clone(), shed_load));
    Router::new()
        .route("/email", email)
        .route("/health", get(health::health))
        .route("/health/live", get(health::live))
        .fallback(|| async { error::ApiError::NotFound })
        .method_not_allowed_fallback(|| async { error::ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(axum::middleware::map_response(json_timeout))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Holds one in-flight permit for the whole request, or answers 503 at once when there is none:
/// a slow queue then costs a bounded number of buffered bodies, not unbounded memory.
async fn shed_load(
    axum::extract::State(permits): axum::extract::State<Arc<tokio::sync::Semaphore>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match permits.try_acquire() {
        Ok(_permit) => next.run(req).await,
        Err(_) => error::ApiError::from(crate::queue::QueueError::Overloaded(
            "too many callbacks in flight",
        ))
        .into_response(),
    }
}

/// The timeout layer answers with an empty 408; give it the same JSON error body as the rest.
async fn json_timeout(resp: Response) -> Response {
    if resp.status() == StatusCode::REQUEST_TIMEOUT {
        error::ApiError::Timeout.into_response()
    } else {
        resp
    }
}
