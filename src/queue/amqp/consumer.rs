//! The consumer channel: taking what RabbitMQ pushed to it, what it holds unacked (with each
//! message's properties, to republish a copy intact), and acks, requeues and delayed retries
//! against it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use futures_util::{FutureExt, StreamExt};

use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};

use super::convert::{as_string, as_u32, task_id_of, with_headers};
use super::{Error, Inner, ATTEMPTS_HEADER};
use crate::queue::Delivery;

/// The consumer, created by the first claim; replaced when its channel is lost.
#[derive(Default)]
pub(super) struct ConsumerState {
    slot: Option<ConsumerSlot>,
    /// Why the consumer was lost while a fetch waited; the next claim returns it.
    failed: Option<Error>,
}

impl ConsumerState {
    /// Drops the consumer (dropping its channel makes RabbitMQ requeue what it held).
    pub(super) fn close(&mut self) {
        self.slot = None;
    }
}

pub(super) struct ConsumerSlot {
    generation: u64,
    channel: Channel,
    consumer: Consumer,
    /// A delivery already taken from the stream but not handed out: one read while a fetch
    /// waited, or one over a claim's byte budget. It is first in line for the next claim.
    stash: Option<AmqpDelivery>,
}

impl ConsumerSlot {
    /// The stashed delivery, else the next one RabbitMQ has already pushed, without waiting
    /// (`None`: nothing yet); an error when the consumer is gone.
    fn next_now(&mut self) -> Result<Option<AmqpDelivery>, Error> {
        if let Some(d) = self.stash.take() {
            return Ok(Some(d));
        }
        match self.consumer.next().now_or_never() {
            None => Ok(None),
            Some(item) => received(item).map(Some),
        }
    }
}

/// An item of the consumer stream: a delivery, or why the consumer is gone (a channel error,
/// or RabbitMQ cancelled it).
fn received(item: Option<Result<AmqpDelivery, lapin::Error>>) -> Result<AmqpDelivery, Error> {
    match item {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(e.into()),
        None => Err(Error::ConsumerCancelled),
    }
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
    /// Hands out what the consumer holds now: up to `max` deliveries, within `max_bytes` of
    /// bodies (the first always taken). A delivery over the budget is stashed for the next claim.
    pub(super) async fn claim(&self, max: usize, max_bytes: usize) -> Result<Vec<Delivery>, Error> {
        let mut guard = self.consumer.lock().await;
        let state = &mut *guard;
        if let Some(e) = state.failed.take() {
            return Err(e);
        }
        if state
            .slot
            .as_ref()
            .is_some_and(|s| !s.channel.status().connected())
        {
            state.slot = None;
        }
        let slot = match state.slot.as_mut() {
            Some(s) => s,
            None => state.slot.insert(self.start_consumer().await?),
        };
        let generation = slot.generation;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut lost = None;
        while out.len() < max {
            let d = match slot.next_now() {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => {
                    lost = Some(e);
                    break;
                }
            };
            if !out.is_empty() && bytes.saturating_add(d.data.len()) > max_bytes {
                slot.stash = Some(d);
                break;
            }
            bytes = bytes.saturating_add(d.data.len());
            out.push(self.track(generation, d)?);
        }
        if let Some(e) = lost {
            state.slot = None;
            if out.is_empty() {
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Waits until RabbitMQ pushes a delivery, and stashes it for the next claim; returns at
    /// once when a claim has something to take already (or no consumer exists yet: the claim
    /// starts one). Dropping the future (the fetch's pause is over) loses nothing.
    pub(super) async fn await_delivery(&self) {
        let mut guard = self.consumer.lock().await;
        let state = &mut *guard;
        if state.failed.is_some() {
            return;
        }
        let Some(slot) = state.slot.as_mut() else {
            return;
        };
        if slot.stash.is_some() {
            return;
        }
        match received(slot.consumer.next().await) {
            Ok(d) => slot.stash = Some(d),
            Err(e) => {
                state.slot = None;
                state.failed = Some(e);
            }
        }
    }

    /// Opens a consumer on its own channel and makes it the one acks go to.
    async fn start_consumer(&self) -> Result<ConsumerSlot, Error> {
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
            stash: None,
        })
    }

    pub(super) fn lock_link(&self) -> Result<std::sync::MutexGuard<'_, Link>, Error> {
        self.link
            .lock()
            .map_err(|_| Error::Poisoned("consumer state"))
    }

    /// Turns an AMQP delivery into ours, remembering its properties until it is settled.
    fn track(&self, generation: u64, d: AmqpDelivery) -> Result<Delivery, Error> {
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
