//! The dead-letter queue: read with `basic_get` on a private channel, which puts back in place
//! whatever it did not ack when it closes.

use std::collections::HashSet;

use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};

use super::convert::{as_string, as_u32, task_id_of, without_headers};
use super::{Error, Inner, ATTEMPTS_HEADER, FAILED_AT_HEADER, REASON_HEADER};
use crate::queue::{parse_time, DeadLetter};

/// Dead letters replayed per pipelined round of confirms.
const REPLAY_CHUNK: usize = 256;

impl Inner {
    /// Reads up to `limit` dead letters with `basic_get`, without acking them, on a private
    /// channel, then closes it so RabbitMQ puts them back where they were. While a listing runs,
    /// those messages are invisible to other DLQ readers; a crash during it requeues them too.
    pub(super) async fn list(&self, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        let _one_at_a_time = self.dlq_ops.lock().await;
        let session = self.session().await?;
        let ch = session.conn.create_channel().await?;
        let listed = async {
            let mut out = Vec::new();
            while out.len() < limit {
                match ch
                    .basic_get(&self.dlq, BasicGetOptions { no_ack: false })
                    .await?
                {
                    Some(m) => out.push(dead_letter_of(&m.delivery)),
                    None => break,
                }
            }
            Ok::<_, Error>(out)
        }
        .await;
        let _ = ch.close(200, "dlq listed").await;
        listed
    }

    /// Moves the DLQ messages whose task id is in `ids` back to the main queue, as new messages
    /// (our attempt, reason and time headers removed), stopping once all are found. Messages
    /// scanned but not wanted stay unacked on a private channel, and closing it puts them back
    /// in place.
    pub(super) async fn replay(&self, ids: &[String]) -> Result<u64, Error> {
        let mut wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let _one_at_a_time = self.dlq_ops.lock().await;
        let session = self.session().await?;
        let ch = session.conn.create_channel().await?;
        let result = async {
            let mut moved = 0u64;
            loop {
                let mut chunk = Vec::new();
                let mut exhausted = false;
                while chunk.len() < REPLAY_CHUNK && !wanted.is_empty() {
                    let Some(m) = ch
                        .basic_get(&self.dlq, BasicGetOptions { no_ack: false })
                        .await?
                    else {
                        exhausted = true;
                        break;
                    };
                    if wanted.remove(task_id_of(&m.delivery.properties).as_str()) {
                        chunk.push(m.delivery);
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
                if exhausted || wanted.is_empty() {
                    return Ok::<u64, Error>(moved);
                }
            }
        }
        .await;
        // Closing requeues every scanned message we did not ack, in its original place.
        let _ = ch.close(200, "dlq scan done").await;
        result
    }
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
            .as_deref()
            .and_then(parse_time),
        body_len: d.data.len(),
    }
}
