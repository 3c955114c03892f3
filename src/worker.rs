//! The consume loop: fetch a batch, normalize, insert every row in one transaction, then ack.
//!
//! Delivery is at least once (a crash between commit and ack redelivers the batch); the unique
//! `dedupe_key` makes the insert idempotent, so the table sees each event exactly once.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::DEFAULT_TASK;
use crate::infobip::{self, NewCallback, PayloadError};
use crate::queue::celery::{self, BodyError};
use crate::queue::{Broker, Delivery};
use crate::store::{Store, StoreError};

/// Why a message can never be stored: it is dead-lettered at once, with this as the reason.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// A task this worker does not handle (another application's, on a shared queue).
    #[error("unknown task name `{got}` (this worker handles `{expected}`)")]
    UnknownTask { got: String, expected: String },
    /// The body is not Celery's `[args, kwargs, embed]` with one payload.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The payload is not an Infobip callback.
    #[error("payload rejected")]
    Payload(#[from] PayloadError),
}

/// `error` followed by its causes, `: `-separated: a dead letter's reason is read on its own,
/// without the log. A cause whose text the message already ends with (sqlx repeats its
/// database error's text in its own message) is not repeated.
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Task name this worker handles; other names are dead-lettered.
    pub task_name: String,
    /// Messages fetched per batch.
    pub batch_size: usize,
    /// Deliveries before a message that keeps failing is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; doubled per attempt, with jitter, up to `max_backoff`.
    pub base_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            task_name: DEFAULT_TASK.to_owned(),
            batch_size: 256,
            max_attempts: 10,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// A worker bound to one broker and one store.
pub struct Worker {
    broker: Broker,
    store: Arc<dyn Store>,
    cfg: WorkerConfig,
}

impl Worker {
    /// Creates a worker.
    pub fn new(broker: Broker, store: Arc<dyn Store>, cfg: WorkerConfig) -> Self {
        Worker { broker, store, cfg }
    }

    /// Runs until `shutdown` fires; the batch in hand is finished (stored and acked) first.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut broker_failures = 0u32;
        while !shutdown.is_cancelled() {
            let fetched = tokio::select! {
                r = self.broker.fetch(self.cfg.batch_size, Duration::from_secs(1)) => r,
                () = shutdown.cancelled() => break,
            };
            match fetched {
                Ok(batch) => {
                    broker_failures = 0;
                    if !batch.is_empty() {
                        self.process(batch).await;
                    }
                }
                Err(e) => {
                    broker_failures = broker_failures.saturating_add(1);
                    let wait = self.backoff(broker_failures);
                    tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        retry_in = ?wait,
                        "fetch failed"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => break,
                    }
                }
            }
        }
        tracing::info!("worker stopped");
    }

    /// Stores one batch and settles every message in it: acked, retried or dead-lettered.
    pub async fn process(&self, batch: Vec<Delivery>) {
        let span = tracing::info_span!("batch", messages = batch.len());
        self.settle(batch).instrument(span).await;
    }

    async fn settle(&self, batch: Vec<Delivery>) {
        let mut rows: Vec<NewCallback> = Vec::new();
        let mut good: Vec<Delivery> = Vec::with_capacity(batch.len());
        // `rows[ends[i-1]..ends[i]]` are the rows of `good[i]`.
        let mut ends: Vec<usize> = Vec::with_capacity(batch.len());
        for d in batch {
            match self.decode(&d) {
                Ok(r) => {
                    rows.extend(r);
                    ends.push(rows.len());
                    good.push(d);
                }
                Err(e) => self.dead_letter(&d, &with_causes(&e)).await,
            }
        }
        if good.is_empty() {
            return;
        }
        match self.store.insert_batch(&rows).await {
            Ok(inserted) => {
                let duplicates = rows.len() as u64 - inserted;
                tracing::info!(
                    messages = good.len(),
                    events = rows.len(),
                    inserted,
                    duplicates,
                    "batch stored"
                );
                self.ack(&good).await;
            }
            Err(e) if e.is_data_error() && good.len() > 1 => {
                // One message's data was refused; store the others one by one so a single bad
                // message cannot hold the whole batch back.
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "batch refused by the database; storing one by one"
                );
                let mut start = 0;
                for (d, end) in good.into_iter().zip(ends) {
                    match self.store.insert_batch(&rows[start..end]).await {
                        Ok(_) => self.ack(std::slice::from_ref(&d)).await,
                        Err(e) => self.failed(vec![d], &e).await,
                    }
                    start = end;
                }
            }
            Err(e) => self.failed(good, &e).await,
        }
    }

    /// Parks a message on the dead-letter queue with `reason`.
    async fn dead_letter(&self, d: &Delivery, reason: &str) {
        tracing::error!(task_id = %d.task_id, %reason, "dead-lettering message");
        if let Err(e) = self.broker.dead_letter(d, reason).await {
            // Not acked either: the message comes back and we try again.
            tracing::error!(
                task_id = %d.task_id,
                error = &e as &dyn std::error::Error,
                "dead-letter failed"
            );
        }
    }

    async fn ack(&self, done: &[Delivery]) {
        if let Err(e) = self.broker.ack(done).await {
            // The rows are committed; redelivery will find them and insert nothing.
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "ack failed; messages will be redelivered"
            );
        }
    }

    /// Retries messages whose rows could not be stored, or dead-letters those out of attempts.
    async fn failed(&self, batch: Vec<Delivery>, error: &StoreError) {
        let (exhausted, again): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|d| d.attempts >= self.cfg.max_attempts);
        for d in &exhausted {
            let reason = format!(
                "gave up after {} attempts: {}",
                d.attempts,
                with_causes(error)
            );
            self.dead_letter(d, &reason).await;
        }
        if again.is_empty() {
            return;
        }
        let attempts = again.iter().map(|d| d.attempts).max().unwrap_or(1);
        let wait = self.backoff(attempts);
        tracing::warn!(
            error = error as &dyn std::error::Error,
            messages = again.len(),
            retry_in = ?wait,
            "store failed; retrying"
        );
        if let Err(e) = self.broker.retry(&again, wait).await {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "could not schedule retry; messages will be redelivered"
            );
        }
    }

    /// A message's rows, or why it can never be stored.
    fn decode(&self, d: &Delivery) -> Result<Vec<NewCallback>, DecodeError> {
        if d.task != self.cfg.task_name {
            return Err(DecodeError::UnknownTask {
                got: d.task.clone(),
                expected: self.cfg.task_name.clone(),
            });
        }
        let args = celery::decode_body(&d.body)?;
        let received = args.received_at.unwrap_or_else(Utc::now);
        Ok(infobip::normalize(args.payload, received)?)
    }

    /// Exponential backoff with full jitter in the upper half: `base * 2^(n-1)`, capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .cfg
            .base_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.cfg.max_backoff);
        let half = cap / 2;
        half + cap.mul_f64(rand::thread_rng().gen_range(0.0..0.5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that repeats its cause's text in its own message, as sqlx's database errors do.
    #[derive(Debug, Error)]
    #[error("error returned from database: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn reasons_carry_their_causes_once() {
        let e = DecodeError::from(PayloadError::BadNotificationType);
        assert_eq!(
            with_causes(&e),
            "payload rejected: `notificationType` must be a non-empty string"
        );
        let json = serde_json::from_slice::<serde_json::Value>(b"nope").unwrap_err();
        let e = DecodeError::from(BodyError::NotJson(json));
        assert_eq!(
            with_causes(&e),
            "task body is not JSON: expected ident at line 1 column 2"
        );
        let e = Repeats(std::io::Error::other("poison refused"));
        assert_eq!(
            with_causes(&e),
            "error returned from database: poison refused"
        );
    }
}
