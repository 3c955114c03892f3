//! `POST /email`: validate, queue durably, answer 202.

use std::borrow::Cow;
use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::infobip;
use crate::json;
use crate::queue::TaskMessage;

/// Message ids logged per callback at info; the rest are counted.
const LOGGED_IDS: usize = 5;

/// Accepts one Infobip callback and answers once it is durably queued.
pub async fn receive(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Queued>), ApiError> {
    let received_at = Utc::now();
    let body = body.map_err(|r| ApiError::from_body_rejection(r, state.body_limit))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::EmptyBody);
    }
    if let Err(e) = std::str::from_utf8(&body) {
        return Err(ApiError::InvalidUtf8(e.valid_up_to()));
    }
    // Checked as strictly as a `Value` parse (escapes, numbers, 128 levels), then read lazily:
    // the members an event needs are read from the borrowed text.
    let payload = json::read_json(&body)?;
    let callback = infobip::parse(payload)?;

    let msg = TaskMessage::for_payload(&state.task_name, &body, received_at);
    let mut statuses: BTreeMap<Cow<'_, str>, usize> = BTreeMap::new();
    for e in &callback.events {
        *statuses.entry(e.status()).or_default() += 1;
    }
    let ids: Vec<String> = callback
        .events
        .iter()
        .take(LOGGED_IDS)
        .map(infobip::Event::message_id)
        .collect();
    state.broker.publish(&msg).await?;
    tracing::info!(
        task_id = %msg.id,
        events = callback.events.len(),
        ?statuses,
        message_ids = ?ids,
        more_ids = callback.events.len().saturating_sub(LOGGED_IDS),
        "callback accepted"
    );
    tracing::debug!(task_id = %msg.id, payload = %String::from_utf8_lossy(&body), "callback payload");
    Ok((
        StatusCode::ACCEPTED,
        Json(Queued {
            status: "queued",
            events: callback.events.len(),
            task_id: msg.id,
            queue: state.queue.clone(),
        }),
    ))
}

/// The 202 body: `{"status": "queued", "task_id": ..., "events": n, "queue": ...}`.
#[derive(Debug, Serialize)]
pub struct Queued {
    status: &'static str,
    task_id: String,
    events: usize,
    queue: std::sync::Arc<str>,
}
