//! The consume loop: fetch a batch, normalize, insert every row in one transaction, then ack.
//!
//! Delivery is at least once (a crash between commit and ack redelivers the batch); the unique
//! `dedupe_key` makes the insert idempotent, so the table sees each event exactly once.
//!
//! Two kinds of failure, handled apart. The database refusing a message's own data: the batch
//! is stored one message at a time, and a message refused `max_attempts` times goes to the dead
//! letters. The database being unavailable (down, out of disk space, read-only, failing I/O):
//! the worker keeps the batch in hand, stops fetching, and retries with backoff until it is
//! back; no delivery attempt is spent on an outage, and nothing is dead-lettered for one.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::DEFAULT_TASK;
use crate::health::{with_causes, Backoff, Health, Part};
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
    /// Longest wait between two tries while the store or the queue is unavailable: short, so
    /// that the service recovers within seconds of the fault going away.
    pub max_outage_backoff: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            task_name: DEFAULT_TASK.to_owned(),
            batch_size: 256,
            max_attempts: 10,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(60),
            max_outage_backoff: Duration::from_secs(5),
        }
    }
}

/// A worker bound to one broker and one store.
pub struct Worker {
    broker: Broker,
    store: Arc<dyn Store>,
    cfg: WorkerConfig,
    health: Arc<Health>,
    /// Acks that fail (the queue's disk is full, say) repeat for every batch: logged through
    /// this, once and then in summaries.
    acks: Part,
}

/// Messages decoded and waiting to be stored: `rows[ends[i-1]..ends[i]]` are `good[i]`'s.
struct Decoded {
    good: Vec<Delivery>,
    ends: Vec<usize>,
    rows: Vec<NewCallback>,
}

impl Decoded {
    /// The rows of `good[i..j]`.
    fn rows(&self, i: usize, j: usize) -> &[NewCallback] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        let end = if j == 0 { 0 } else { self.ends[j - 1] };
        &self.rows[start..end]
    }
}

impl Worker {
    /// Creates a worker (reporting to a health record of its own; see [`Worker::with_health`]).
    pub fn new(broker: Broker, store: Arc<dyn Store>, cfg: WorkerConfig) -> Self {
        Worker {
            broker,
            store,
            cfg,
            health: Arc::default(),
            acks: Part::new("acks"),
        }
    }

    /// Reports the store's and the worker's state to `health` (what `/health` reads).
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = health;
        self
    }

    /// Runs until `shutdown` fires; the batch in hand is finished (stored and acked) first,
    /// unless the store is unavailable: then it is handed back to the queue.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut fetch_backoff = self.outage_backoff();
        while !shutdown.is_cancelled() {
            let fetched = tokio::select! {
                r = self.broker.fetch(self.cfg.batch_size, Duration::from_secs(1)) => r,
                () = shutdown.cancelled() => break,
            };
            match fetched {
                Ok(batch) => {
                    fetch_backoff.reset();
                    if batch.is_empty() {
                        // Idle and able to fetch: nothing is stuck.
                        self.health.worker.ok();
                    } else {
                        self.process(batch, &shutdown).await;
                    }
                }
                Err(e) => {
                    self.health.worker.failed(&e);
                    tokio::select! {
                        () = tokio::time::sleep(fetch_backoff.next_wait()) => {}
                        () = shutdown.cancelled() => break,
                    }
                }
            }
        }
        tracing::info!("worker stopped");
    }

    /// Stores one batch and settles every message in it: acked, retried or dead-lettered; or,
    /// when `shutdown` fires while the store is unavailable, handed back to the queue.
    pub async fn process(&self, batch: Vec<Delivery>, shutdown: &CancellationToken) {
        let span = tracing::info_span!("batch", messages = batch.len());
        self.settle(batch, shutdown).instrument(span).await;
    }

    async fn settle(&self, batch: Vec<Delivery>, shutdown: &CancellationToken) {
        let mut d = Decoded {
            good: Vec::with_capacity(batch.len()),
            ends: Vec::with_capacity(batch.len()),
            rows: Vec::new(),
        };
        for m in batch {
            match self.decode(&m) {
                Ok(r) => {
                    d.rows.extend(r);
                    d.ends.push(d.rows.len());
                    d.good.push(m);
                }
                Err(e) => self.dead_letter(&m, &with_causes(&e)).await,
            }
        }
        // `good[from..]` are still to store; they stay in hand while the store is unavailable.
        let mut from = 0;
        let mut backoff = self.outage_backoff();
        while from < d.good.len() {
            let Err((left, e)) = self.store_from(&d, from).await else {
                self.health.worker.ok();
                return;
            };
            from = left;
            self.health.store.failed(&e);
            self.health.worker.failed(&e);
            tokio::select! {
                () = tokio::time::sleep(backoff.next_wait()) => {}
                () = shutdown.cancelled() => {
                    // Handed back at once for whoever consumes next: still no attempt spent
                    // beyond the delivery in hand.
                    if let Err(e) = self.broker.retry(&d.good[from..], Duration::ZERO).await {
                        tracing::warn!(
                            error = &e as &dyn std::error::Error,
                            "could not hand the batch back; it is redelivered when its lease ends"
                        );
                    }
                    return;
                }
            }
        }
    }

    /// Stores `good[from..]`, then acks it; when the batch's data is refused, one message at a
    /// time. On an outage, returns where storing stopped and why: the messages from there on
    /// are neither acked nor retried (still in hand).
    async fn store_from(&self, d: &Decoded, from: usize) -> Result<(), (usize, StoreError)> {
        let n = d.good.len();
        let e = match self.store.insert_batch(d.rows(from, n)).await {
            Ok(inserted) => {
                self.health.store.ok();
                let events = d.rows(from, n).len();
                tracing::info!(
                    messages = n - from,
                    events,
                    inserted,
                    duplicates = events as u64 - inserted,
                    "batch stored"
                );
                self.ack(&d.good[from..]).await;
                return Ok(());
            }
            Err(e) if !e.is_data_error() => return Err((from, e)),
            Err(e) => e,
        };
        // The database answers, and refused this data.
        self.health.store.ok();
        if n - from == 1 {
            self.failed(vec![d.good[from].clone()], &e).await;
            return Ok(());
        }
        // One message's data was refused; store the others one by one so a single bad message
        // cannot hold the whole batch back.
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "batch refused by the database; storing one by one"
        );
        for i in from..n {
            match self.store.insert_batch(d.rows(i, i + 1)).await {
                Ok(_) => self.ack(std::slice::from_ref(&d.good[i])).await,
                Err(e) if e.is_data_error() => self.failed(vec![d.good[i].clone()], &e).await,
                Err(e) => return Err((i, e)),
            }
        }
        Ok(())
    }

    /// Backoff between tries while something is unavailable.
    fn outage_backoff(&self) -> Backoff {
        Backoff::new(self.cfg.base_backoff, self.cfg.max_outage_backoff)
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
        match self.broker.ack(done).await {
            Ok(()) => self.acks.ok(),
            // The rows are committed; redelivery will find them and insert nothing.
            Err(e) => self.acks.failed(&e),
        }
    }

    /// Retries messages whose data the database refused, or dead-letters those out of attempts.
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
            "data refused by the database; retrying"
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
