//! The embedded queue: tables in a SQLite file, written by one task with group commit.
//!
//! Every write of this process (publishes from the API, claims, acks and retries from the
//! worker) goes to one writer task, which runs everything waiting in one transaction and answers
//! each caller after the commit. Under load many requests share one fsync, a 2xx still means "on
//! disk", and the API never waits in SQLite's busy handler behind its own worker. Other processes
//! on the same file (a separate `mailhook worker`) take SQLite's lock in turn.
//!
//! Consumers lease messages in `queue_lease`, apart from the messages, so that taking a message
//! rewrites a few bytes and not its body; a crashed consumer's leases simply expire.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePoolOptions};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot, Notify};

use thiserror::Error;

use super::{
    parse_time, time_text, Backend, BrokerConfig, DeadLetter, Delivery, QueueError, TaskMessage,
};
use crate::health::{Backoff, Panicked, Part, Status};
use crate::sqlite::{connect_options, file_of, is_data_error, Checkpointer};

/// Operations a single group commit takes at most.
const MAX_GROUP: usize = 512;
/// Bytes of published bodies a single group commit takes at most (one is always taken).
const MAX_GROUP_BYTES: usize = 4 << 20;
/// Operations waiting for the writer; a publish beyond this is refused (503, backpressure).
const WRITER_BACKLOG: usize = 4096;
/// First and longest wait, while the file cannot be written, before the writer tries a write
/// of its own (when nobody asks for one) to find out whether the fault is over.
const PROBE_MIN: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(2);

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS queue_message (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT    NOT NULL,
    task_id     TEXT    NOT NULL,
    task        TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    enqueued_at INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0, -- set when dead-lettered
    reason      TEXT,
    failed_at   TEXT
);
CREATE INDEX IF NOT EXISTS queue_message_queue_id ON queue_message (queue, id);
CREATE TABLE IF NOT EXISTS queue_lease (
    id         INTEGER PRIMARY KEY, -- queue_message.id
    visible_at INTEGER NOT NULL,    -- unix ms; hidden from consumers until then
    attempts   INTEGER NOT NULL     -- deliveries so far
);
-- One row the writer rewrites to find out whether the file can be written again.
CREATE TABLE IF NOT EXISTS queue_probe (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL
);
"#;

/// How the embedded queue fails.
#[derive(Debug, Error)]
pub enum Error {
    /// SQLite refused or failed a statement (a full disk, a locked or corrupt file, ...).
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// The queue file cannot be opened (a read-only or missing directory, ...).
    #[error("cannot open the queue file {}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: sqlx::Error,
    },
    /// A group commit failed; every write in it failed with it.
    #[error("the queue's commit failed")]
    Commit(#[source] Arc<sqlx::Error>),
    /// The writer's last write failed and it has not written since.
    #[error("the queue file cannot be written: {0}")]
    Failing(String),
    /// The writer dropped the write before answering (it panicked, and is being restarted),
    /// or is gone for good (the backend is closing).
    #[error("the embedded queue writer stopped before answering")]
    WriterStopped,
    /// The writer's thread or runtime could not be started.
    #[error("cannot start the embedded queue writer")]
    StartWriter(#[source] std::io::Error),
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> Self {
        QueueError::Sqlite(Error::Sql(e))
    }
}

/// One write, run by the writer task inside a group transaction.
enum Op {
    Publish(TaskMessage),
    Claim {
        max: usize,
        max_bytes: usize,
    },
    Ack(Vec<i64>),
    Retry {
        ids: Vec<i64>,
        visible_at: i64,
    },
    DeadLetter {
        id: i64,
        reason: String,
        attempts: u32,
        failed_at: DateTime<Utc>,
    },
}

enum Reply {
    Done,
    Claimed(Vec<Delivery>),
}

struct Cmd {
    op: Op,
    done: oneshot::Sender<Result<Reply, Error>>,
}

/// A queue stored in a SQLite database file.
pub struct SqliteBackend {
    pool: SqlitePool,
    queue: String,
    dlq: String,
    writer: mpsc::Sender<Cmd>,
    /// How the writer's last write went (a failure stays until a write succeeds again).
    writes: Arc<Part>,
    published: Arc<Notify>,
    _checkpointer: Checkpointer,
}

impl SqliteBackend {
    /// Opens (creating if needed) the queue database and starts its writer.
    pub async fn open(cfg: &BrokerConfig) -> Result<Self, QueueError> {
        Self::open_with(cfg, connect_options(&cfg.url)?).await
    }

    /// Opens with explicit connection options (extra pragmas, e.g. `max_page_count` to
    /// bound the queue file's size).
    pub async fn open_with(
        cfg: &BrokerConfig,
        opts: SqliteConnectOptions,
    ) -> Result<Self, QueueError> {
        let path = file_of(&opts);
        let open = |source| Error::Open {
            path: path.clone(),
            source,
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(opts.clone())
            .await
            .map_err(open)?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let conn = SqliteConnection::connect_with(&opts).await.map_err(open)?;
        let checkpointer = Checkpointer::start(&opts).await.map_err(open)?;
        let (tx, rx) = mpsc::channel(WRITER_BACKLOG);
        let published = Arc::new(Notify::new());
        let writes = Arc::new(Part::new(format!("queue writer of {}", path.display())));
        let writer = Writer {
            opts,
            conn: Some(conn),
            queue: cfg.queue.clone(),
            dlq: cfg.dlq(),
            visibility_ms: i64::try_from(cfg.visibility_timeout.as_millis()).unwrap_or(i64::MAX),
            writes: writes.clone(),
            probe: Backoff::new(PROBE_MIN, PROBE_MAX),
        };
        // The writer gets a thread of its own (it is the one place this process writes the
        // queue from); its future also borrows across awaits in ways rustc cannot yet prove
        // `Send` for sqlx's executors, which a current-thread runtime does not require.
        let notify = published.clone();
        let runtime = writer_runtime().map_err(Error::StartWriter)?;
        std::thread::Builder::new()
            .name("mailhook-queue-writer".into())
            .spawn(move || writer.supervise(runtime, rx, &notify))
            .map_err(Error::StartWriter)?;
        Ok(SqliteBackend {
            pool,
            queue: cfg.queue.clone(),
            dlq: cfg.dlq(),
            writer: tx,
            writes,
            published,
            _checkpointer: checkpointer,
        })
    }

    /// Hands `op` to the writer and waits for its commit.
    async fn call(&self, op: Op) -> Result<Reply, QueueError> {
        let (done, wait) = oneshot::channel();
        self.writer
            .send(Cmd { op, done })
            .await
            .map_err(|_| stopped())?;
        Ok(wait.await.map_err(|_| stopped())??)
    }
}

fn stopped() -> QueueError {
    Error::WriterStopped.into()
}

fn writer_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Owns the one connection this process writes the queue with.
struct Writer {
    opts: SqliteConnectOptions,
    /// `None` after a failure that may have left it inside a transaction: a new one is opened
    /// for the next write.
    conn: Option<SqliteConnection>,
    queue: String,
    dlq: String,
    visibility_ms: i64,
    writes: Arc<Part>,
    /// Wait before the next probe while writes fail.
    probe: Backoff,
}

impl Writer {
    /// Runs the writer until every sender is gone, on its own thread; a panic (in the writer or
    /// in what it calls) starts it again on a new connection and runtime, so that it never
    /// stops for good. Callers whose writes were in hand at the panic get an error (503).
    fn supervise(
        mut self,
        mut runtime: tokio::runtime::Runtime,
        mut rx: mpsc::Receiver<Cmd>,
        published: &Notify,
    ) {
        let mut backoff = Backoff::new(PROBE_MIN, PROBE_MAX);
        loop {
            let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
                runtime.block_on(self.run(&mut rx, published))
            }));
            let Err(payload) = ran else { return };
            self.writes.failed(&Panicked::new(
                "the embedded queue writer",
                payload.as_ref(),
            ));
            // Its transaction, if any, is abandoned with it: closing the connection rolls back.
            self.conn = None;
            std::thread::sleep(backoff.next_wait());
            // A runtime that unwound mid-poll is not trusted again.
            match writer_runtime() {
                Ok(rt) => runtime = rt,
                Err(e) => self.writes.failed(&e),
            }
        }
    }

    async fn run(&mut self, rx: &mut mpsc::Receiver<Cmd>, published: &Notify) {
        let mut group: Vec<Cmd> = Vec::with_capacity(MAX_GROUP);
        loop {
            let first = if matches!(self.writes.status(), Status::Ok) {
                rx.recv().await
            } else {
                // While writes fail, nobody may ask for one (a load balancer stops sending when
                // /health says 503): probe now and then, so that recovery shows by itself.
                match tokio::time::timeout(self.probe.next_wait(), rx.recv()).await {
                    Ok(cmd) => cmd,
                    Err(_) => {
                        self.probe().await;
                        continue;
                    }
                }
            };
            let Some(first) = first else { return };
            let mut bytes = body_len(&first.op);
            group.push(first);
            while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(c) => {
                        bytes += body_len(&c.op);
                        group.push(c);
                    }
                    Err(_) => break,
                }
            }
            let any_publish = group.iter().any(|c| matches!(c.op, Op::Publish(_)));
            let cmds = std::mem::take(&mut group);
            match self.transaction(&cmds).await {
                Ok(replies) => {
                    self.succeeded();
                    for (c, r) in cmds.into_iter().zip(replies) {
                        // A caller that gave up (client went away) no longer listens.
                        let _ = c.done.send(Ok(r));
                    }
                }
                Err(e) if is_data_error(&e) && cmds.len() > 1 => {
                    // One write's data was refused: run each alone, so that it fails alone.
                    for c in cmds {
                        let r = self.transaction(std::slice::from_ref(&c)).await;
                        match &r {
                            Ok(_) => self.succeeded(),
                            Err(e) if !is_data_error(e) => self.writes.failed(e),
                            Err(_) => {}
                        }
                        let r = r
                            .map(|mut r| r.pop().unwrap_or(Reply::Done))
                            .map_err(|e| Error::Commit(Arc::new(e)));
                        let _ = c.done.send(r);
                    }
                }
                Err(e) => {
                    // The file cannot be written (a full disk, an I/O error, a read-only or
                    // locked file): every write in the group fails with it; running each
                    // alone would only fail each again.
                    if !is_data_error(&e) {
                        self.writes.failed(&e);
                    }
                    let e = Arc::new(e);
                    for c in cmds {
                        let _ = c.done.send(Err(Error::Commit(e.clone())));
                    }
                }
            }
            if any_publish {
                published.notify_waiters();
            }
        }
    }

    fn succeeded(&mut self) {
        self.writes.ok();
        self.probe.reset();
    }

    /// A write of nothing that matters, to find out whether the file can be written again.
    async fn probe(&mut self) {
        match self.transaction(&[]).await {
            Ok(_) => self.succeeded(),
            Err(e) => self.writes.failed(&e),
        }
    }

    /// Runs `ops` in one `BEGIN IMMEDIATE` transaction: one commit, one fsync for all of them
    /// (no operation: a probe, which rewrites the probe row).
    ///
    /// On any failure the transaction is rolled back, and unless the failure was the data's,
    /// the connection is closed and a new one opened for the next write: a COMMIT that fails
    /// with SQLITE_FULL or an I/O error can leave SQLite's transaction open, and writes made on
    /// it later would be answered "committed" while never reaching the file.
    async fn transaction(&mut self, ops: &[Cmd]) -> Result<Vec<Reply>, sqlx::Error> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => SqliteConnection::connect_with(&self.opts).await?,
        };
        let result = async {
            sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut conn).await?;
            let replies = if ops.is_empty() {
                sqlx::query(
                    "INSERT INTO queue_probe (id, at) VALUES (1, ?1) \
                     ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                )
                .bind(now_ms())
                .execute(&mut conn)
                .await?;
                Vec::new()
            } else {
                self.apply(&mut conn, ops).await?
            };
            sqlx::raw_sql("COMMIT").execute(&mut conn).await?;
            Ok(replies)
        }
        .await;
        match &result {
            Ok(_) => self.conn = Some(conn),
            Err(e) => {
                let rolled_back = sqlx::raw_sql("ROLLBACK").execute(&mut conn).await;
                if is_data_error(e) && rolled_back.is_ok() {
                    self.conn = Some(conn);
                }
                // Otherwise `conn` is dropped here: closing it ends whatever it still holds.
            }
        }
        result
    }

    async fn apply(
        &self,
        conn: &mut SqliteConnection,
        ops: &[Cmd],
    ) -> Result<Vec<Reply>, sqlx::Error> {
        let now = now_ms();
        let publishes: Vec<&TaskMessage> = ops
            .iter()
            .filter_map(|c| match &c.op {
                Op::Publish(m) => Some(m),
                _ => None,
            })
            .collect();
        if !publishes.is_empty() {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO queue_message (queue, task_id, task, body, enqueued_at) ",
            );
            q.push_values(&publishes, |mut b, m| {
                b.push_bind(&self.queue)
                    .push_bind(&m.id)
                    .push_bind(&m.task)
                    .push_bind(m.body.as_ref())
                    .push_bind(now);
            });
            q.build().execute(&mut *conn).await?;
        }
        let mut replies = Vec::with_capacity(ops.len());
        for c in ops {
            let reply = match &c.op {
                Op::Publish(_) => Reply::Done,
                Op::Claim { max, max_bytes } => {
                    Reply::Claimed(self.claim(conn, *max, *max_bytes, now).await?)
                }
                Op::Ack(ids) => {
                    by_ids(conn, "DELETE FROM queue_message", ids).await?;
                    by_ids(conn, "DELETE FROM queue_lease", ids).await?;
                    Reply::Done
                }
                Op::Retry { ids, visible_at } => {
                    let head = format!("UPDATE queue_lease SET visible_at = {visible_at}");
                    by_ids(conn, &head, ids).await?;
                    Reply::Done
                }
                Op::DeadLetter {
                    id,
                    reason,
                    attempts,
                    failed_at,
                } => {
                    sqlx::query(
                        "UPDATE queue_message SET queue = ?1, reason = ?2, failed_at = ?3, \
                         attempts = ?4 WHERE id = ?5",
                    )
                    .bind(&self.dlq)
                    .bind(reason)
                    .bind(time_text(failed_at))
                    .bind(i64::from(*attempts))
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                    by_ids(conn, "DELETE FROM queue_lease", &[*id]).await?;
                    Reply::Done
                }
            };
            replies.push(reply);
        }
        Ok(replies)
    }

    /// Leases up to `max` visible messages, within `max_bytes` of bodies (the first is always
    /// taken), and returns them.
    async fn claim(
        &self,
        conn: &mut SqliteConnection,
        max: usize,
        max_bytes: usize,
        now: i64,
    ) -> Result<Vec<Delivery>, sqlx::Error> {
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let candidates = sqlx::query(
            "SELECT m.id, length(m.body), coalesce(l.attempts, 0) \
             FROM queue_message m LEFT JOIN queue_lease l ON l.id = m.id \
             WHERE m.queue = ?1 AND (l.visible_at IS NULL OR l.visible_at <= ?2) \
             ORDER BY m.id LIMIT ?3",
        )
        .bind(&self.queue)
        .bind(now)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut chosen: Vec<(i64, i64)> = Vec::with_capacity(candidates.len());
        let mut bytes = 0i64;
        for row in &candidates {
            let len: i64 = row.try_get(1)?;
            if !chosen.is_empty() && bytes.saturating_add(len) > max_bytes {
                break;
            }
            bytes += len;
            chosen.push((row.try_get(0)?, row.try_get::<i64, _>(2)? + 1));
        }
        let visible_at = now.saturating_add(self.visibility_ms);
        let mut q =
            QueryBuilder::<Sqlite>::new("INSERT INTO queue_lease (id, visible_at, attempts) ");
        q.push_values(&chosen, |mut b, (id, attempts)| {
            b.push_bind(*id).push_bind(visible_at).push_bind(*attempts);
        });
        q.push(
            " ON CONFLICT (id) DO UPDATE SET visible_at = excluded.visible_at, \
             attempts = excluded.attempts",
        );
        q.build().execute(&mut *conn).await?;

        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT id, task_id, task, body FROM queue_message WHERE id IN (",
        );
        let mut sep = q.separated(", ");
        for (id, _) in &chosen {
            sep.push_bind(*id);
        }
        q.push(") ORDER BY id");
        let rows = q.build().fetch_all(&mut *conn).await?;
        let attempts: std::collections::HashMap<i64, i64> = chosen.into_iter().collect();
        rows.into_iter()
            .map(|r| {
                let id: i64 = r.try_get(0)?;
                Ok(Delivery {
                    tag: id.to_string(),
                    task_id: r.try_get(1)?,
                    task: r.try_get(2)?,
                    body: r.try_get(3)?,
                    attempts: u32::try_from(attempts.get(&id).copied().unwrap_or(1))
                        .unwrap_or(u32::MAX),
                })
            })
            .collect()
    }
}

fn body_len(op: &Op) -> usize {
    match op {
        Op::Publish(m) => m.body.len(),
        _ => 0,
    }
}

/// Runs `<head> WHERE id IN (<ids>)`.
async fn by_ids(conn: &mut SqliteConnection, head: &str, ids: &[i64]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut q = QueryBuilder::<Sqlite>::new(head);
    q.push(" WHERE id IN (");
    let mut sep = q.separated(", ");
    for id in ids {
        sep.push_bind(*id);
    }
    q.push(")");
    q.build().execute(&mut *conn).await?;
    Ok(())
}

/// Tags are row ids; a tag that is not one (it cannot come from this backend) matches no row.
fn ids(deliveries: &[Delivery]) -> Vec<i64> {
    deliveries
        .iter()
        .map(|d| d.tag.parse::<i64>().unwrap_or(-1))
        .collect()
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        let (done, wait) = oneshot::channel();
        // try_send: when the writer is this far behind, shed load instead of queueing in memory.
        self.writer
            .try_send(Cmd {
                op: Op::Publish(msg.clone()),
                done,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    QueueError::Overloaded("the embedded queue writer is saturated")
                }
                mpsc::error::TrySendError::Closed(_) => stopped(),
            })?;
        wait.await.map_err(|_| stopped())??;
        Ok(())
    }

    async fn claim(&self, max: usize, max_bytes: usize) -> Result<Vec<Delivery>, QueueError> {
        match self.call(Op::Claim { max, max_bytes }).await? {
            Reply::Claimed(d) => Ok(d),
            Reply::Done => Ok(Vec::new()),
        }
    }

    /// Completes at this process's next commit that publishes; messages published by another
    /// process (a separate `mailhook serve --no-worker`) are found by polling.
    fn ready(&self) -> BoxFuture<'_, ()> {
        let mut published = Box::pin(self.published.notified());
        published.as_mut().enable();
        published
    }

    async fn ack(&self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        self.call(Op::Ack(ids(deliveries))).await.map(|_| ())
    }

    async fn retry(&self, deliveries: &[Delivery], delay: Duration) -> Result<(), QueueError> {
        let visible_at =
            now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        self.call(Op::Retry {
            ids: ids(deliveries),
            visible_at,
        })
        .await
        .map(|_| ())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
        failed_at: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        self.call(Op::DeadLetter {
            id: delivery.tag.parse::<i64>().unwrap_or(-1),
            reason: reason.to_owned(),
            attempts: delivery.attempts,
            failed_at,
        })
        .await
        .map(|_| ())
    }

    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let rows = sqlx::query(
            "SELECT id, task_id, task, reason, attempts, failed_at, length(body) \
             FROM queue_message WHERE queue = ?1 ORDER BY id LIMIT ?2",
        )
        .bind(&self.dlq)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DeadLetter {
                    id: r.try_get::<i64, _>(0)?.to_string(),
                    task_id: r.try_get(1)?,
                    task: r.try_get(2)?,
                    reason: r.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
                    attempts: u32::try_from(r.try_get::<i64, _>(4)?).unwrap_or(u32::MAX),
                    failed_at: r
                        .try_get::<Option<String>, _>(5)?
                        .as_deref()
                        .and_then(parse_time),
                    body_len: usize::try_from(r.try_get::<i64, _>(6)?).unwrap_or_default(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Ids are row ids; one that is not a number matches no row.
    async fn dlq_replay(&self, ids: &[String]) -> Result<u64, QueueError> {
        let mut q = QueryBuilder::<Sqlite>::new("UPDATE queue_message SET queue = ");
        q.push_bind(&self.queue)
            .push(", reason = NULL, failed_at = NULL, attempts = 0 WHERE queue = ")
            .push_bind(&self.dlq)
            .push(" AND id IN (");
        let mut sep = q.separated(", ");
        for id in ids {
            sep.push_bind(id.parse::<i64>().unwrap_or(-1));
        }
        q.push(")");
        let n = q.build().execute(&self.pool).await?.rows_affected();
        self.published.notify_waiters();
        Ok(n)
    }

    /// Reads how the writer's last write went, touching no file: it answers at once even
    /// when SQLite is wedged. A writer that failed probes by itself until it writes again.
    async fn ping(&self) -> Result<(), QueueError> {
        if self.writer.is_closed() {
            return Err(stopped());
        }
        match self.writes.status() {
            Status::Ok => Ok(()),
            Status::Failing { error, .. } => Err(Error::Failing(error).into()),
        }
    }
}
