//! The queue seam: one [`Broker`] trait, one file per backend, picked from the URL scheme.
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
use thiserror::Error;

pub use celery::TaskMessage;

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
    /// When it was dead-lettered (RFC 3339, UTC).
    pub failed_at: String,
    /// Size of the task body in bytes.
    pub body_len: usize,
}

/// A durable queue of task messages.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Enqueues `msg`; returns only once the broker has it durably.
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError>;
    /// Takes up to `max` messages, waiting at most `wait` for the first.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError>;
    /// Removes processed messages for good.
    async fn ack(&self, deliveries: &[Delivery]) -> Result<(), QueueError>;
    /// Hands messages back to the queue, to be delivered again after `delay`.
    async fn retry(&self, deliveries: &[Delivery], delay: Duration) -> Result<(), QueueError>;
    /// Moves a message to the dead-letter queue with `reason` (and acks it).
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError>;
    /// Lists up to `limit` dead letters, oldest first.
    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError>;
    /// Puts dead letters back on the queue: the one with `id`, or all when `None`. Returns the count.
    async fn dlq_replay(&self, id: Option<&str>) -> Result<u64, QueueError>;
    /// Puts the dead letters with these ids back on the queue; returns how many were found.
    /// Backends that can move many at once override this.
    async fn dlq_replay_many(&self, ids: &[String]) -> Result<u64, QueueError> {
        let mut n = 0;
        for id in ids {
            match self.dlq_replay(Some(id)).await {
                Ok(k) => n += k,
                Err(QueueError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
    /// Checks that the broker answers.
    async fn ping(&self) -> Result<(), QueueError>;
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
pub async fn connect(cfg: &BrokerConfig) -> Result<Arc<dyn Broker>, QueueError> {
    let scheme = cfg.url.split("://").next().unwrap_or_default();
    match scheme {
        "sqlite" => Ok(Arc::new(sqlite::SqliteBroker::open(cfg).await?)),
        "amqp" | "amqps" => Ok(Arc::new(amqp::AmqpBroker::open(cfg).await?)),
        "redis" | "rediss" => Ok(Arc::new(redis::RedisBroker::open(cfg).await?)),
        _ => Err(QueueError::UnsupportedUrl(scheme.to_owned())),
    }
}
