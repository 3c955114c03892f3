//! `GET /health`: can this process take callbacks now, and how are its parts doing;
//! `GET /health/live`: the process runs (for orchestrators that restart on liveness).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::AppState;
use crate::health::{with_causes, Part, Status};

/// Longest wait for the broker's answer: `/health` must answer even when the broker does not.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The body of `GET /health`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `ok`; `degraded` (callbacks are accepted, but the store or the worker fails);
    /// `unavailable` (a callback posted now would be refused: 503).
    status: &'static str,
    /// `ok`, or why the queue cannot take a callback now.
    queue: String,
    /// `ok`, the error of the last insert that failed for an outage, or `off` (no worker here).
    store: String,
    /// `ok`, `retrying: <error>`, `stalled: ...` past `--stall-after`, or `off`.
    worker: String,
}

/// 200 when a callback posted now would be queued, 503 (naming the failing part) when not.
/// Reads what the parts last recorded and asks the broker with a deadline: it answers while
/// everything else is wedged.
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Report>) {
    let queue = match tokio::time::timeout(PING_TIMEOUT, state.broker.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(with_causes(&e)),
        Err(_) => Some(format!("the broker did not answer within {PING_TIMEOUT:?}")),
    };
    let (store, worker) = if state.worker {
        let h = &state.health;
        let worker = match h.worker.status() {
            Status::Ok => "ok".to_owned(),
            Status::Failing { error, for_ } if for_ >= h.stall_after => {
                format!("stalled: nothing stored for {}s: {error}", for_.as_secs())
            }
            Status::Failing { error, .. } => format!("retrying: {error}"),
        };
        (text(&h.store), worker)
    } else {
        ("off".to_owned(), "off".to_owned())
    };
    let status = match &queue {
        Some(_) => "unavailable",
        None if store != "ok" && store != "off" || worker != "ok" && worker != "off" => "degraded",
        None => "ok",
    };
    let code = if queue.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let report = Report {
        status,
        queue: queue.unwrap_or_else(|| "ok".to_owned()),
        store,
        worker,
    };
    (code, Json(report))
}

fn text(part: &Part) -> String {
    match part.status() {
        Status::Ok => "ok".to_owned(),
        Status::Failing { error, .. } => error,
    }
}

/// Always 200 while the process can answer at all.
pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "alive"}))
}
