//! Faults on the embedded default: a full queue disk, a failing database. Callers get 503 with
//! `Retry-After`, never a 2xx for something not stored; afterwards every accepted callback is
//! stored once.

use std::sync::Arc;
use std::time::Duration;

use mailhook::http::{router, AppState};
use mailhook::queue::sqlite::SqliteBackend;
use mailhook::queue::Broker;
use mailhook::sqlite::connect_options;
use mailhook::store;
use mailhook::worker::{Worker, WorkerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::common::app::{serve_args, spawn_with, sqlite_common, TestApp};
use crate::common::brokers::broker_cfg;
use crate::common::{eventually, example, wait_for_rows};

#[tokio::test]
async fn full_queue_disk_answers_503_then_recovers() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    let cfg = broker_cfg(&url, "email-webhook", Duration::from_secs(5));
    // A queue file that may not grow past 64 pages of 4 KiB: the disk is "full" at 256 KiB.
    let opts = connect_options(&cfg.url)
        .expect("opts")
        .pragma("max_page_count", "64");
    let broker = Broker::new(SqliteBackend::open_with(&cfg, opts).await.expect("open"));
    let state = AppState {
        broker: broker.clone(),
        task_name: mailhook::config::DEFAULT_TASK.into(),
        queue: "email-webhook".into(),
        body_limit: 1 << 20,
        in_flight: Arc::new(tokio::sync::Semaphore::new(64)),
        health: Arc::default(),
        worker: false,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        async move { axum::serve(listener, router(state, Duration::from_secs(30))).await },
    );
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/email");
    let pad = "x".repeat(3000);
    let post = |i: usize| {
        let body = json!({"notificationType": "OPENED", "messageId": format!("full-{i}"),
            "recipient": "a@b.c", "pad": pad});
        client.post(&url).json(&body).send()
    };

    // Fill the queue with no worker running, until the queue refuses.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..400 {
        let r = post(i).await.expect("sent");
        match r.status().as_u16() {
            202 => accepted.push(format!("full-{i}")),
            503 => {
                assert!(r.headers().contains_key("retry-after"));
                let err: serde_json::Value = r.json().await.expect("json");
                assert_eq!(err["kind"], "queue_unavailable");
                refused += 1;
                if refused > 3 {
                    break;
                }
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(refused > 0, "the full queue refused callbacks");
    assert!(!accepted.is_empty());

    // A worker drains the queue; freed pages are reused and the API accepts again.
    let db = format!("sqlite://{}", dir.path().join("mailhook.db").display());
    let s = store::connect(&db, 2).await.expect("store");
    s.migrate().await.expect("migrate");
    let stop = CancellationToken::new();
    let w = Worker::new(broker.clone(), s.clone(), WorkerConfig::default());
    let handle = tokio::spawn(w.run(stop.clone()));
    wait_for_rows(&s, accepted.len() as i64).await;
    let r = post(10_000).await.expect("sent");
    assert_eq!(r.status(), 202, "accepts again once drained");
    accepted.push("full-10000".into());
    wait_for_rows(&s, accepted.len() as i64).await;
    for id in &accepted {
        assert_eq!(s.by_id_externo(id).await.expect("rows").len(), 1, "{id}");
    }
    stop.cancel();
    handle.await.expect("worker");
}

/// `GET /health` on `app`: its status code and JSON body.
pub async fn health(app: &TestApp) -> (u16, serde_json::Value) {
    let r = app
        .client
        .get(app.url("/health"))
        .send()
        .await
        .expect("health");
    let code = r.status().as_u16();
    (code, r.json().await.expect("health JSON"))
}

/// The most deliveries any message of the queue file at `url` has had.
pub async fn max_attempts(url: &str) -> Option<i64> {
    let q = sqlx::SqlitePool::connect(url).await.ok()?;
    let n = sqlx::query_scalar("SELECT max(attempts) FROM queue_lease")
        .fetch_one(&q)
        .await
        .ok()?;
    q.close().await;
    n
}

#[tokio::test]
async fn a_missing_table_is_an_outage_waited_out_without_spending_attempts() {
    let dir = tempfile::tempdir().expect("dir");
    let app = spawn_with(
        sqlite_common(dir.path()),
        serve_args(&["--stall-after", "1"]),
    )
    .await;
    // Break the table under the worker: inserts fail until it is back.
    let url = format!("sqlite://{}", dir.path().join("mailhook.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("pool");
    sqlx::query("ALTER TABLE email_callback RENAME TO email_callback_away")
        .execute(&pool)
        .await
        .expect("rename");
    assert_eq!(app.post(example("delivered")).await.status(), 202);
    // The worker holds the message and retries; /health says the store fails, then that the
    // worker is stalled, while callbacks are still accepted (200, degraded).
    let (code, body) = eventually("a stalled worker", Duration::from_secs(10), || async {
        let (code, body) = health(&app).await;
        body["worker"]
            .as_str()?
            .starts_with("stalled")
            .then_some((code, body))
    })
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["queue"], "ok", "{body}");
    assert!(
        body["store"]
            .as_str()
            .is_some_and(|s| s.contains("no such table")),
        "{body}"
    );
    // No delivery attempt is spent on an outage, and nothing is dead-lettered for it.
    let q_url = format!(
        "sqlite://{}",
        dir.path().join("mailhook-queue.db").display()
    );
    assert_eq!(max_attempts(&q_url).await, Some(1));
    assert_eq!(app.store.count().await.ok(), None, "the table is away");
    sqlx::query("ALTER TABLE email_callback_away RENAME TO email_callback")
        .execute(&pool)
        .await
        .expect("rename back");
    wait_for_rows(&app.store, 1).await;
    eventually("/health ok again", Duration::from_secs(10), || async {
        let (code, body) = health(&app).await;
        (code == 200 && body["status"] == "ok" && body["worker"] == "ok").then_some(())
    })
    .await;
    app.stop().await;
}
