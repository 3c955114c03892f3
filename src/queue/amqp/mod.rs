//! RabbitMQ (AMQP 0.9.1) backend, speaking Celery's protocol v2 so Python Celery can share the queue.
//!
//! Topology is declared exactly as kombu declares a Celery queue created by name (exchange `<queue>`
//! direct durable, queue `<queue>` durable with no arguments, bound with routing key `<queue>`):
//! any difference makes RabbitMQ answer 406 PRECONDITION_FAILED to whichever side declares second.
//! Like Celery's `send_task(..., queue=...)`, we publish to the default exchange `""` with the
//! queue name as routing key.
//!
//! Durability: a publish returns Ok only after RabbitMQ's publisher confirm (and `mandatory`, so a
//! message that reaches no queue is an error, not a silent drop). Consumption uses manual acks with
//! `basic_qos(prefetch)`: an unacked message goes back to the queue when our channel or connection
//! closes, which is how a crashed worker's batch is redelivered.
//!
//! Delivery tags are only valid on the channel that received them, so our tags are
//! `<consumer generation>:<delivery tag>`; a tag from a consumer channel that has since been lost
//! is never sent on a new channel (RabbitMQ would close it with PRECONDITION_FAILED), and its
//! message has been requeued by RabbitMQ anyway.
//!
//! The pieces: [`session`] keeps one connection alive (reconnecting with backoff) and publishes
//! with confirms; [`consumer`] tracks what the consumer channel holds unacked; [`dlq`] scans the
//! dead-letter queue; [`convert`] turns Celery's JSON headers into AMQP field tables and back.

mod consumer;
mod convert;
mod dlq;
mod session;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use lapin::types::AMQPValue;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use super::{time_text, Backend, BrokerConfig, DeadLetter, Delivery, QueueError, TaskMessage};
use consumer::{parse_tag, ConsumerState, Link};
use convert::{task_properties, with_headers};
use session::{close_in_background, supervise, Backoff, Session};

/// Header counting the deliveries made before this copy was published (bumped on retry).
pub const ATTEMPTS_HEADER: &str = "x-mailhook-attempts";
/// Header carrying why a dead letter was given up on.
pub const REASON_HEADER: &str = "x-mailhook-reason";
/// Header carrying when a dead letter was given up on (RFC 3339, UTC).
pub const FAILED_AT_HEADER: &str = "x-mailhook-failed-at";

/// How the RabbitMQ backend fails.
#[derive(Debug, Clone, Error)]
pub enum Error {
    /// A protocol, channel or connection error, as lapin reports it.
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
    /// A connection attempt took longer than allowed.
    #[error("RabbitMQ did not answer within {0:?}")]
    ConnectTimeout(Duration),
    /// The connection is down and the next attempt is not due yet; the source is why the last
    /// attempt failed.
    #[error("the RabbitMQ connection is lost; reconnecting")]
    Reconnecting(#[source] Box<Error>),
    /// The broker was dropped: nothing reconnects any more.
    #[error("the RabbitMQ broker is closed")]
    Closed,
    /// A publish was not confirmed in time: it may or may not be on the queue.
    #[error("RabbitMQ did not confirm the publish within {0:?}")]
    ConfirmTimeout(Duration),
    /// A publish reached no queue (the queue was deleted).
    #[error("RabbitMQ returned the message: no queue `{0}`")]
    Returned(String),
    /// RabbitMQ refused a publish.
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    /// A publish went out on a channel without publisher confirms.
    #[error("the publishing channel is not in confirm mode")]
    NotConfirming,
    /// The consumer channel is gone; RabbitMQ redelivers what it held.
    #[error("the consumer channel was lost; RabbitMQ redelivers its unacked messages")]
    LostChannel,
    /// Some deliveries to settle came from a consumer channel that is gone.
    #[error("{0} deliveries belong to a lost consumer channel; RabbitMQ redelivers them")]
    StaleDeliveries(usize),
    /// RabbitMQ cancelled our consumer (its queue was deleted?).
    #[error("RabbitMQ cancelled the consumer")]
    ConsumerCancelled,
    /// A thread panicked while holding one of the backend's locks.
    #[error("the RabbitMQ {0} lock is poisoned")]
    Poisoned(&'static str),
}

impl From<lapin::Error> for QueueError {
    fn from(e: lapin::Error) -> Self {
        QueueError::Amqp(Error::Lapin(e))
    }
}

/// A RabbitMQ queue used the way Celery uses it.
pub struct AmqpBackend {
    inner: Arc<Inner>,
}

/// State shared with the background tasks (supervisor, delayed retries).
struct Inner {
    url: String,
    queue: String,
    dlq: String,
    prefetch: u16,
    /// The live connection; replaced by [`Inner::session`] when it drops.
    session: RwLock<Option<Arc<Session>>>,
    /// Serializes reconnection attempts and holds their backoff.
    reconnect: tokio::sync::Mutex<Backoff>,
    /// The consumer, created by the first claim; its lock is held while a fetch waits for a
    /// delivery.
    consumer: tokio::sync::Mutex<ConsumerState>,
    /// What acks need, kept apart from `consumer` so an ack never waits behind a fetch.
    link: Mutex<Link>,
    /// Serializes DLQ maintenance (list/replay), which holds DLQ messages unacked while it scans.
    dlq_ops: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    /// Fired when the broker is dropped: background tasks stop, nothing reconnects.
    stop: CancellationToken,
}

impl AmqpBackend {
    /// Connects, declares the Celery-compatible topology and the DLQ, and starts the supervisor
    /// that reconnects after a connection loss.
    pub async fn open(cfg: &BrokerConfig) -> Result<Self, QueueError> {
        let inner = Arc::new(Inner {
            url: cfg.url.clone(),
            queue: cfg.queue.clone(),
            dlq: cfg.dlq(),
            prefetch: cfg.prefetch.max(1),
            session: RwLock::new(None),
            reconnect: tokio::sync::Mutex::new(Backoff::default()),
            consumer: tokio::sync::Mutex::new(ConsumerState::default()),
            link: Mutex::new(Link::default()),
            dlq_ops: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        inner.session().await?;
        tokio::spawn(supervise(Arc::downgrade(&inner), inner.stop.clone()));
        Ok(AmqpBackend { inner })
    }
}

impl Drop for AmqpBackend {
    /// Closes the connection now, so RabbitMQ requeues whatever we held unacked, and stops the
    /// background tasks (a pending delayed retry leaves its message unacked, hence requeued).
    fn drop(&mut self) {
        self.inner.stop.cancel();
        if let Ok(mut consumer) = self.inner.consumer.try_lock() {
            consumer.close();
        }
        if let Ok(mut link) = self.inner.link.lock() {
            link.channel = None;
            link.held.clear();
        }
        let session = self.inner.session.write().ok().and_then(|mut s| s.take());
        if let Some(session) = session {
            close_in_background(session);
        }
    }
}

#[async_trait]
impl Backend for AmqpBackend {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        Ok(self
            .inner
            .publish_confirmed(&self.inner.queue, &msg.body, task_properties(msg))
            .await?)
    }

    async fn claim(&self, max: usize, max_bytes: usize) -> Result<Vec<Delivery>, QueueError> {
        Ok(self.inner.claim(max, max_bytes).await?)
    }

    /// Completes when RabbitMQ pushes a delivery to our consumer.
    fn ready(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.inner.await_delivery())
    }

    async fn ack(&self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        let (tags, stale) = self.inner.current_tags(deliveries)?;
        self.inner.ack_tags(&tags).await?;
        if stale > 0 {
            return Err(Error::StaleDeliveries(stale).into());
        }
        Ok(())
    }

    /// The copy is republished after `delay` by a background task; until then the original stays
    /// unacked (keeping its prefetch slot, which also slows consumption while the store fails).
    /// If we die first, RabbitMQ redelivers the original.
    async fn retry(&self, deliveries: &[Delivery], delay: Duration) -> Result<(), QueueError> {
        let mut held = Vec::with_capacity(deliveries.len());
        {
            let link = self.inner.lock_link()?;
            for d in deliveries {
                if let Some((g, tag)) = parse_tag(&d.tag) {
                    if g == link.generation {
                        if let Some(props) = link.held.get(&tag) {
                            held.push((tag, props.clone(), d.clone()));
                        }
                    }
                }
                // Otherwise its channel is gone and RabbitMQ has requeued it already.
            }
        }
        if held.is_empty() {
            return Ok(());
        }
        let inner = self.inner.clone();
        let stop = inner.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            inner.republish_then_ack(held).await;
        });
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
        failed_at: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        let (tags, stale) = self.inner.current_tags(std::slice::from_ref(delivery))?;
        let Some(&tag) = tags.first() else {
            debug_assert!(stale > 0);
            return Err(Error::LostChannel.into());
        };
        let props = with_headers(self.inner.held_props(tag)?, |h| {
            h.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
            h.insert(
                ATTEMPTS_HEADER.into(),
                AMQPValue::LongLongInt(i64::from(delivery.attempts)),
            );
            h.insert(
                FAILED_AT_HEADER.into(),
                AMQPValue::LongString(time_text(&failed_at).into()),
            );
        });
        self.inner
            .publish_confirmed(&self.inner.dlq, &delivery.body, props)
            .await?;
        Ok(self.inner.ack_tags(&[tag]).await?)
    }

    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(self.inner.list(limit).await?)
    }

    /// Ids are task ids.
    async fn dlq_replay(&self, ids: &[String]) -> Result<u64, QueueError> {
        Ok(self.inner.replay(ids).await?)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.inner.session().await?;
        Ok(())
    }
}
