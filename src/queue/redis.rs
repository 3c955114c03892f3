//! Redis, laid out exactly as kombu's Redis transport lays it out, so Python Celery workers and
//! producers share the queue with mailhook.
//!
//! - The queue is the list `<queue>`: publishers `LPUSH` a JSON envelope, consumers pop from the
//!   right.
//! - A fetched message is recorded as unacked (`ZADD unacked_index <now> <tag>`, `HSET unacked
//!   <tag> [envelope, exchange, routing_key]`) in the same Lua script that pops it, so a crash can
//!   never lose a popped message (kombu pops and records in two steps).
//! - `unacked_index` and `unacked` are shared by every consumer of the Redis database, Python or
//!   Rust: whoever finds an entry older than the visibility timeout pushes it back on its queue.
//!   Both sides must therefore use the same visibility timeout (kombu's default: 3600 s).
//! - A retry stays in `unacked` and is re-scored so that restore brings it back after the delay;
//!   the restore bumps `properties.mailhook_attempts` in the envelope (a property Celery ignores),
//!   which is how deliveries are counted. A message restored by a Python worker is not counted.
//! - Dead letters are JSON records on the list `<queue>.dlq`.
//!
//! The Lua scripts that make each step atomic are in `redis/*.lua`.
//!
//! Limits: only priority 0 (the plain list) is consumed; kombu's `global_keyprefix` is not
//! supported; scripts touch keys they read from messages, so Redis Cluster is not supported.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use serde_json::{json, Value};
use thiserror::Error;
use tokio::time::Instant;

use super::{
    parse_time, time_text, Backend, BrokerConfig, DeadLetter, Delivery, QueueError, TaskMessage,
};

/// kombu's keys for the ack emulation, shared by every queue of the Redis database.
const UNACKED: &str = "unacked";
const UNACKED_INDEX: &str = "unacked_index";
const UNACKED_MUTEX: &str = "unacked_mutex";
/// kombu's `unacked_mutex_expire`: a restorer that dies frees the lock after this long.
const UNACKED_MUTEX_EXPIRE_MS: u64 = 300_000;
/// kombu's separator in binding members and priority queue names.
const SEP: &str = "\x06\x16";
/// Longest time between two restore passes of a consumer.
const RESTORE_INTERVAL: Duration = Duration::from_secs(2);
/// Expired entries one restore pass moves at most (the next pass takes the rest).
const RESTORE_BATCH: isize = 256;

/// kombu's Redis message envelope, serialized from borrowed fields (no `json!` tree per publish).
#[derive(serde::Serialize)]
struct Envelope<'a> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: &'static str,
    #[serde(rename = "content-type")]
    content_type: &'static str,
    headers: super::celery::Headers<'a>,
    properties: Properties<'a>,
}

#[derive(serde::Serialize)]
struct Properties<'a> {
    correlation_id: &'a str,
    reply_to: &'static str,
    delivery_mode: u8,
    // Without delivery_info a Python worker fails with KeyError('exchange').
    delivery_info: DeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'static str,
    delivery_tag: String,
}

#[derive(serde::Serialize)]
struct DeliveryInfo<'a> {
    exchange: &'static str,
    routing_key: &'a str,
}

/// Pops and records up to a batch of envelopes, atomically (see the file).
const FETCH: &str = include_str!("redis/fetch.lua");

/// Moves one expired unacked entry back to its queue, unless it was settled meanwhile.
const RESTORE: &str = include_str!("redis/restore.lua");

/// Drops an orphan index entry (no envelope in `unacked`), as kombu's restore does.
const DROP_ORPHAN: &str = include_str!("redis/drop_orphan.lua");

/// Dead-letters one unacked message: pushes the record and acks, only if still unacked.
const DEAD_LETTER: &str = include_str!("redis/dead_letter.lua");

/// Replays one dead letter: removes the record, publishes the envelope.
const REPLAY: &str = include_str!("redis/replay.lua");

/// Releases the restore lock only if we still hold it (as redis-py's `Lock.release`).
const UNLOCK: &str = include_str!("redis/unlock.lua");

/// A Celery-compatible queue on Redis.
pub struct RedisBackend {
    conn: ConnectionManager,
    queue: String,
    dlq: String,
    visibility: Duration,
    /// When this consumer next looks for expired unacked messages; a retry brings it forward.
    restore_at: Mutex<Instant>,
    fetch: Script,
    restore: Script,
    drop_orphan: Script,
    dead_letter: Script,
    replay: Script,
    unlock: Script,
}

/// One dead letter as stored on `<queue>.dlq`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    id: String,
    task_id: String,
    task: String,
    reason: String,
    attempts: u32,
    failed_at: String,
    body_len: usize,
    /// The kombu envelope as it was on the queue (kept as text: it may not even be JSON).
    envelope: String,
}

/// How the Redis backend fails.
#[derive(Debug, Error)]
pub enum Error {
    /// Redis cannot be reached, or refused a command or script.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// A message or dead-letter record could not be written as JSON.
    #[error("cannot encode a message for Redis")]
    Encode(#[from] serde_json::Error),
    /// A thread panicked while holding the restore clock.
    #[error("the restore clock's lock is poisoned")]
    Poisoned,
}

impl From<redis::RedisError> for QueueError {
    fn from(e: redis::RedisError) -> Self {
        QueueError::Redis(Error::Redis(e))
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl RedisBackend {
    /// Connects (reconnecting by itself later, with backoff) and writes the queue's binding as
    /// kombu does when a queue is declared.
    pub async fn open(cfg: &BrokerConfig) -> Result<Self, QueueError> {
        let client = redis::Client::open(cfg.url.as_str())?;
        // One plain connection first: the manager below retries its first connection several
        // times before it reports anything, and start-up wants the cause at once (refused,
        // unknown host, bad password) to say what it waits for.
        let probe = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(5));
        drop(
            client
                .get_multiplexed_async_connection_with_config(&probe)
                .await?,
        );
        // Our commands never block on the server, so a response timeout only catches a dead
        // connection; it must still exceed a fetch script moving a large batch.
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(10))
            .set_number_of_retries(6)
            .set_factor(100)
            .set_max_delay(2_000);
        let mut conn = client.get_connection_manager_with_config(manager).await?;
        // `_kombu.binding.<exchange>` lets a Python worker route restored messages of exchange
        // `<queue>`; kombu 5.7 also keeps `_kombu.binding_permanent.<exchange>` so its binding
        // sweep never deletes the table.
        let member = format!("{q}{SEP}{SEP}{q}", q = cfg.queue);
        redis::pipe()
            .sadd(format!("_kombu.binding.{}", cfg.queue), &member)
            .ignore()
            .sadd(format!("_kombu.binding_permanent.{}", cfg.queue), &member)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(RedisBackend {
            conn,
            queue: cfg.queue.clone(),
            dlq: cfg.dlq(),
            visibility: cfg.visibility_timeout,
            restore_at: Mutex::new(Instant::now()),
            fetch: Script::new(FETCH),
            restore: Script::new(RESTORE),
            drop_orphan: Script::new(DROP_ORPHAN),
            dead_letter: Script::new(DEAD_LETTER),
            replay: Script::new(REPLAY),
            unlock: Script::new(UNLOCK),
        })
    }

    /// The kombu envelope for `msg`, as `kombu.transport.virtual.Channel.basic_publish` writes it.
    fn envelope(&self, msg: &TaskMessage) -> Result<String, QueueError> {
        let env = Envelope {
            body: base64::engine::general_purpose::STANDARD.encode(&msg.body),
            content_encoding: "utf-8",
            content_type: "application/json",
            headers: msg.celery_headers(),
            properties: Properties {
                correlation_id: &msg.id,
                reply_to: "",
                delivery_mode: 2,
                delivery_info: DeliveryInfo {
                    exchange: "",
                    routing_key: &self.queue,
                },
                priority: 0,
                body_encoding: "base64",
                delivery_tag: uuid::Uuid::new_v4().to_string(),
            },
        };
        serde_json::to_string(&env).map_err(|e| Error::Encode(e).into())
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs a restore pass if one is due.
    async fn maybe_restore(&self) -> Result<(), QueueError> {
        let now = Instant::now();
        {
            let mut at = self.restore_at.lock().map_err(|_| Error::Poisoned)?;
            if now < *at {
                return Ok(());
            }
            *at = now + RESTORE_INTERVAL;
        }
        self.restore_visible().await
    }

    /// kombu's `QoS.restore_visible`: under the `unacked_mutex` lock, every unacked entry older
    /// than the visibility timeout goes back to the front of its queue, marked redelivered.
    async fn restore_visible(&self) -> Result<(), QueueError> {
        let mut conn = self.conn();
        let ceil = now_secs() - self.visibility.as_secs_f64();
        let due: Vec<String> = conn
            .zrangebyscore_limit(UNACKED_INDEX, "-inf", ceil, 0, RESTORE_BATCH)
            .await?;
        if due.is_empty() {
            return Ok(());
        }
        // The same lock redis-py's `Lock` takes for kombu: while a Python worker restores (in
        // WATCH/MULTI steps), we stay out, and the other way round.
        let token = uuid::Uuid::new_v4().simple().to_string();
        let locked: Option<String> = redis::cmd("SET")
            .arg(UNACKED_MUTEX)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(UNACKED_MUTEX_EXPIRE_MS)
            .query_async(&mut conn)
            .await?;
        if locked.is_none() {
            return Ok(());
        }
        let result = self.restore_tags(&mut conn, &due, ceil).await;
        let _: Result<i64, _> = self
            .unlock
            .key(UNACKED_MUTEX)
            .arg(&token)
            .invoke_async(&mut conn)
            .await;
        if let Ok(n) = &result {
            if *n > 0 {
                tracing::info!(
                    restored = n,
                    "unacked messages past the visibility timeout put back on their queues"
                );
            }
        }
        result.map(|_| ())
    }

    async fn restore_tags(
        &self,
        conn: &mut ConnectionManager,
        tags: &[String],
        ceil: f64,
    ) -> Result<u64, QueueError> {
        let mut restored = 0;
        for tag in tags {
            let entry: Option<String> = conn.hget(UNACKED, tag).await?;
            let Some(entry) = entry else {
                self.drop_orphan
                    .key(UNACKED)
                    .key(UNACKED_INDEX)
                    .arg(tag)
                    .invoke_async::<i64>(conn)
                    .await?;
                continue;
            };
            let (envelope, target) = self.redelivered(conn, &entry).await?;
            let n: i64 = self
                .restore
                .key(UNACKED)
                .key(UNACKED_INDEX)
                .key(&target)
                .arg(tag)
                .arg(&envelope)
                .arg(ceil)
                .invoke_async(conn)
                .await?;
            restored += u64::try_from(n).unwrap_or(0);
        }
        Ok(restored)
    }

    /// From an `unacked` entry `[envelope, exchange, routing_key]`: the envelope marked
    /// redelivered (as kombu's `_do_restore_message`) with its delivery count bumped, and the
    /// queue it goes back to.
    async fn redelivered(
        &self,
        conn: &mut ConnectionManager,
        entry: &str,
    ) -> Result<(String, String), QueueError> {
        let Ok(Value::Array(parts)) = serde_json::from_str::<Value>(entry) else {
            // Unreadable entry: hand it back to our own queue unchanged; the worker
            // dead-letters what it cannot decode.
            return Ok((entry.to_owned(), self.queue.clone()));
        };
        let exchange = parts.get(1).and_then(Value::as_str).unwrap_or_default();
        let routing_key = parts
            .get(2)
            .and_then(Value::as_str)
            .unwrap_or(&self.queue)
            .to_owned();
        let target = self.lookup(conn, exchange, &routing_key).await?;
        let envelope = match parts.into_iter().next() {
            Some(Value::Object(mut m)) => {
                if let Some(Value::Object(h)) = m.get_mut("headers") {
                    h.insert("redelivered".into(), Value::Bool(true));
                }
                if let Some(Value::Object(p)) = m.get_mut("properties") {
                    let n = p
                        .get("mailhook_attempts")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    p.insert("mailhook_attempts".into(), json!(n.saturating_add(1)));
                    if let Some(Value::Object(di)) = p.get_mut("delivery_info") {
                        di.insert("redelivered".into(), Value::Bool(true));
                    }
                }
                Value::Object(m).to_string()
            }
            // Stored as a JSON string by the fetch script because it was not JSON: the raw text.
            Some(Value::String(raw)) => raw,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        Ok((envelope, target))
    }

    /// kombu's `_lookup` for a direct exchange: the anonymous exchange routes to the queue named
    /// by the routing key; a named one to the queues bound with that key.
    async fn lookup(
        &self,
        conn: &mut ConnectionManager,
        exchange: &str,
        routing_key: &str,
    ) -> Result<String, QueueError> {
        if exchange.is_empty() {
            return Ok(routing_key.to_owned());
        }
        let members: Vec<String> = conn.smembers(format!("_kombu.binding.{exchange}")).await?;
        Ok(members
            .iter()
            .filter_map(|m| {
                let mut f = m.split(SEP);
                let (rk, _pattern, queue) = (f.next()?, f.next()?, f.next()?);
                (rk == routing_key).then(|| queue.to_owned())
            })
            .next()
            .unwrap_or_else(|| routing_key.to_owned()))
    }

    /// Pops and records up to `max` messages (within `max_bytes` of envelopes, the first always
    /// taken) in one script call.
    async fn pop(&self, max: usize, max_bytes: usize) -> Result<Vec<Delivery>, QueueError> {
        let fallback = format!("mailhook-{}-", uuid::Uuid::new_v4().simple());
        let raw: Vec<String> = self
            .fetch
            .key(&self.queue)
            .key(UNACKED_INDEX)
            .key(UNACKED)
            .arg(max)
            .arg(now_secs())
            .arg(&fallback)
            .arg(max_bytes)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(raw
            .chunks_exact(2)
            .map(|pair| decode_delivery(&pair[0], &pair[1]))
            .collect())
    }

    async fn records(&self, start: isize, stop: isize) -> Result<Vec<String>, QueueError> {
        self.conn()
            .lrange(&self.dlq, start, stop)
            .await
            .map_err(QueueError::from)
    }

    /// Publishes a dead letter's envelope again, as new: attempts reset, fresh delivery tag.
    async fn replay_record(&self, raw: &str) -> Result<u64, QueueError> {
        let envelope = serde_json::from_str::<Record>(raw)
            .map(|r| fresh_envelope(&r.envelope))
            .unwrap_or_default();
        if envelope.is_empty() {
            tracing::warn!("unreadable dead-letter record left on the DLQ");
            return Ok(0);
        }
        let n: i64 = self
            .replay
            .key(&self.dlq)
            .key(&self.queue)
            .arg(raw)
            .arg(&envelope)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// The envelope with `mailhook_attempts` and the redelivered marks removed and a new tag.
/// A record whose envelope is not JSON goes back unchanged.
fn fresh_envelope(envelope: &str) -> String {
    let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(envelope) else {
        return envelope.to_owned();
    };
    if let Some(Value::Object(h)) = m.get_mut("headers") {
        h.remove("redelivered");
    }
    if let Some(Value::Object(p)) = m.get_mut("properties") {
        p.remove("mailhook_attempts");
        p.insert(
            "delivery_tag".into(),
            Value::String(uuid::Uuid::new_v4().to_string()),
        );
        if let Some(Value::Object(di)) = p.get_mut("delivery_info") {
            di.remove("redelivered");
        }
    }
    Value::Object(m).to_string()
}

/// Reads a kombu envelope. An envelope we cannot read still becomes a delivery, with an empty
/// body (and possibly no task name), so the worker dead-letters it instead of losing it.
fn decode_delivery(tag: &str, envelope: &str) -> Delivery {
    let v: Value = serde_json::from_str(envelope).unwrap_or(Value::Null);
    let header = |k: &str| {
        v.get("headers")
            .and_then(|h| h.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let props = v.get("properties");
    let body = v.get("body").and_then(Value::as_str).unwrap_or_default();
    let base64 = props
        .and_then(|p| p.get("body_encoding"))
        .and_then(Value::as_str)
        == Some("base64");
    let body = if base64 {
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap_or_default()
    } else {
        body.as_bytes().to_vec()
    };
    let restored = props
        .and_then(|p| p.get("mailhook_attempts"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Delivery {
        tag: tag.to_owned(),
        task_id: header("id"),
        task: header("task"),
        body,
        attempts: u32::try_from(restored.saturating_add(1)).unwrap_or(u32::MAX),
    }
}

#[async_trait]
impl Backend for RedisBackend {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        // Redis has the message once LPUSH has answered (fsync depends on its appendonly
        // setting, as for Celery itself).
        let envelope = self.envelope(msg)?;
        let _: i64 = self.conn().lpush(&self.queue, envelope).await?;
        Ok(())
    }

    /// Publishers are other processes as often as not, so there is nothing to wait on: the
    /// fetch polls (the default [`Backend::ready`]).
    async fn claim(&self, max: usize, max_bytes: usize) -> Result<Vec<Delivery>, QueueError> {
        if let Err(e) = self.maybe_restore().await {
            // Restore is housekeeping: a failure must not stop consumption.
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "restoring expired unacked messages failed"
            );
        }
        self.pop(max, max_bytes).await
    }

    async fn ack(&self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        let tags: Vec<&str> = deliveries.iter().map(|d| d.tag.as_str()).collect();
        redis::pipe()
            .atomic()
            .zrem(UNACKED_INDEX, &tags)
            .ignore()
            .hdel(UNACKED, &tags)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(QueueError::from)
    }

    async fn retry(&self, deliveries: &[Delivery], delay: Duration) -> Result<(), QueueError> {
        // Re-scored so that it looks fetched `visibility - delay` ago: any restorer (ours or a
        // Python worker's) puts it back on the queue after `delay`. XX: never resurrect a tag
        // acked meanwhile.
        let score = now_secs() - self.visibility.as_secs_f64() + delay.as_secs_f64();
        let mut pipe = redis::pipe();
        for d in deliveries {
            pipe.cmd("ZADD")
                .arg(UNACKED_INDEX)
                .arg("XX")
                .arg(score)
                .arg(&d.tag)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        if let Ok(mut at) = self.restore_at.lock() {
            *at = (*at).min(Instant::now() + delay);
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
        failed_at: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        let mut conn = self.conn();
        let entry: Option<String> = conn.hget(UNACKED, &delivery.tag).await?;
        let Some(entry) = entry else {
            // Acked or restored meanwhile: it is either done or back on the queue.
            return Ok(());
        };
        let envelope = match serde_json::from_str::<Value>(&entry) {
            Ok(Value::Array(parts)) => match parts.into_iter().next() {
                Some(Value::String(raw)) => raw,
                Some(v) => v.to_string(),
                None => entry,
            },
            _ => entry,
        };
        let record = Record {
            id: uuid::Uuid::new_v4().simple().to_string(),
            task_id: delivery.task_id.clone(),
            task: delivery.task.clone(),
            reason: reason.to_owned(),
            attempts: delivery.attempts,
            failed_at: time_text(&failed_at),
            body_len: delivery.body.len(),
            envelope,
        };
        let record = serde_json::to_string(&record).map_err(Error::Encode)?;
        self.dead_letter
            .key(UNACKED)
            .key(UNACKED_INDEX)
            .key(&self.dlq)
            .arg(&delivery.tag)
            .arg(record)
            .invoke_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
        Ok(self
            .records(0, stop)
            .await?
            .iter()
            .filter_map(|raw| serde_json::from_str::<Record>(raw).ok())
            .map(|r| DeadLetter {
                id: r.id,
                task_id: r.task_id,
                task: r.task,
                reason: r.reason,
                attempts: r.attempts,
                failed_at: parse_time(&r.failed_at),
                body_len: r.body_len,
            })
            .collect())
    }

    /// Ids are the records' own; a record that cannot be read is never matched (and stays).
    async fn dlq_replay(&self, ids: &[String]) -> Result<u64, QueueError> {
        let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut n = 0;
        for raw in self.records(0, -1).await? {
            let hit = serde_json::from_str::<Record>(&raw).is_ok_and(|r| wanted.contains(&*r.id));
            if hit {
                n += self.replay_record(&raw).await?;
            }
        }
        Ok(n)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undecodable_envelopes_still_deliver() {
        let d = decode_delivery("t", "not json");
        assert_eq!((d.tag.as_str(), d.task.as_str(), d.attempts), ("t", "", 1));
        assert!(d.body.is_empty());
        let d = decode_delivery(
            "t",
            r#"{"body":"%%%","headers":{"id":"i","task":"x"},"properties":{"body_encoding":"base64","mailhook_attempts":2}}"#,
        );
        assert_eq!((d.task_id.as_str(), d.task.as_str()), ("i", "x"));
        assert!(d.body.is_empty());
        assert_eq!(d.attempts, 3);
    }

    #[test]
    fn replay_resets_the_count_and_the_tag() {
        let env = r#"{"headers":{"redelivered":true},"properties":{"mailhook_attempts":4,"delivery_tag":"a","delivery_info":{"exchange":"","routing_key":"q","redelivered":true}}}"#;
        let v: Value = serde_json::from_str(&fresh_envelope(env)).expect("JSON");
        assert!(v["properties"].get("mailhook_attempts").is_none());
        assert!(v["headers"].get("redelivered").is_none());
        assert_ne!(v["properties"]["delivery_tag"], "a");
        assert_eq!(v["properties"]["delivery_info"]["routing_key"], "q");
        assert_eq!(fresh_envelope("raw"), "raw");
    }
}
