//! The embedded queue: a table in a SQLite file, with group commit.
//!
//! Publishers hand their message to one writer task, which inserts everything that is waiting in
//! one transaction and answers each publisher after the commit. Under load, many requests share
//! one fsync, and a 2xx still means "on disk". Consumers lease messages by moving `visible_at`
//! into the future; a crashed consumer's leases simply expire.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot, Notify};

use super::{Broker, BrokerConfig, DeadLetter, Delivery, QueueError, TaskMessage};

/// Messages a single group commit takes at most.
const MAX_GROUP: usize = 512;
/// Bytes a single group commit takes at most (one message is always taken).
const MAX_GROUP_BYTES: usize = 8 << 20;
/// Bytes of bodies one fetch hands out at most (one message is always taken).
const MAX_FETCH_BYTES: i64 = 16 << 20;
/// Publishes waiting for the writer; beyond this the API answers 503 (backpressure).
const WRITER_BACKLOG: usize = 4096;
/// How often an idle consumer looks for messages published by other processes.
const POLL: Duration = Duration::from_millis(100);

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS queue_message (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT    NOT NULL,
    task_id     TEXT    NOT NULL,
    task        TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    visible_at  INTEGER NOT NULL,
    enqueued_at INTEGER NOT NULL,
    reason      TEXT,
    failed_at   TEXT
);
CREATE INDEX IF NOT EXISTS queue_message_queue_id ON queue_message (queue, id);
"#;

struct Pending {
    msg: TaskMessage,
    done: oneshot::Sender<Result<(), String>>,
}

/// A queue stored in a SQLite database file.
pub struct SqliteBroker {
    pool: SqlitePool,
    queue: String,
    dlq: String,
    visibility_ms: i64,
    writer: mpsc::Sender<Pending>,
    published: Arc<Notify>,
}

/// Connection options shared by the queue and the store: WAL, and `synchronous=FULL` so that a
/// commit survives power loss, not only a process crash.
pub fn connect_options(url: &str) -> Result<SqliteConnectOptions, sqlx::Error> {
    Ok(SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30)))
}

impl SqliteBroker {
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
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone())
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let conn = SqliteConnection::connect_with(&opts).await?;
        let (tx, rx) = mpsc::channel(WRITER_BACKLOG);
        let published = Arc::new(Notify::new());
        tokio::spawn(writer(conn, cfg.queue.clone(), rx, published.clone()));
        Ok(SqliteBroker {
            pool,
            queue: cfg.queue.clone(),
            dlq: cfg.dlq(),
            visibility_ms: i64::try_from(cfg.visibility_timeout.as_millis()).unwrap_or(i64::MAX),
            writer: tx,
            published,
        })
    }

    async fn claim(&self, max: usize) -> Result<Vec<Delivery>, QueueError> {
        let now = now_ms();
        let candidates = sqlx::query(
            "SELECT id, length(body) FROM queue_message \
             WHERE queue = ?1 AND visible_at <= ?2 ORDER BY id LIMIT ?3",
        )
        .bind(&self.queue)
        .bind(now)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(candidates.len());
        let mut bytes = 0i64;
        for row in &candidates {
            let len: i64 = row.try_get(1)?;
            if !ids.is_empty() && bytes + len > MAX_FETCH_BYTES {
                break;
            }
            bytes += len;
            ids.push(row.try_get::<i64, _>(0)?);
        }
        let mut q = QueryBuilder::<Sqlite>::new("UPDATE queue_message SET visible_at = ");
        q.push_bind(now.saturating_add(self.visibility_ms))
            .push(", attempts = attempts + 1 WHERE visible_at <= ")
            .push_bind(now)
            .push(" AND id IN (");
        let mut sep = q.separated(", ");
        for id in &ids {
            sep.push_bind(*id);
        }
        q.push(") RETURNING id, task_id, task, body, attempts");
        let mut rows = q.build().fetch_all(&self.pool).await?;
        rows.sort_by_key(|r| r.try_get::<i64, _>(0).unwrap_or_default());
        rows.into_iter()
            .map(|r| {
                Ok(Delivery {
                    tag: r.try_get::<i64, _>(0)?.to_string(),
                    task_id: r.try_get(1)?,
                    task: r.try_get(2)?,
                    body: r.try_get(3)?,
                    attempts: u32::try_from(r.try_get::<i64, _>(4)?).unwrap_or(u32::MAX),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Runs `UPDATE queue_message SET <set> WHERE id IN (<tags>)` or a DELETE.
    async fn by_tags(&self, head: &str, deliveries: &[Delivery]) -> Result<(), QueueError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut q = QueryBuilder::<Sqlite>::new(head);
        q.push(" WHERE id IN (");
        let mut sep = q.separated(", ");
        for d in deliveries {
            sep.push_bind(d.tag.parse::<i64>().unwrap_or(-1));
        }
        q.push(")");
        q.build().execute(&self.pool).await?;
        Ok(())
    }
}

/// The group-commit writer: one transaction for everything waiting, then answer everyone.
async fn writer(
    mut conn: SqliteConnection,
    queue: String,
    mut rx: mpsc::Receiver<Pending>,
    published: Arc<Notify>,
) {
    let mut group: Vec<Pending> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.recv().await {
        let mut bytes = first.msg.body.len();
        group.push(first);
        while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.msg.body.len();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        let result = insert_group(&mut conn, &queue, &group).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, messages = group.len(), "embedded queue commit failed");
        }
        let answer = result.map_err(|e| e.to_string());
        for p in group.drain(..) {
            // A publisher that gave up (client went away) no longer listens: nothing to do.
            let _ = p.done.send(answer.clone());
        }
        published.notify_waiters();
    }
}

async fn insert_group(
    conn: &mut SqliteConnection,
    queue: &str,
    group: &[Pending],
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let mut tx = conn.begin().await?;
    let mut q = QueryBuilder::<Sqlite>::new(
        "INSERT INTO queue_message (queue, task_id, task, body, visible_at, enqueued_at) ",
    );
    q.push_values(group, |mut b, p| {
        b.push_bind(queue)
            .push_bind(&p.msg.id)
            .push_bind(&p.msg.task)
            .push_bind(&p.msg.body)
            .push_bind(now)
            .push_bind(now);
    });
    q.build().execute(&mut *tx).await?;
    tx.commit().await
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[async_trait]
impl Broker for SqliteBroker {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        let (done, wait) = oneshot::channel();
        self.writer
            .try_send(Pending {
                msg: msg.clone(),
                done,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    QueueError::Overloaded("the embedded queue writer is saturated")
                }
                mpsc::error::TrySendError::Closed(_) => {
                    QueueError::Unavailable("the embedded queue writer has stopped".into())
                }
            })?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(QueueError::Unavailable(e)),
            Err(_) => Err(QueueError::Unavailable(
                "the embedded queue writer has stopped".into(),
            )),
        }
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so a commit in between still wakes us.
            let notified = self.published.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.claim(max).await?;
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let _ = tokio::time::timeout((deadline - now).min(POLL), notified).await;
        }
    }

    async fn ack(&self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        self.by_tags("DELETE FROM queue_message", deliveries).await
    }

    async fn retry(&self, deliveries: &[Delivery], delay: Duration) -> Result<(), QueueError> {
        let at = now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        self.by_tags(
            &format!("UPDATE queue_message SET visible_at = {at}"),
            deliveries,
        )
        .await
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        sqlx::query(
            "UPDATE queue_message SET queue = ?1, reason = ?2, failed_at = ?3, visible_at = 0 \
             WHERE id = ?4",
        )
        .bind(&self.dlq)
        .bind(reason)
        .bind(Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true))
        .bind(delivery.tag.parse::<i64>().unwrap_or(-1))
        .execute(&self.pool)
        .await?;
        Ok(())
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
                    failed_at: r.try_get::<Option<String>, _>(5)?.unwrap_or_default(),
                    body_len: usize::try_from(r.try_get::<i64, _>(6)?).unwrap_or_default(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn dlq_replay(&self, id: Option<&str>) -> Result<u64, QueueError> {
        let base = "UPDATE queue_message SET queue = ?1, reason = NULL, failed_at = NULL, \
                    attempts = 0, visible_at = 0 WHERE queue = ?2";
        let done = match id {
            Some(id) => {
                let n = id
                    .parse::<i64>()
                    .map_err(|_| QueueError::NotFound(id.to_owned()))?;
                sqlx::query(&format!("{base} AND id = ?3"))
                    .bind(&self.queue)
                    .bind(&self.dlq)
                    .bind(n)
                    .execute(&self.pool)
                    .await?
                    .rows_affected()
            }
            None => sqlx::query(base)
                .bind(&self.queue)
                .bind(&self.dlq)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        };
        if done == 0 {
            if let Some(id) = id {
                return Err(QueueError::NotFound(id.to_owned()));
            }
        }
        self.published.notify_waiters();
        Ok(done)
    }

    async fn dlq_replay_many(&self, ids: &[String]) -> Result<u64, QueueError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut q = QueryBuilder::<Sqlite>::new("UPDATE queue_message SET queue = ");
        q.push_bind(&self.queue)
            .push(", reason = NULL, failed_at = NULL, attempts = 0, visible_at = 0 WHERE queue = ")
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

    async fn ping(&self) -> Result<(), QueueError> {
        if self.writer.is_closed() {
            return Err(QueueError::Unavailable(
                "the embedded queue writer has stopped".into(),
            ));
        }
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
