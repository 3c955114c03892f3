//! One contract, every broker: [`broker_suite!`] runs the same functions against SQLite, Redis
//! and RabbitMQ. Backends whose server is absent are skipped locally and fail under CI=true.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use mailhook::config::DEFAULT_TASK;
use mailhook::queue::{self, QueueError, TaskMessage, MAX_FETCH_BYTES};
use mailhook::store::{self, Store};

use crate::common::app::{serve_args, spawn_with};
use crate::common::brokers::{fetch_n, BrokerFixture};
use crate::common::{opened, wait_for_rows};

fn msg(n: usize) -> TaskMessage {
    let payload = format!(r#"{{"notificationType":"OPENED","messageId":"m-{n}"}}"#);
    TaskMessage::for_payload(DEFAULT_TASK, payload.as_bytes(), Utc::now())
}

/// Published messages come out whole, in order, and are gone once acked.
pub async fn publish_fetch_ack(f: &BrokerFixture) {
    let b = f.connect().await;
    let sent: Vec<_> = (0..5).map(msg).collect();
    for m in &sent {
        b.publish(m).await.expect("publish");
    }
    let got = fetch_n(&b, 5).await;
    assert_eq!(got.len(), 5);
    for (d, m) in got.iter().zip(&sent) {
        assert_eq!(d.task_id, m.id);
        assert_eq!(d.task, m.task);
        assert_eq!(d.body, m.body);
        assert_eq!(d.attempts, 1);
    }
    b.ack(&got).await.expect("ack");
    let rest = b
        .fetch(10, Duration::from_millis(300))
        .await
        .expect("fetch");
    assert!(rest.is_empty(), "acked messages do not come back");
}

/// An unacked message comes back after the visibility timeout, or when its consumer is gone
/// (the first broker is dropped with the message unacked, as a killed worker leaves it).
pub async fn unacked_comes_back(f: &BrokerFixture) {
    let b = f.connect().await;
    let m = msg(1);
    b.publish(&m).await.expect("publish");
    let got = fetch_n(&b, 1).await;
    assert_eq!(got.len(), 1);
    drop(got);
    drop(b);
    let b = f.connect().await;
    let again = fetch_n(&b, 1).await;
    assert_eq!(again.len(), 1, "the unacked message is delivered again");
    assert_eq!(again[0].task_id, m.id);
    b.ack(&again).await.expect("ack");
}

/// A retried message is delivered again, with its attempt counted.
pub async fn retry_redelivers(f: &BrokerFixture) {
    let b = f.connect().await;
    let m = msg(2);
    b.publish(&m).await.expect("publish");
    let got = fetch_n(&b, 1).await;
    b.retry(&got, Duration::from_millis(200))
        .await
        .expect("retry");
    let again = fetch_n(&b, 1).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].task_id, m.id);
    assert!(
        again[0].attempts >= 2,
        "attempts counted: {}",
        again[0].attempts
    );
    b.ack(&again).await.expect("ack");
}

/// Dead letters are listed with their reason and can be replayed, one or all.
pub async fn dead_letter_and_replay(f: &BrokerFixture) {
    let b = f.connect().await;
    for i in 10..13 {
        b.publish(&msg(i)).await.expect("publish");
    }
    let got = fetch_n(&b, 3).await;
    assert_eq!(got.len(), 3);
    for d in &got {
        b.dead_letter(d, "unknown task name `x`")
            .await
            .expect("dead letter");
    }
    assert!(b
        .fetch(10, Duration::from_millis(300))
        .await
        .expect("fetch")
        .is_empty());
    let dl = b.dlq_list(10).await.expect("list");
    assert_eq!(dl.len(), 3);
    assert!(dl
        .iter()
        .all(|d| d.reason == "unknown task name `x`" && d.attempts >= 1));
    assert!(
        dl.iter().all(|d| d
            .failed_at
            .is_some_and(|t| (Utc::now() - t).num_seconds().abs() < 60)),
        "stamped with the time: {dl:?}"
    );
    b.dlq_replay(&dl[0].id).await.expect("replay one");
    assert!(
        matches!(b.dlq_replay("no-such-id").await, Err(QueueError::NotFound(id)) if id == "no-such-id"),
        "replaying nothing is `not found`"
    );
    let one = fetch_n(&b, 1).await;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].task_id, dl[0].task_id);
    assert_eq!(one[0].attempts, 1, "a replayed message starts over");
    b.ack(&one).await.expect("ack");
    let mut progress = Vec::new();
    let all = b
        .dlq_replay_all(|done, total| progress.push((done, total)))
        .await
        .expect("replay all");
    assert_eq!(all, 2);
    assert_eq!(progress, [(2, 2)]);
    assert!(b.dlq_list(10).await.expect("list").is_empty());
    let rest = fetch_n(&b, 2).await;
    assert_eq!(rest.len(), 2);
    b.ack(&rest).await.expect("ack");
}

/// Replaying several dead letters moves those that exist and counts only them.
pub async fn dlq_replay_many_counts_what_it_finds(f: &BrokerFixture) {
    let b = f.connect().await;
    for i in 20..23 {
        b.publish(&msg(i)).await.expect("publish");
    }
    for d in &fetch_n(&b, 3).await {
        b.dead_letter(d, "refused").await.expect("dead letter");
    }
    let dl = b.dlq_list(10).await.expect("list");
    assert_eq!(dl.len(), 3);
    assert_eq!(b.dlq_replay_many(&[]).await.expect("replay none"), 0);
    let ids = [dl[0].id.clone(), "no-such-id".to_owned(), dl[2].id.clone()];
    assert_eq!(b.dlq_replay_many(&ids).await.expect("replay many"), 2);
    let left = b.dlq_list(10).await.expect("list");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].task_id, dl[1].task_id);
    let back = fetch_n(&b, 2).await;
    let mut got: Vec<_> = back.iter().map(|d| d.task_id.as_str()).collect();
    let mut want = [dl[0].task_id.as_str(), dl[2].task_id.as_str()];
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    b.ack(&back).await.expect("ack");
    assert_eq!(b.dlq_replay_all(|_, _| {}).await.expect("replay all"), 1);
    b.ack(&fetch_n(&b, 1).await).await.expect("ack");
}

/// One fetch hands out at most [`MAX_FETCH_BYTES`] of messages, so a batch of large callbacks
/// cannot exhaust memory; the rest waits, in order, for the next fetch. A message larger than
/// the budget still travels, alone.
pub async fn fetch_is_bounded_in_bytes(f: &BrokerFixture) {
    let b = f.connect().await;
    let payload = |n: usize, pad: usize| {
        let pad = "x".repeat(pad);
        format!(r#"{{"notificationType":"OPENED","messageId":"big-{n}","pad":"{pad}"}}"#)
    };
    // Each within the budget (Redis stores bodies in base64, a third larger), any two over it.
    let mut sent: Vec<_> = (0..3)
        .map(|n| payload(n, MAX_FETCH_BYTES * 2 / 3))
        .collect();
    sent.push(payload(3, MAX_FETCH_BYTES + 1));
    sent.push(payload(4, 0));
    let sent: Vec<_> = sent
        .iter()
        .map(|p| TaskMessage::for_payload(DEFAULT_TASK, p.as_bytes(), Utc::now()))
        .collect();
    for m in &sent {
        b.publish(m).await.expect("publish");
    }
    let mut taken = Vec::new();
    for m in &sent[..4] {
        let got = b.fetch(10, Duration::from_secs(5)).await.expect("fetch");
        let ids: Vec<_> = got.iter().map(|d| d.task_id.as_str()).collect();
        assert_eq!(ids, [m.id.as_str()], "one fetch, one large message");
        taken.extend(got);
    }
    let last = fetch_n(&b, 1).await;
    assert_eq!(last.len(), 1);
    assert_eq!(
        last[0].task_id, sent[4].id,
        "the small one after the oversized one"
    );
    taken.extend(last);
    b.ack(&taken).await.expect("ack");
}

/// Concurrent publishers all land, each exactly once.
pub async fn concurrent_publish(f: &BrokerFixture) {
    let b = f.connect().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let m = msg(1000 + i);
            b.publish(&m).await.expect("publish");
            m.id
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.expect("task"));
    }
    let got = fetch_n(&b, 200).await;
    let mut ids: Vec<_> = got.iter().map(|d| d.task_id.clone()).collect();
    ids.sort();
    sent.sort();
    assert_eq!(ids, sent);
    b.ack(&got).await.expect("ack");
}

/// A consumer that dies holding a batch unacked, after storing part of it, loses nothing and
/// doubles nothing: the batch comes back to the next worker (after the visibility timeout, or
/// at once when the broker sees the consumer go) and the dedupe key absorbs the rows already
/// stored.
pub async fn killed_consumer_batch_comes_back_without_doubles(f: &BrokerFixture) {
    let Some(database) = f.database().await else {
        return;
    };
    const N: usize = 60;
    let producer = f.connect().await;
    for n in 0..N {
        let m = TaskMessage::for_payload(DEFAULT_TASK, opened("crash", n).as_bytes(), Utc::now());
        producer.publish(&m).await.expect("publish");
    }
    let store: Arc<dyn Store> = store::connect(&database, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    {
        // The doomed worker: takes the whole batch, stores the first third, dies before acking.
        let doomed = f.connect().await;
        let batch = fetch_n(&doomed, N).await;
        assert_eq!(batch.len(), N, "the whole batch is delivered");
        let mut rows = Vec::new();
        for d in &batch[..N / 3] {
            let args = queue::celery::decode_body(&d.body).expect("body");
            rows.extend(
                mailhook::infobip::normalize(args.payload, Utc::now()).expect("valid payload"),
            );
        }
        assert_eq!(
            store.insert_batch(&rows).await.expect("insert"),
            (N / 3) as u64
        );
        // Nothing acked: dropping the broker leaves the batch as a killed process leaves it.
    }
    let app = spawn_with(f.common_args(&database), serve_args(&[])).await;
    wait_for_rows(&app.store, N as i64).await;
    app.stop().await;
    let after = f.connect().await;
    let left = after
        .fetch(N, Duration::from_millis(500))
        .await
        .expect("fetch");
    assert!(left.is_empty(), "{} messages left unsettled", left.len());
    assert_eq!(
        store.count().await.expect("count"),
        N as i64,
        "no row doubled"
    );
    for n in [0, N / 3, N - 1] {
        let rows = store
            .by_id_externo(&format!("crash-{n}"))
            .await
            .expect("by id");
        assert_eq!(rows.len(), 1, "callback {n} stored once");
    }
}

/// Runs the contract against the fixtures `$open` makes (`$open(lease) -> Option<BrokerFixture>`,
/// `None` to skip), cleaning up after each test.
macro_rules! broker_suite {
    ($open:path) => {
        use crate::common::brokers::Lease;

        #[tokio::test]
        async fn publish_fetch_ack() {
            let Some(f) = $open(Lease::Long).await else {
                return;
            };
            super::publish_fetch_ack(&f).await;
            f.cleanup().await;
        }

        #[tokio::test]
        async fn unacked_comes_back() {
            let Some(f) = $open(Lease::Short { redis_db: 1 }).await else {
                return;
            };
            super::unacked_comes_back(&f).await;
            f.cleanup().await;
        }

        #[tokio::test]
        async fn retry_redelivers() {
            let Some(f) = $open(Lease::Long).await else {
                return;
            };
            super::retry_redelivers(&f).await;
            f.cleanup().await;
        }

        #[tokio::test]
        async fn dead_letter_and_replay() {
            let Some(f) = $open(Lease::Long).await else {
                return;
            };
            super::dead_letter_and_replay(&f).await;
            f.cleanup().await;
        }

        #[tokio::test]
        async fn dlq_replay_many_counts_what_it_finds() {
            let Some(f) = $open(Lease::Long).await else {
                return;
            };
            super::dlq_replay_many_counts_what_it_finds(&f).await;
            f.cleanup().await;
        }

        #[tokio::test]
        async fn fetch_is_bounded_in_bytes() {
            let Some(f) = $open(Lease::Long).await else {
                return;
            };
            super::fetch_is_bounded_in_bytes(&f).await;
            f.cleanup().await;
        }

        #[tokio::test]
        async fn concurrent_publish() {
            let Some(f) = $open(Lease::Long).await else {
                return;
            };
            super::concurrent_publish(&f).await;
            f.cleanup().await;
        }

        #[tokio::test]
        async fn killed_consumer_batch_comes_back_without_doubles() {
            let Some(f) = $open(Lease::Short { redis_db: 2 }).await else {
                return;
            };
            super::killed_consumer_batch_comes_back_without_doubles(&f).await;
            f.cleanup().await;
        }
    };
}

mod sqlite {
    broker_suite!(crate::common::brokers::BrokerFixture::sqlite);
}

mod redis {
    broker_suite!(crate::common::brokers::BrokerFixture::redis);
}

mod amqp {
    broker_suite!(crate::common::brokers::BrokerFixture::amqp);
}
