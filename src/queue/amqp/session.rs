//! One AMQP connection kept alive: reconnection with backoff (on demand, and by a supervisor
//! when nobody asks), the Celery-compatible topology, and publishing with confirms.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Error, Inner};

/// How long a connection attempt may take before we call RabbitMQ unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a publish may wait for its confirm; beyond it the API answers 503.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest wait between reconnection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often the supervisor checks the connection when nobody is using it.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);

/// One AMQP connection with its confirm-mode publishing channel.
pub(super) struct Session {
    pub(super) id: u64,
    pub(super) conn: Connection,
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
pub(super) struct Backoff {
    failures: u32,
    /// When the next attempt may be made, and why the last one failed.
    next_attempt: Option<(Instant, Error)>,
}

/// Closes a session's connection without blocking (dropping the last handle would also close it,
/// but a background task may still hold one for a moment).
pub(super) fn close_in_background(session: Arc<Session>) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _ = session.conn.close(200, "mailhook closing").await;
        });
    }
}

/// Reconnects after a connection loss even when no request or fetch asks for the broker.
pub(super) async fn supervise(inner: Weak<Inner>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SUPERVISE_EVERY) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.current().is_none() {
            if let Err(e) = inner.session().await {
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "RabbitMQ still unreachable"
                );
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
    pub(super) async fn session(&self) -> Result<Arc<Session>, Error> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let mut backoff = self.reconnect.lock().await;
        // Someone else may have reconnected while we waited for the lock.
        if let Some(s) = self.current() {
            return Ok(s);
        }
        if self.stop.is_cancelled() {
            return Err(Error::Closed);
        }
        if let Some((at, last)) = &backoff.next_attempt {
            if Instant::now() < *at {
                return Err(Error::Reconnecting(Box::new(last.clone())));
            }
        }
        let id = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, self.open_session(id))
            .await
            .unwrap_or(Err(Error::ConnectTimeout(CONNECT_TIMEOUT)));
        match opened {
            Ok(session) => {
                let session = Arc::new(session);
                let old = self
                    .session
                    .write()
                    .map_err(|_| Error::Poisoned("session"))?
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
                backoff.next_attempt = Some((Instant::now() + wait, e.clone()));
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    retry_in = ?wait,
                    "cannot connect to RabbitMQ"
                );
                Err(e)
            }
        }
    }

    async fn open_session(&self, id: u64) -> Result<Session, Error> {
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
    async fn declare(&self, ch: &Channel) -> Result<(), Error> {
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
    pub(super) async fn publish_confirmed(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), Error> {
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
            Err(_) => return Err(Error::ConfirmTimeout(CONFIRM_TIMEOUT)),
        };
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => {
                // Returned as unroutable: the queue is gone. A new session declares it again.
                session.broken.store(true, Ordering::Relaxed);
                Err(Error::Returned(queue.to_owned()))
            }
            Confirmation::Nack(_) => Err(Error::Nacked),
            Confirmation::NotRequested => Err(Error::NotConfirming),
        }
    }
}
