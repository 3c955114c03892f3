//! The dead-letter queue: read with `basic_get` on a private channel, which puts back in place
//! whatever it did not ack when it closes.

use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};

use super::convert::{as_string, as_u32, task_id_of, without_headers};
use super::{Error, Inner, ATTEMPTS_HEADER, FAILED_AT_HEADER, REASON_HEADER};
use crate::queue::DeadLetter;

/// Dead letters replayed per pipelined round of confirms.
const REPLAY_CHUNK: usize = 256;

impl Inner {
    /// but not wanted stay unacked on a private channel, and closing it puts them back in place.
    pub(super) async fn replay_where(
        &self,
        mut wanted: impl FnMut(&str) -> bool,
        only_one: bool,
    ) -> Result<u64, Error> {
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

pub(super) fn dead_letter_of(d: &AmqpDelivery) -> DeadLetter {
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
