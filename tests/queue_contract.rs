//! One contract, every broker: the same functions run against each backend.
//! Backends whose server is absent are skipped locally and fail under CI=true.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use mailhook::queue::{self, Broker, BrokerConfig, TaskMessage};

fn msg(n: usize) -> TaskMessage {
    let payload = format!(r#"{{"notificationType":"OPENED","messageId":"m-{n}"}}"#);
    TaskMessage::for_payload(
        mailhook::config::DEFAULT_TASK,
        payload.as_bytes(),
        Utc::now(),
    )
}

/// Fetches until `n` deliveries arrived or the deadline passes.
async fn fetch_n(b: &Arc<dyn Broker>, n: usize) -> Vec<queue::Delivery> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while got.len() < n && std::time::Instant::now() < deadline {
        got.extend(
            b.fetch(n - got.len(), Duration::from_millis(500))
                .await
                .expect("fetch"),
        );
    }
    got
}

/// Published messages come out whole, in order, and are gone once acked.
pub async fn publish_fetch_ack(b: Arc<dyn Broker>) {
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

/// An unacked message comes back after the visibility timeout (or on consumer loss).
pub async fn unacked_comes_back(
    b: Arc<dyn Broker>,
    reopen: impl std::future::Future<Output = Arc<dyn Broker>>,
) {
    let m = msg(1);
    b.publish(&m).await.expect("publish");
    let got = fetch_n(&b, 1).await;
    assert_eq!(got.len(), 1);
    drop(got);
    drop(b);
    let b = reopen.await;
    let again = fetch_n(&b, 1).await;
    assert_eq!(again.len(), 1, "the unacked message is delivered again");
    assert_eq!(again[0].task_id, m.id);
    b.ack(&again).await.expect("ack");
}

/// A retried message is delivered again, with its attempt counted.
pub async fn retry_redelivers(b: Arc<dyn Broker>) {
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
pub async fn dead_letter_and_replay(b: Arc<dyn Broker>) {
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
    assert_eq!(b.dlq_replay(Some(&dl[0].id)).await.expect("replay one"), 1);
    assert!(b.dlq_replay(Some("no-such-id")).await.is_err());
    let one = fetch_n(&b, 1).await;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].task_id, dl[0].task_id);
    b.ack(&one).await.expect("ack");
    assert_eq!(b.dlq_replay(None).await.expect("replay all"), 2);
    assert!(b.dlq_list(10).await.expect("list").is_empty());
    let rest = fetch_n(&b, 2).await;
    assert_eq!(rest.len(), 2);
    b.ack(&rest).await.expect("ack");
}

/// Concurrent publishers all land, each exactly once.
pub async fn concurrent_publish(b: Arc<dyn Broker>) {
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

mod sqlite {
    use super::*;

    fn cfg(dir: &std::path::Path) -> BrokerConfig {
        BrokerConfig {
            url: format!("sqlite://{}", dir.join("q.db").display()),
            queue: "email-webhook".into(),
            visibility_timeout: Duration::from_secs(1),
            prefetch: 64,
        }
    }

    async fn open(dir: &std::path::Path) -> Arc<dyn Broker> {
        queue::connect(&cfg(dir)).await.expect("sqlite broker")
    }

    #[tokio::test]
    async fn publish_fetch_ack() {
        let d = tempfile::tempdir().expect("dir");
        super::publish_fetch_ack(open(d.path()).await).await;
    }

    #[tokio::test]
    async fn unacked_comes_back() {
        let d = tempfile::tempdir().expect("dir");
        super::unacked_comes_back(open(d.path()).await, open(d.path())).await;
    }

    #[tokio::test]
    async fn retry_redelivers() {
        let d = tempfile::tempdir().expect("dir");
        super::retry_redelivers(open(d.path()).await).await;
    }

    #[tokio::test]
    async fn dead_letter_and_replay() {
        let d = tempfile::tempdir().expect("dir");
        super::dead_letter_and_replay(open(d.path()).await).await;
    }

    #[tokio::test]
    async fn concurrent_publish() {
        let d = tempfile::tempdir().expect("dir");
        super::concurrent_publish(open(d.path()).await).await;
    }
}

mod amqp {
    use super::*;

    // Prefetch above the 200 messages `concurrent_publish` holds unacked at once: RabbitMQ stops
    // delivering at the prefetch limit, and the contract fetches everything before acking.
    fn cfg(url: &str, queue: &str) -> BrokerConfig {
        BrokerConfig {
            url: url.to_owned(),
            queue: queue.to_owned(),
            visibility_timeout: Duration::from_secs(1),
            prefetch: 256,
        }
    }

    /// A broker on a queue no other test uses, or `None` (skip) without RabbitMQ.
    async fn open() -> Option<(Arc<dyn Broker>, String, String)> {
        let url = common::amqp_url().await?;
        let queue = common::unique_queue("contract");
        let b = queue::connect(&cfg(&url, &queue))
            .await
            .expect("amqp broker");
        Some((b, url, queue))
    }

    /// Removes the test's queues and exchange so runs do not pile up on the server.
    async fn cleanup(url: &str, queue: &str) {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        let Ok(conn) =
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
        else {
            return;
        };
        if let Ok(ch) = conn.create_channel().await {
            for q in [queue.to_owned(), format!("{queue}.dlq")] {
                let _ = ch.queue_delete(&q, QueueDeleteOptions::default()).await;
            }
            let _ = ch
                .exchange_delete(queue, ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "test done").await;
    }

    #[tokio::test]
    async fn publish_fetch_ack() {
        let Some((b, url, q)) = open().await else {
            return;
        };
        super::publish_fetch_ack(b).await;
        cleanup(&url, &q).await;
    }

    #[tokio::test]
    async fn unacked_comes_back() {
        let Some((b, url, q)) = open().await else {
            return;
        };
        let reopen = async { queue::connect(&cfg(&url, &q)).await.expect("amqp broker") };
        super::unacked_comes_back(b, reopen).await;
        cleanup(&url, &q).await;
    }

    #[tokio::test]
    async fn retry_redelivers() {
        let Some((b, url, q)) = open().await else {
            return;
        };
        super::retry_redelivers(b).await;
        cleanup(&url, &q).await;
    }

    #[tokio::test]
    async fn dead_letter_and_replay() {
        let Some((b, url, q)) = open().await else {
            return;
        };
        super::dead_letter_and_replay(b).await;
        cleanup(&url, &q).await;
    }

    #[tokio::test]
    async fn concurrent_publish() {
        let Some((b, url, q)) = open().await else {
            return;
        };
        super::concurrent_publish(b).await;
        cleanup(&url, &q).await;
    }
}

mod redis {
    use super::*;

    /// `url` with its database number replaced by `db`.
    ///
    /// kombu's unacked bookkeeping is one per Redis database, and whoever restores it uses its
    /// own visibility timeout for every queue: the test with a 1 s timeout gets a database of its
    /// own, so it never hands back another test's in-flight messages.
    fn with_db(url: &str, db: u8) -> String {
        match url.rsplit_once('/') {
            Some((base, n)) if n.parse::<u8>().is_ok() => format!("{base}/{db}"),
            _ => format!("{}/{db}", url.trim_end_matches('/')),
        }
    }

    fn cfg(url: &str, queue: &str, visibility: Duration) -> BrokerConfig {
        BrokerConfig {
            url: url.to_owned(),
            queue: queue.to_owned(),
            visibility_timeout: visibility,
            prefetch: 256,
        }
    }

    /// A broker on a queue no other test uses, or `None` (skip) without Redis.
    async fn open(db: u8, visibility: Duration) -> Option<(Arc<dyn Broker>, String, String)> {
        let url = with_db(&common::redis_url().await?, db);
        let queue = common::unique_queue("contract");
        let b = queue::connect(&cfg(&url, &queue, visibility))
            .await
            .expect("redis broker");
        Some((b, url, queue))
    }

    /// Removes the test's keys so runs do not pile up on the server.
    async fn cleanup(url: &str, queue: &str) {
        let Ok(client) = ::redis::Client::open(url) else {
            return;
        };
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            let _: Result<(), _> = ::redis::cmd("DEL")
                .arg(queue)
                .arg(format!("{queue}.dlq"))
                .arg(format!("_kombu.binding.{queue}"))
                .arg(format!("_kombu.binding_permanent.{queue}"))
                .query_async(&mut c)
                .await;
        }
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn publish_fetch_ack() {
        let Some((b, url, q)) = open(0, LONG).await else {
            return;
        };
        super::publish_fetch_ack(b).await;
        cleanup(&url, &q).await;
    }

    /// Also the kill -9 case: the first broker is dropped with the message unacked, as a
    /// crashed worker leaves it; the next consumer restores it after the visibility timeout.
    #[tokio::test]
    async fn unacked_comes_back() {
        let vt = Duration::from_secs(1);
        let Some((b, url, q)) = open(1, vt).await else {
            return;
        };
        let reopen = async { queue::connect(&cfg(&url, &q, vt)).await.expect("redis") };
        super::unacked_comes_back(b, reopen).await;
        cleanup(&url, &q).await;
    }

    #[tokio::test]
    async fn retry_redelivers() {
        let Some((b, url, q)) = open(0, LONG).await else {
            return;
        };
        super::retry_redelivers(b).await;
        cleanup(&url, &q).await;
    }

    #[tokio::test]
    async fn dead_letter_and_replay() {
        let Some((b, url, q)) = open(0, LONG).await else {
            return;
        };
        super::dead_letter_and_replay(b).await;
        cleanup(&url, &q).await;
    }

    #[tokio::test]
    async fn concurrent_publish() {
        let Some((b, url, q)) = open(0, LONG).await else {
            return;
        };
        super::concurrent_publish(b).await;
        cleanup(&url, &q).await;
    }

    /// One fetch hands out about 16 MiB at most, so large callbacks cannot exhaust memory;
    /// the rest waits for the next fetch.
    #[tokio::test]
    async fn fetch_is_bounded_in_bytes() {
        let Some((b, url, q)) = open(0, LONG).await else {
            return;
        };
        let big = format!(
            r#"{{"notificationType":"OPENED","messageId":"big","pad":"{}"}}"#,
            "x".repeat(6 << 20)
        );
        for _ in 0..4 {
            let m = TaskMessage::for_payload(
                mailhook::config::DEFAULT_TASK,
                big.as_bytes(),
                Utc::now(),
            );
            b.publish(&m).await.expect("publish");
        }
        let first = b.fetch(10, Duration::from_secs(2)).await.expect("fetch");
        assert!(
            (1..4).contains(&first.len()),
            "one fetch took {} messages of 6 MiB",
            first.len()
        );
        let rest = fetch_n(&b, 4 - first.len()).await;
        assert_eq!(first.len() + rest.len(), 4);
        b.ack(&first).await.expect("ack");
        b.ack(&rest).await.expect("ack");
        cleanup(&url, &q).await;
    }
}
