//! The queue seam. A [`Backend`] per broker (SQLite, Redis, RabbitMQ, one file or folder each,
//! picked from the URL scheme) does the I/O; [`Broker`] wraps any of them and holds the policy
//! they all share, written once here: the fetch loop and its byte budget, the dead-letter time
//! stamp, and replaying dead letters (one, several, or all).
//!
//! Every backend carries the same thing, a Celery protocol-v2 task message (see [`celery`]), so a
//! Python Celery producer or worker can share the queue with mailhook.

pub mod amqp;
pub mod celery;
pub mod redis;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use futures_util::future::BoxFuture;
use thiserror::Error;
use tokio::time::Instant;

pub use celery::TaskMessage;

use crate::health::Part;

/// Bytes of messages one fetch hands out at most (a first message larger than this is taken
/// alone): a batch of large callbacks cannot exhaust the worker's memory. Infobip's largest
/// bucket is about 9 MB, so such a payload still travels, one per batch.
pub const MAX_FETCH_BYTES: usize = 4 << 20;
/// First pause between two empty claims of one fetch; it doubles up to [`POLL_MAX`], so a fresh
/// message is picked up fast and an idle consumer costs little. A backend that knows when
/// messages arrive ([`Backend::ready`]) wakes the fetch before the pause is over.
const POLL_MIN: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(200);
/// Dead letters replayed per backend call when replaying all of them.
const REPLAY_CHUNK: usize = 500;

/// Errors from a queue backend. Each backend's failures keep their cause as the error's source,
/// so a log line shows the chain (`error.sources=[...]`); the HTTP layer answers 503 to all of
/// them and shows callers none.
#[derive(Debug, Error)]
pub enum QueueError {
    /// The embedded SQLite queue failed; the caller may retry later.
    #[error("the embedded SQLite queue failed")]
    Sqlite(#[from] sqlite::Error),
    /// Redis cannot be reached or refused the operation; the caller may retry later.
    #[error("Redis failed")]
    Redis(#[from] redis::Error),
    /// RabbitMQ cannot be reached or refused the operation; the caller may retry later.
    #[error("RabbitMQ failed")]
    Amqp(#[from] amqp::Error),
    /// The broker is reachable but saturated: the caller should back off.
    #[error("queue overloaded: {0}")]
    Overloaded(&'static str),
    /// The URL names no backend we know (only the scheme is kept: URLs carry passwords).
    #[error("unsupported broker URL scheme `{0}://`: expected sqlite://, redis:// or amqp://")]
    UnsupportedUrl(String),
    /// A message or dead letter with this id does not exist.
    #[error("no dead letter with id `{0}`")]
    NotFound(String),
}

/// A message handed to a consumer; it stays owned by the broker until acked.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Backend-specific handle used to ack, retry or dead-letter this delivery.
    pub tag: String,
    /// The Celery task id.
    pub task_id: String,
    /// The Celery task name.
    pub task: String,
    /// The Celery body (`[args, kwargs, embed]` JSON).
    pub body: Vec<u8>,
    /// How many times this message has been delivered, this time included.
    pub attempts: u32,
}

/// A message parked on the dead-letter queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// Identifier for `mailhook dlq replay --id`.
    pub id: String,
    /// The Celery task id.
    pub task_id: String,
    /// The Celery task name.
    pub task: String,
    /// Why the worker gave up.
    pub reason: String,
    /// Delivery attempts made before giving up.
    pub attempts: u32,
    /// When it was dead-lettered; `None` when its record does not say (not written by us).
    #[serde(serialize_with = "failed_at_text")]
    pub failed_at: Option<DateTime<Utc>>,
    /// Size of the task body in bytes.
    pub body_len: usize,
}

/// How every backend writes a dead letter's time: RFC 3339, UTC, milliseconds.
pub(crate) fn time_text(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Reads a time written by [`time_text`] (or any RFC 3339 time).
pub(crate) fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// `dlq list` shows times as the backends store them.
fn failed_at_text<S: serde::Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&time_text(t)),
        None => s.serialize_none(),
    }
}

/// What one broker does; [`Broker`] calls it and holds the policy around it. Slices handed to
/// a backend are never empty.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Enqueues `msg`; returns only once the broker has it durably.
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError>;
    /// Takes the messages ready now, without waiting: up to `max`, and no more than `max_bytes`
    /// of them unless the first alone is larger (then it is taken alone). What is left stays
    /// first in line for the next claim.
    async fn claim(&self, max: usize, max_bytes: usize) -> Result<Vec<Delivery>, QueueError>;
    /// Completes when a claim may find new messages. Armed when called: a message that arrives
    /// between this call and the next claim still completes it. The default never completes,
    /// for backends that cannot be told (the fetch then polls).
    fn ready(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
    /// Removes processed messages for good.
    async fn ack(&self, deliveries: &[Delivery]) -> Result<(), QueueError>;
    /// Hands messages back to the queue, to be delivered again after `delay`.
    async fn retry(&self, deliveries: &[Delivery], delay: Duration) -> Result<(), QueueError>;
    /// Moves a message to the dead-letter queue with `reason` and `failed_at` (and acks it).
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
        failed_at: DateTime<Utc>,
    ) -> Result<(), QueueError>;
    /// Lists up to `limit` dead letters, oldest first.
    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError>;
    /// Puts the dead letters with these ids back on the queue, as new messages (attempts
    /// reset); returns how many it found.
    async fn dlq_replay(&self, ids: &[String]) -> Result<u64, QueueError>;
    /// Checks that the broker answers.
    async fn ping(&self) -> Result<(), QueueError>;
}

/// A durable queue of task messages on any backend: what the API, the worker and the CLI use.
/// Cheap to clone (every clone shares one backend).
#[derive(Clone)]
pub struct Broker {
    backend: Arc<dyn Backend>,
    /// How publishing goes, on any backend (what `/health` and metrics read).
    publishes: Arc<Part>,
}

impl Broker {
    /// A broker on `backend`.
    pub fn new(backend: impl Backend) -> Self {
        Broker {
            backend: Arc::new(backend),
            publishes: Arc::new(Part::new("queue")),
        }
    }

    /// How publishing goes: every publish's outcome is recorded there (a saturated queue,
    /// which sheds load, is not a failure).
    pub fn part(&self) -> Arc<Part> {
        self.publishes.clone()
    }

    /// Enqueues `msg`; returns only once the broker has it durably.
    pub async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        let r = self.backend.publish(msg).await;
        match &r {
            Ok(()) => self.publishes.ok(),
            Err(QueueError::Overloaded(_)) => {}
            Err(e) => self.publishes.failed(e),
        }
        r
    }

    /// Takes up to `max` messages (and about [`MAX_FETCH_BYTES`]), waiting at most `wait` for
    /// the first.
    pub async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        let mut pause = POLL_MIN;
        loop {
            // Armed before the claim, so a message arriving between the two still wakes us.
            let ready = self.backend.ready();
            let got = self.backend.claim(max, MAX_FETCH_BYTES).await?;
            let now = Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let _ = tokio::time::timeout(pause.min(deadline - now), ready).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// Removes processed messages for good.
    pub async fn ack(&self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        self.backend.ack(deliveries).await
    }

    /// Hands messages back to the queue, to be delivered again after `delay`.
    pub async fn retry(&self, deliveries: &[Delivery], delay: Duration) -> Result<(), QueueError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        self.backend.retry(deliveries, delay).await
    }

    /// Moves a message to the dead-letter queue with `reason`, stamped with the time now (and
    /// acks it).
    pub async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        // Milliseconds, as the backends store it, so a listed time is the one stamped.
        let failed_at = Utc::now().trunc_subsecs(3);
        self.backend.dead_letter(delivery, reason, failed_at).await
    }

    /// Lists up to `limit` dead letters, oldest first.
    pub async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.backend.dlq_list(limit).await
    }

    /// Puts the dead letter `id` back on the queue; [`QueueError::NotFound`] when there is none.
    pub async fn dlq_replay(&self, id: &str) -> Result<(), QueueError> {
        match self.backend.dlq_replay(&[id.to_owned()]).await? {
            0 => Err(QueueError::NotFound(id.to_owned())),
            _ => Ok(()),
        }
    }

    /// Puts the dead letters with these ids back on the queue; returns how many were found.
    pub async fn dlq_replay_many(&self, ids: &[String]) -> Result<u64, QueueError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.backend.dlq_replay(ids).await
    }

    /// Puts every dead letter present now back on the queue (not those dead-lettered meanwhile),
    /// in chunks, calling `progress(done, total)` after each; returns how many were replayed.
    pub async fn dlq_replay_all(
        &self,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<u64, QueueError> {
        let ids: Vec<String> = self
            .dlq_list(usize::MAX)
            .await?
            .into_iter()
            .map(|d| d.id)
            .collect();
        let mut replayed = 0;
        let mut done = 0;
        for chunk in ids.chunks(REPLAY_CHUNK) {
            replayed += self.dlq_replay_many(chunk).await?;
            done += chunk.len();
            progress(done, ids.len());
        }
        Ok(replayed)
    }

    /// Checks that the broker answers.
    pub async fn ping(&self) -> Result<(), QueueError> {
        self.backend.ping().await
    }
}

/// Where and how to reach a broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// `sqlite://...`, `redis://...` or `amqp://...`.
    pub url: String,
    /// Queue name (`email-webhook`).
    pub queue: String,
    /// How long a fetched message stays hidden before it is delivered again if not acked.
    pub visibility_timeout: Duration,
    /// Upper bound on messages a consumer holds unacked.
    pub prefetch: u16,
}

impl BrokerConfig {
    /// The dead-letter queue's name: `<queue>.dlq`.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.queue)
    }
}

/// Opens the backend named by the URL scheme.
pub async fn connect(cfg: &BrokerConfig) -> Result<Broker, QueueError> {
    let scheme = cfg.url.split("://").next().unwrap_or_default();
    match scheme {
        "sqlite" => Ok(Broker::new(sqlite::SqliteBackend::open(cfg).await?)),
        "amqp" | "amqps" => Ok(Broker::new(amqp::AmqpBackend::open(cfg).await?)),
        "redis" | "rediss" => Ok(Broker::new(redis::RedisBackend::open(cfg).await?)),
        _ => Err(QueueError::UnsupportedUrl(scheme.to_owned())),
    }
}
