//! The consumer channel: what it holds unacked (with each message's properties, to republish a
//! copy intact), and acks, requeues and delayed retries against it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};

use super::convert::{as_string, as_u32, task_id_of, with_headers};
use super::{Error, Inner, ATTEMPTS_HEADER};
use crate::queue::Delivery;

pub(super) struct ConsumerSlot {
    pub(super) generation: u64,
    pub(super) channel: Channel,
    pub(super) consumer: Consumer,
}

/// The current consumer channel and the properties of the messages it holds unacked.
#[derive(Default)]
pub(super) struct Link {
    pub(super) generation: u64,
    pub(super) channel: Option<Channel>,
    /// Unacked delivery tag -> properties, to republish a copy (retry, dead letter) intact.
    pub(super) held: BTreeMap<u64, BasicProperties>,
}

impl Inner {
    /// Opens a consumer on its own channel and makes it the one acks go to.
    pub(super) async fn start_consumer(&self) -> Result<ConsumerSlot, Error> {
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

    pub(super) fn lock_link(&self) -> Result<std::sync::MutexGuard<'_, Link>, Error> {
        self.link
            .lock()
            .map_err(|_| Error::Poisoned("consumer state"))
    }

    /// Turns an AMQP delivery into ours, remembering its properties until it is settled.
    pub(super) fn track(&self, generation: u64, d: AmqpDelivery) -> Result<Delivery, Error> {
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
    pub(super) fn current_tags(&self, deliveries: &[Delivery]) -> Result<(Vec<u64>, usize), Error> {
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
    pub(super) async fn ack_tags(&self, tags: &[u64]) -> Result<(), Error> {
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
            return Err(Error::LostChannel);
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
    async fn requeue_tags(&self, tags: &[u64]) -> Result<(), Error> {
        let channel = {
            let mut link = self.lock_link()?;
            for t in tags {
                link.held.remove(t);
            }
            link.channel.clone()
        };
        let Some(channel) = channel else {
            return Err(Error::LostChannel);
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

    pub(super) fn held_props(&self, tag: u64) -> Result<BasicProperties, Error> {
        Ok(self
            .lock_link()?
            .held
            .get(&tag)
            .cloned()
            .unwrap_or_default())
    }

    /// Republishes copies with the attempts header bumped, then acks the originals: a crash in
    /// between leaves both (a duplicate the store's dedupe key absorbs), never neither.
    pub(super) async fn republish_then_ack(&self, held: Vec<(u64, BasicProperties, Delivery)>) {
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
                    tracing::warn!(
                        task_id = %d.task_id,
                        error = &e as &dyn std::error::Error,
                        "retry republish failed; requeueing"
                    );
                    failed.push(*tag);
                }
            }
        }
        if let Err(e) = self.ack_tags(&done).await {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "ack after retry republish failed; duplicates will be deduplicated"
            );
        }
        if !failed.is_empty() {
            if let Err(e) = self.requeue_tags(&failed).await {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "requeue after failed retry failed; RabbitMQ redelivers on reconnect"
                );
            }
        }
    }
}

/// `<generation>:<delivery tag>`.
pub(super) fn parse_tag(tag: &str) -> Option<(u64, u64)> {
    let (g, t) = tag.split_once(':')?;
    Some((g.parse().ok()?, t.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_reject_garbage() {
        assert_eq!(parse_tag("3:17"), Some((3, 17)));
        assert_eq!(parse_tag("17"), None);
        assert_eq!(parse_tag("a:b"), None);
    }
}
