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

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Broker, BrokerConfig, DeadLetter, Delivery, QueueError, TaskMessage};

/// Header counting the deliveries made before this copy was published (bumped on retry).
pub const ATTEMPTS_HEADER: &str = "x-mailhook-attempts";
/// Header carrying why a dead letter was given up on.
pub const REASON_HEADER: &str = "x-mailhook-reason";
/// Header carrying when a dead letter was given up on (RFC 3339, UTC).
pub const FAILED_AT_HEADER: &str = "x-mailhook-failed-at";

/// How long a connection attempt may take before we call RabbitMQ unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a publish may wait for its confirm; beyond it the API answers 503.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest wait between reconnection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often the supervisor checks the connection when nobody is using it.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);
/// Dead letters replayed per pipelined round of confirms.
const REPLAY_CHUNK: usize = 256;

impl From<lapin::Error> for QueueError {
    fn from(e: lapin::Error) -> Self {
        QueueError::Unavailable(format!("RabbitMQ: {e}"))
    }
}

/// A RabbitMQ queue used the way Celery uses it.
pub struct AmqpBroker {
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
    /// The consumer, created lazily by the first fetch; its lock is held while a fetch waits.
    consumer: tokio::sync::Mutex<Option<ConsumerSlot>>,
    /// What acks need, kept apart from `consumer` so an ack never waits behind a fetch.
    link: Mutex<Link>,
    /// Serializes DLQ maintenance (list/replay), which holds DLQ messages unacked while it scans.
    dlq_ops: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    /// Fired when the broker is dropped: background tasks stop, nothing reconnects.
    stop: CancellationToken,
}

/// One AMQP connection with its confirm-mode publishing channel.
struct Session {
    id: u64,
    conn: Connection,
    publisher: Channel,
    /// Held while handing a publish to lapin: lapin numbers confirms and queues frames in two
    /// steps, and two threads interleaving them would pair a confirm with the wrong message.
    /// Only the send is serialized; confirms are awaited concurrently (pipelined).
    send: tokio::sync::Mutex<()>,
    /// Set when the session must be replaced although the socket is up (unroutable publish).
    broken: AtomicBool,
}

impl Session {
    fn alive(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && self.conn.status().connected()
            && self.publisher.status().connected()
    }
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    next_attempt: Option<Instant>,
    last_error: String,
}

struct ConsumerSlot {
    generation: u64,
    channel: Channel,
    consumer: Consumer,
}

/// The current consumer channel and the properties of the messages it holds unacked.
#[derive(Default)]
struct Link {
    generation: u64,
    channel: Option<Channel>,
    /// Unacked delivery tag -> properties, to republish a copy (retry, dead letter) intact.
    held: BTreeMap<u64, BasicProperties>,
}

impl AmqpBroker {
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
            consumer: tokio::sync::Mutex::new(None),
            link: Mutex::new(Link::default()),
            dlq_ops: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        inner.session().await?;
        tokio::spawn(supervise(Arc::downgrade(&inner), inner.stop.clone()));
        Ok(AmqpBroker { inner })
    }
}

impl Drop for AmqpBroker {
    /// Closes the connection now, so RabbitMQ requeues whatever we held unacked, and stops the
    /// background tasks (a pending delayed retry leaves its message unacked, hence requeued).
    fn drop(&mut self) {
        self.inner.stop.cancel();
        if let Ok(mut slot) = self.inner.consumer.try_lock() {
            slot.take();
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

/// Closes a session's connection without blocking (dropping the last handle would also close it,
/// but a background task may still hold one for a moment).
fn close_in_background(session: Arc<Session>) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _ = session.conn.close(200, "mailhook closing").await;
        });
    }
}

/// Reconnects after a connection loss even when no request or fetch asks for the broker.
async fn supervise(inner: Weak<Inner>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SUPERVISE_EVERY) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.current().is_none() {
            if let Err(e) = inner.session().await {
                tracing::debug!(error = %e, "RabbitMQ still unreachable");
            }
        }
    }
}

impl Inner {
    /// The live session, if any.
    fn current(&self) -> Option<Arc<Session>> {
        let s = self.session.read().ok()?.clone()?;
        s.alive().then_some(s)
    }

    /// The live session, reconnecting (with backoff between failed attempts) when it is gone.
    async fn session(&self) -> Result<Arc<Session>, QueueError> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let mut backoff = self.reconnect.lock().await;
        // Someone else may have reconnected while we waited for the lock.
        if let Some(s) = self.current() {
            return Ok(s);
        }
        if self.stop.is_cancelled() {
            return Err(QueueError::Unavailable(
                "the RabbitMQ broker is closed".into(),
            ));
        }
        if backoff.next_attempt.is_some_and(|at| Instant::now() < at) {
            return Err(QueueError::Unavailable(format!(
                "RabbitMQ connection lost ({}); reconnecting",
                backoff.last_error
            )));
        }
        let id = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, self.open_session(id))
            .await
            .unwrap_or_else(|_| {
                Err(QueueError::Unavailable(format!(
                    "RabbitMQ did not answer within {CONNECT_TIMEOUT:?}"
                )))
            });
        match opened {
            Ok(session) => {
                let session = Arc::new(session);
                let old = self
                    .session
                    .write()
                    .map_err(|_| QueueError::Unavailable("session lock poisoned".into()))?
                    .replace(session.clone());
                if let Some(old) = old {
                    close_in_background(old);
                }
                if backoff.failures > 0 {
                    tracing::info!(after = backoff.failures, "reconnected to RabbitMQ");
                }
                *backoff = Backoff::default();
                Ok(session)
            }
            Err(e) => {
                backoff.failures = backoff.failures.saturating_add(1);
                let wait = RECONNECT_MIN
                    .saturating_mul(1u32 << backoff.failures.min(16))
                    .min(RECONNECT_MAX);
                backoff.next_attempt = Some(Instant::now() + wait);
                backoff.last_error = e.to_string();
                tracing::warn!(error = %e, retry_in = ?wait, "cannot connect to RabbitMQ");
                Err(e)
            }
        }
    }

    async fn open_session(&self, id: u64) -> Result<Session, QueueError> {
        // Named after the queue so an operator (or a test) can tell our connections apart.
        let name = format!("mailhook {}", self.queue);
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let conn = Connection::connect(&self.url, props).await?;
        let publisher = conn.create_channel().await?;
        self.declare(&publisher).await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Session {
            id,
            conn,
            publisher,
            send: tokio::sync::Mutex::new(()),
            broken: AtomicBool::new(false),
        })
    }

    /// Declares what kombu declares for `Queue(name, Exchange(name), routing_key=name)`, plus
    /// our DLQ (a plain durable queue on the default exchange, which Celery never touches).
    async fn declare(&self, ch: &Channel) -> Result<(), QueueError> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ch.exchange_declare(
            &self.queue,
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(&self.queue, durable_queue, FieldTable::default())
            .await?;
        ch.queue_bind(
            &self.queue,
            &self.queue,
            &self.queue,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(&self.dlq, durable_queue, FieldTable::default())
            .await?;
        Ok(())
    }

    /// Publishes to the default exchange with routing key `queue` and waits for the confirm.
    async fn publish_confirmed(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), QueueError> {
        let session = self.session().await?;
        let sent = {
            let _turn = session.send.lock().await;
            session
                .publisher
                .basic_publish(
                    "",
                    queue,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    props,
                )
                .await
        };
        let confirm = match tokio::time::timeout(CONFIRM_TIMEOUT, sent?).await {
            Ok(c) => c?,
            Err(_) => {
                return Err(QueueError::Unavailable(format!(
                    "RabbitMQ did not confirm the publish within {CONFIRM_TIMEOUT:?}"
                )))
            }
        };
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => {
                // Returned as unroutable: the queue is gone. A new session declares it again.
                session.broken.store(true, Ordering::Relaxed);
                Err(QueueError::Unavailable(format!(
                    "RabbitMQ returned the message: no queue `{queue}`"
                )))
            }
            Confirmation::Nack(_) => Err(QueueError::Unavailable(
                "RabbitMQ refused the message (nack)".into(),
            )),
            Confirmation::NotRequested => Err(QueueError::Unavailable(
                "the publishing channel is not in confirm mode".into(),
            )),
        }
    }

    /// Opens a consumer on its own channel and makes it the one acks go to.
    async fn start_consumer(&self) -> Result<ConsumerSlot, QueueError> {
        let session = self.session().await?;
        let channel = session.conn.create_channel().await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let tag = format!(
            "mailhook-{}-{}-{generation}",
            std::process::id(),
            session.id
        );
        let consumer = channel
            .basic_consume(
                &self.queue,
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut link = self.lock_link()?;
        *link = Link {
            generation,
            channel: Some(channel.clone()),
            held: BTreeMap::new(),
        };
        Ok(ConsumerSlot {
            generation,
            channel,
            consumer,
        })
    }

    fn lock_link(&self) -> Result<std::sync::MutexGuard<'_, Link>, QueueError> {
        self.link
            .lock()
            .map_err(|_| QueueError::Unavailable("consumer state lock poisoned".into()))
    }

    /// Turns an AMQP delivery into ours, remembering its properties until it is settled.
    fn track(&self, generation: u64, d: AmqpDelivery) -> Result<Delivery, QueueError> {
        let headers = d.properties.headers().as_ref();
        let prior = headers
            .and_then(|h| h.inner().get(ATTEMPTS_HEADER))
            .and_then(as_u32)
            .unwrap_or(0);
        // A redelivery we did not count ourselves (consumer lost) is at least one more attempt.
        let attempts = prior
            .saturating_add(1)
            .saturating_add(u32::from(d.redelivered));
        let task_id = task_id_of(&d.properties);
        let task = headers
            .and_then(|h| h.inner().get("task"))
            .and_then(as_string)
            .unwrap_or_default();
        let tag = d.delivery_tag;
        let mut link = self.lock_link()?;
        if link.generation == generation {
            link.held.insert(tag, d.properties);
        }
        Ok(Delivery {
            tag: format!("{generation}:{tag}"),
            task_id,
            task,
            body: d.data,
            attempts,
        })
    }

    /// Splits deliveries into tags of the current consumer channel and a count
    /// of stale ones, whose messages RabbitMQ already requeued when their channel closed.
    fn current_tags(&self, deliveries: &[Delivery]) -> Result<(Vec<u64>, usize), QueueError> {
        let link = self.lock_link()?;
        let mut tags = Vec::with_capacity(deliveries.len());
        let mut stale = 0;
        for d in deliveries {
            match parse_tag(&d.tag) {
                Some((generation, tag))
                    if generation == link.generation && link.held.contains_key(&tag) =>
                {
                    tags.push(tag);
                }
                _ => stale += 1,
            }
        }
        Ok((tags, stale))
    }

    /// Acks these tags of the current consumer channel; one `multiple` ack when no other held
    /// message is below the highest tag.
    async fn ack_tags(&self, tags: &[u64]) -> Result<(), QueueError> {
        let (channel, multiple_up_to) = {
            let mut link = self.lock_link()?;
            let mine: Vec<u64> = tags
                .iter()
                .copied()
                .filter(|t| link.held.remove(t).is_some())
                .collect();
            if mine.is_empty() {
                return Ok(());
            }
            let max = mine.iter().copied().max().unwrap_or_default();
            let others_below = link.held.range(..=max).next().is_some();
            let channel = link.channel.clone();
            let plan = if others_below || mine.len() == 1 {
                Err(mine)
            } else {
                Ok(max)
            };
            (channel, plan)
        };
        let Some(channel) = channel else {
            return Err(lost_channel());
        };
        match multiple_up_to {
            Ok(max) => {
                channel
                    .basic_ack(max, BasicAckOptions { multiple: true })
                    .await?
            }
            Err(each) => {
                for tag in each {
                    channel.basic_ack(tag, BasicAckOptions::default()).await?;
                }
            }
        }
        Ok(())
    }

    /// Gives held messages back to the queue at once (used when a retry cannot republish).
    async fn requeue_tags(&self, tags: &[u64]) -> Result<(), QueueError> {
        let channel = {
            let mut link = self.lock_link()?;
            for t in tags {
                link.held.remove(t);
            }
            link.channel.clone()
        };
        let Some(channel) = channel else {
            return Err(lost_channel());
        };
        for &tag in tags {
            channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await?;
        }
        Ok(())
    }

    fn held_props(&self, tag: u64) -> Result<BasicProperties, QueueError> {
        Ok(self
            .lock_link()?
            .held
            .get(&tag)
            .cloned()
            .unwrap_or_default())
    }

    /// Republishes copies with the attempts header bumped, then acks the originals: a crash in
    /// between leaves both (a duplicate the store's dedupe key absorbs), never neither.
    async fn republish_then_ack(&self, held: Vec<(u64, BasicProperties, Delivery)>) {
        let copies = held.iter().map(|(_, props, d)| {
            let props = with_headers(props.clone(), |h| {
                h.insert(
                    ATTEMPTS_HEADER.into(),
                    AMQPValue::LongLongInt(i64::from(d.attempts)),
                );
            });
            self.publish_confirmed(&self.queue, &d.body, props)
        });
        let results = futures_util::future::join_all(copies).await;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for ((tag, _, d), r) in held.iter().zip(results) {
            match r {
                Ok(()) => done.push(*tag),
                Err(e) => {
                    tracing::warn!(task_id = %d.task_id, error = %e, "retry republish failed; requeueing");
                    failed.push(*tag);
                }
            }
        }
        if let Err(e) = self.ack_tags(&done).await {
            tracing::warn!(error = %e, "ack after retry republish failed; duplicates will be deduplicated");
        }
        if !failed.is_empty() {
            if let Err(e) = self.requeue_tags(&failed).await {
                tracing::warn!(error = %e, "requeue after failed retry failed; RabbitMQ redelivers on reconnect");
            }
        }
    }

    /// Moves DLQ messages whose task id `wanted` accepts back to the main queue. Messages scanned
    /// but not wanted stay unacked on a private channel, and closing it puts them back in place.
    async fn replay_where(
        &self,
        mut wanted: impl FnMut(&str) -> bool,
        only_one: bool,
    ) -> Result<u64, QueueError> {
        let _one_at_a_time = self.dlq_ops.lock().await;
        let session = self.session().await?;
        let ch = session.conn.create_channel().await?;
        let result = async {
            let mut moved = 0u64;
            loop {
                let mut chunk = Vec::new();
                let mut exhausted = false;
                while chunk.len() < REPLAY_CHUNK {
                    let Some(m) = ch
                        .basic_get(&self.dlq, BasicGetOptions { no_ack: false })
                        .await?
                    else {
                        exhausted = true;
                        break;
                    };
                    if wanted(&task_id_of(&m.delivery.properties)) {
                        chunk.push(m.delivery);
                        if only_one {
                            break;
                        }
                    }
                }
                let copies = chunk.iter().map(|d| {
                    let props = without_headers(
                        d.properties.clone(),
                        &[ATTEMPTS_HEADER, REASON_HEADER, FAILED_AT_HEADER],
                    );
                    self.publish_confirmed(&self.queue, &d.data, props)
                });
                for r in futures_util::future::join_all(copies).await {
                    r?;
                }
                for d in &chunk {
                    ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                        .await?;
                }
                moved += chunk.len() as u64;
                if exhausted || (only_one && moved > 0) {
                    return Ok::<u64, QueueError>(moved);
                }
            }
        }
        .await;
        // Closing requeues every scanned message we did not ack, in its original place.
        let _ = ch.close(200, "dlq scan done").await;
        result
    }
}

fn lost_channel() -> QueueError {
    QueueError::Unavailable(
        "the consumer channel was lost; RabbitMQ redelivers its unacked messages".into(),
    )
}

/// `<generation>:<delivery tag>`.
fn parse_tag(tag: &str) -> Option<(u64, u64)> {
    let (g, t) = tag.split_once(':')?;
    Some((g.parse().ok()?, t.parse().ok()?))
}

/// The Celery task id: header `id` (protocol v2), else the correlation id.
fn task_id_of(props: &BasicProperties) -> String {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("id"))
        .and_then(as_string)
        .or_else(|| props.correlation_id().as_ref().map(|c| c.to_string()))
        .unwrap_or_default()
}

fn as_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn as_u32(v: &AMQPValue) -> Option<u32> {
    let n: i64 = match *v {
        AMQPValue::ShortShortInt(n) => n.into(),
        AMQPValue::ShortShortUInt(n) => n.into(),
        AMQPValue::ShortInt(n) => n.into(),
        AMQPValue::ShortUInt(n) => n.into(),
        AMQPValue::LongInt(n) => n.into(),
        AMQPValue::LongUInt(n) => n.into(),
        AMQPValue::LongLongInt(n) => n,
        _ => return None,
    };
    u32::try_from(n.max(0)).ok()
}

/// A JSON value as an AMQP field value, the way py-amqp encodes Python values, so a Python
/// worker reads back the same headers Celery would have written.
pub fn json_to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(json_to_amqp).collect::<Vec<_>>(),
        )),
        Value::Object(m) => AMQPValue::FieldTable(json_map_to_table(m)),
    }
}

/// A JSON object as an AMQP field table.
pub fn json_map_to_table(m: &serde_json::Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in m {
        t.insert(ShortString::from(k.as_str()), json_to_amqp(v));
    }
    t
}

/// The AMQP properties Celery gives a task message.
fn task_properties(msg: &TaskMessage) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(json_map_to_table(&msg.headers()))
        .with_correlation_id(msg.id.as_str().into())
        .with_delivery_mode(2)
        .with_priority(0)
}

fn with_headers(props: BasicProperties, edit: impl FnOnce(&mut FieldTable)) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    edit(&mut headers);
    props.with_headers(headers)
}

fn without_headers(props: BasicProperties, names: &[&str]) -> BasicProperties {
    let kept: BTreeMap<ShortString, AMQPValue> = props
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| !names.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    props.with_headers(FieldTable::from(kept))
}

fn dead_letter_of(d: &AmqpDelivery) -> DeadLetter {
    let headers = d.properties.headers().as_ref();
    let get = |k: &str| headers.and_then(|h| h.inner().get(k));
    DeadLetter {
        id: task_id_of(&d.properties),
        task_id: task_id_of(&d.properties),
        task: get("task").and_then(as_string).unwrap_or_default(),
        reason: get(REASON_HEADER).and_then(as_string).unwrap_or_default(),
        attempts: get(ATTEMPTS_HEADER).and_then(as_u32).unwrap_or(0),
        failed_at: get(FAILED_AT_HEADER)
            .and_then(as_string)
            .unwrap_or_default(),
        body_len: d.data.len(),
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        self.inner
            .publish_confirmed(&self.inner.queue, &msg.body, task_properties(msg))
            .await
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut slot = self.inner.consumer.lock().await;
        if slot
            .as_ref()
            .is_some_and(|s| !s.channel.status().connected())
        {
            *slot = None;
        }
        let current = match slot.as_mut() {
            Some(s) => s,
            None => slot.insert(self.inner.start_consumer().await?),
        };
        let generation = current.generation;
        let mut item = match tokio::time::timeout(wait, current.consumer.next()).await {
            Ok(item) => item,
            Err(_) => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        loop {
            match item {
                Some(Ok(d)) => out.push(self.inner.track(generation, d)?),
                Some(Err(e)) => {
                    *slot = None;
                    if out.is_empty() {
                        return Err(e.into());
                    }
                    break;
                }
                None => {
                    // RabbitMQ cancelled the consumer (queue deleted?): start over next time.
                    *slot = None;
                    if out.is_empty() {
                        return Err(QueueError::Unavailable(
                            "RabbitMQ cancelled the consumer".into(),
                        ));
                    }
                    break;
                }
            }
            if out.len() >= max {
                break;
            }
            let Some(current) = slot.as_mut() else { break };
            match current.consumer.next().now_or_never() {
                Some(next) => item = next,
                None => break,
            }
        }
        Ok(out)
    }

    async fn ack(&self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        let (tags, stale) = self.inner.current_tags(deliveries)?;
        self.inner.ack_tags(&tags).await?;
        if stale > 0 {
            return Err(QueueError::Unavailable(format!(
                "{stale} deliveries belong to a lost consumer channel; RabbitMQ redelivers them"
            )));
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

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        let (tags, stale) = self.inner.current_tags(std::slice::from_ref(delivery))?;
        let Some(&tag) = tags.first() else {
            debug_assert!(stale > 0);
            return Err(lost_channel());
        };
        let props = with_headers(self.inner.held_props(tag)?, |h| {
            h.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
            h.insert(
                ATTEMPTS_HEADER.into(),
                AMQPValue::LongLongInt(i64::from(delivery.attempts)),
            );
            h.insert(
                FAILED_AT_HEADER.into(),
                AMQPValue::LongString(
                    Utc::now()
                        .to_rfc3339_opts(SecondsFormat::Millis, true)
                        .into(),
                ),
            );
        });
        self.inner
            .publish_confirmed(&self.inner.dlq, &delivery.body, props)
            .await?;
        self.inner.ack_tags(&[tag]).await
    }

    /// Reads dead letters with `basic_get` without acking them on a private channel, then closes
    /// it so RabbitMQ puts them back where they were. While a listing runs, those messages are
    /// invisible to other DLQ readers; a crash during it requeues them too, so nothing is lost.
    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let _one_at_a_time = self.inner.dlq_ops.lock().await;
        let session = self.inner.session().await?;
        let ch = session.conn.create_channel().await?;
        let listed = async {
            let mut out = Vec::new();
            while out.len() < limit {
                match ch
                    .basic_get(&self.inner.dlq, BasicGetOptions { no_ack: false })
                    .await?
                {
                    Some(m) => out.push(dead_letter_of(&m.delivery)),
                    None => break,
                }
            }
            Ok::<_, QueueError>(out)
        }
        .await;
        let _ = ch.close(200, "dlq listed").await;
        listed
    }

    /// `id` is the task id.
    async fn dlq_replay(&self, id: Option<&str>) -> Result<u64, QueueError> {
        match id {
            None => self.inner.replay_where(|_| true, false).await,
            Some(id) => match self.inner.replay_where(|t| t == id, true).await? {
                0 => Err(QueueError::NotFound(id.to_owned())),
                n => Ok(n),
            },
        }
    }

    async fn dlq_replay_many(&self, ids: &[String]) -> Result<u64, QueueError> {
        let mut wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        if wanted.is_empty() {
            return Ok(0);
        }
        self.inner.replay_where(|t| wanted.remove(t), false).await
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.inner.session().await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn headers_convert_like_py_amqp() {
        let v = json!({"a": null, "b": [null, 1], "c": {"d": true}, "e": "s", "f": 1.5});
        let Value::Object(m) = v else {
            panic!("object")
        };
        let t = json_map_to_table(&m);
        let h = t.inner();
        assert_eq!(h.get("a"), Some(&AMQPValue::Void));
        assert_eq!(
            h.get("b"),
            Some(&AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Void,
                AMQPValue::LongLongInt(1)
            ])))
        );
        assert!(matches!(h.get("c"), Some(AMQPValue::FieldTable(_))));
        assert_eq!(h.get("e").and_then(as_string).as_deref(), Some("s"));
        assert_eq!(h.get("f"), Some(&AMQPValue::Double(1.5)));
    }

    #[test]
    fn tags_round_trip_and_reject_garbage() {
        assert_eq!(parse_tag("3:17"), Some((3, 17)));
        assert_eq!(parse_tag("17"), None);
        assert_eq!(parse_tag("a:b"), None);
    }

    #[test]
    fn attempts_header_reads_any_integer() {
        assert_eq!(as_u32(&AMQPValue::LongLongInt(4)), Some(4));
        assert_eq!(as_u32(&AMQPValue::ShortShortUInt(2)), Some(2));
        assert_eq!(as_u32(&AMQPValue::LongInt(-1)), Some(0));
        assert_eq!(as_u32(&AMQPValue::LongString("3".into())), None);
    }
}
