//! Messages the worker can never store go to `email-webhook.dlq` with a reason, and
//! `mailhook dlq list` / `mailhook dlq replay` bring them back.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use mailhook::config::DEFAULT_TASK;
use mailhook::queue::{self, Broker, TaskMessage};
use mailhook::store::{self, Store};
use mailhook::worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::common::brokers::broker_cfg;
use crate::common::{binary, eventually, example, wait_for_rows};

/// The queue and the table where `mailhook` run with `DATABASE_URL` set to `dir/mailhook.db`
/// (and no broker URL) finds them.
async fn setup(dir: &std::path::Path) -> (Broker, Arc<dyn Store>) {
    let url = format!("sqlite://{}", dir.join("mailhook-queue.db").display());
    let b = queue::connect(&broker_cfg(&url, "email-webhook", Duration::from_secs(5)))
        .await
        .expect("broker");
    let s = store::connect(
        &format!("sqlite://{}", dir.join("mailhook.db").display()),
        2,
    )
    .await
    .expect("store");
    s.migrate().await.expect("migrate");
    (b, s)
}

/// A connection to the database behind the store, to break the table under the worker.
async fn table(dir: &std::path::Path) -> sqlx::SqlitePool {
    let url = format!("sqlite://{}", dir.join("mailhook.db").display());
    sqlx::SqlitePool::connect(&url).await.expect("pool")
}

fn cli(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(args)
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("mailhook.db").display()),
        )
        .env_remove("BROKER_URL")
        .env_remove("CELERY_BROKER_URL")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mailhook");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn unprocessable_messages_are_dead_lettered_and_replayable() {
    let dir = tempfile::tempdir().expect("dir");
    let (b, s) = setup(dir.path()).await;
    let good = example("opened");
    let unknown = TaskMessage::for_payload("someone.elses_task", good.as_bytes(), Utc::now());
    let mut garbage = TaskMessage::for_payload(DEFAULT_TASK, b"{}", Utc::now());
    garbage.body = b"not json at all".to_vec().into();
    let not_callback = TaskMessage::for_payload(DEFAULT_TASK, b"{\"a\":1}", Utc::now());
    let fine = TaskMessage::for_payload(DEFAULT_TASK, good.as_bytes(), Utc::now());
    for m in [&unknown, &garbage, &not_callback, &fine] {
        b.publish(m).await.expect("publish");
    }
    let stop = CancellationToken::new();
    let w =
        tokio::spawn(Worker::new(b.clone(), s.clone(), WorkerConfig::default()).run(stop.clone()));
    wait_for_rows(&s, 1).await;
    let dead = eventually("three dead letters", Duration::from_secs(10), || async {
        let d = b.dlq_list(10).await.ok()?;
        (d.len() == 3).then_some(d)
    })
    .await;
    stop.cancel();
    w.await.expect("worker");
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(
        reasons[0].contains("unknown task name `someone.elses_task`"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("not JSON"), "{reasons:?}");
    assert!(reasons[2].contains("payload rejected"), "{reasons:?}");
    assert!(dead
        .iter()
        .all(|d| d.attempts == 1 && d.failed_at.is_some()));

    // The CLI lists them as JSON lines and replays them.
    let listed = cli(dir.path(), &["dlq", "list"]);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(listed.contains("someone.elses_task"));
    let out = cli(dir.path(), &["dlq", "replay", "--id", &dead[0].id]);
    assert!(out.contains("replayed 1"), "{out}");
    assert_eq!(b.dlq_list(10).await.expect("list").len(), 2);
    let out = cli(dir.path(), &["dlq", "replay", "--all"]);
    assert!(out.contains("replayed 2"), "{out}");
    assert!(b.dlq_list(10).await.expect("list").is_empty());
    let back = b.fetch(10, Duration::from_secs(2)).await.expect("fetch");
    assert_eq!(back.len(), 3, "replayed messages are on the queue again");
}

#[tokio::test]
async fn a_message_that_keeps_failing_is_dead_lettered_after_max_attempts() {
    let dir = tempfile::tempdir().expect("dir");
    let (b, s) = setup(dir.path()).await;
    // The database refuses this message's data every time, as a constraint would. (A table
    // that is gone is an outage: the message waits for it, see `faults`.)
    let pool = table(dir.path()).await;
    sqlx::query(
        "CREATE TRIGGER refuse_all BEFORE INSERT ON email_callback \
         BEGIN SELECT RAISE(ABORT, 'refused'); END",
    )
    .execute(&pool)
    .await
    .expect("trigger");
    let m = TaskMessage::for_payload(DEFAULT_TASK, example("clicked").as_bytes(), Utc::now());
    b.publish(&m).await.expect("publish");
    let cfg = WorkerConfig {
        max_attempts: 3,
        base_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..WorkerConfig::default()
    };
    let stop = CancellationToken::new();
    let w = tokio::spawn(Worker::new(b.clone(), s, cfg).run(stop.clone()));
    let dead = eventually("a dead letter", Duration::from_secs(20), || async {
        let d = b.dlq_list(10).await.ok()?;
        (!d.is_empty()).then_some(d)
    })
    .await;
    stop.cancel();
    w.await.expect("worker");
    assert_eq!(dead[0].task_id, m.id);
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].reason.starts_with("gave up after 3 attempts"),
        "{}",
        dead[0].reason
    );
}

#[tokio::test]
async fn one_refused_message_does_not_hold_back_its_batch() {
    let dir = tempfile::tempdir().expect("dir");
    let (b, s) = setup(dir.path()).await;
    let pool = table(dir.path()).await;
    // The database refuses one message's data, as a constraint would.
    sqlx::query(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON email_callback \
         WHEN NEW.id_externo = 'poison' BEGIN SELECT RAISE(ABORT, 'poison refused'); END",
    )
    .execute(&pool)
    .await
    .expect("trigger");
    let poison = r#"{"notificationType": "OPENED", "messageId": "poison"}"#;
    let payloads = [
        example("opened"),
        poison.to_owned(),
        example("clicked"),
        example("delivered-dict"),
    ];
    let mut ids = Vec::new();
    for p in &payloads {
        let m = TaskMessage::for_payload(DEFAULT_TASK, p.as_bytes(), Utc::now());
        b.publish(&m).await.expect("publish");
        ids.push(m.id);
    }
    let cfg = WorkerConfig {
        max_attempts: 2,
        base_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
        ..WorkerConfig::default()
    };
    let stop = CancellationToken::new();
    let w = tokio::spawn(Worker::new(b.clone(), s.clone(), cfg).run(stop.clone()));
    wait_for_rows(&s, 7).await;
    let dead = eventually(
        "the poison dead-lettered",
        Duration::from_secs(10),
        || async {
            let d = b.dlq_list(10).await.ok()?;
            (d.len() == 1).then_some(d)
        },
    )
    .await;
    stop.cancel();
    w.await.expect("worker");
    assert_eq!(dead[0].task_id, ids[1]);
    assert!(
        dead[0].reason.contains("poison refused"),
        "{}",
        dead[0].reason
    );
    assert_eq!(s.count().await.expect("count"), 7);
}
