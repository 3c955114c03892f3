//! `GET /health`: 200 when the queue takes messages, 503 otherwise.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// Reports whether this process can take callbacks right now.
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match state.broker.ping().await {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Err(e) => {
            tracing::warn!(error = &e as &dyn std::error::Error, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "error": "queue unavailable"})),
            )
        }
    }
}
