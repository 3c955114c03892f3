//! mailhook and Python Celery sharing a RabbitMQ queue, each test on its own queue name.
//! RabbitMQ and PostgreSQL that are not reachable are skipped locally and fail under CI=true.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use mailhook::config::CommonArgs;
use mailhook::queue::{self, BrokerConfig, TaskMessage};
use mailhook::store::{self, Store};
use serde_json::Value;

use common::celery::{ensure_venv, opened, post_many, send_task, PythonWorker, WorkerOpts};

/// App settings: PostgreSQL database `pg`, RabbitMQ at `amqp`, on `queue`.
fn amqp_common(pg: &str, amqp: &str, queue: &str) -> CommonArgs {
    CommonArgs {
        database_url: pg.to_owned(),
        broker_url: Some(amqp.to_owned()),
        queue: queue.to_owned(),
        task_name: mailhook::config::DEFAULT_TASK.into(),
        visibility_timeout: None,
    }
}

fn broker_cfg(amqp: &str, queue: &str, prefetch: u16) -> BrokerConfig {
    BrokerConfig {
        url: amqp.to_owned(),
        queue: queue.to_owned(),
        visibility_timeout: Duration::from_secs(30),
        prefetch,
    }
}

/// Messages still on the queue (ready, not unacked), read with a passive declare.
async fn ready_count(amqp: &str, queue: &str) -> u32 {
    use lapin::options::QueueDeclareOptions;
    let conn = lapin::Connection::connect(amqp, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = conn.close(200, "counted").await;
    q.message_count()
}

/// Removes the test's queues and exchange so runs do not pile up on the server.
async fn cleanup(amqp: &str, queue: &str) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let Ok(conn) = lapin::Connection::connect(amqp, lapin::ConnectionProperties::default()).await
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

/// RabbitMQ, a fresh PostgreSQL database and the Celery venv, or `None` to skip (outside CI).
async fn amqp_pg_python() -> Option<(String, String, std::path::PathBuf)> {
    Some((
        common::amqp_url().await?,
        common::pg_database().await?,
        ensure_venv()?,
    ))
}

/// A consumer that dies holding a batch unacked, after storing part of it, loses nothing and
/// doubles nothing: RabbitMQ redelivers the batch to the next worker and the dedupe key absorbs
/// the rows already stored.
#[tokio::test]
async fn consumer_dying_mid_batch_redelivers_without_doubles() {
    let Some(amqp) = common::amqp_url().await else {
        return;
    };
    let Some(pg) = common::pg_database().await else {
        return;
    };
    let queue = common::unique_queue("amqp-crash");
    const N: usize = 60;

    let producer = queue::connect(&broker_cfg(&amqp, &queue, 16))
        .await
        .expect("producer");
    let payloads: Vec<String> = (0..N).map(|n| opened("crash", n)).collect();
    for p in &payloads {
        let m = TaskMessage::for_payload(mailhook::config::DEFAULT_TASK, p.as_bytes(), Utc::now());
        producer.publish(&m).await.expect("publish");
    }

    let store: Arc<dyn Store> = store::connect(&pg, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    {
        // The doomed worker: takes the whole batch, stores the first third, dies before acking.
        let doomed = queue::connect(&broker_cfg(&amqp, &queue, 256))
            .await
            .expect("consumer");
        let mut batch = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while batch.len() < N && std::time::Instant::now() < deadline {
            batch.extend(
                doomed
                    .fetch(N - batch.len(), Duration::from_millis(200))
                    .await
                    .expect("fetch"),
            );
        }
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
        // Dropping the broker closes its connection: RabbitMQ requeues all N.
        drop(batch);
        drop(doomed);
    }

    let app = common::spawn_with(amqp_common(&pg, &amqp, &queue), common::serve_args()).await;
    common::wait_for_rows(&app.store, N as i64).await;
    common::eventually("queue drained", Duration::from_secs(15), || async {
        (ready_count(&amqp, &queue).await == 0).then_some(())
    })
    .await;
    app.stop().await;
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
    drop(producer);
    cleanup(&amqp, &queue).await;
}

/// `(pid, line)` of the server's connections named `mailhook <queue>`.
fn server_connections(queue: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let needle = format!("mailhook {queue}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// When RabbitMQ drops mailhook's connection, the API reconnects by itself, and every callback
/// it answered 2xx is on the queue (a 2xx only ever follows a publisher confirm).
#[tokio::test]
async fn api_reconnects_after_the_server_closes_its_connection() {
    let Some(amqp) = common::amqp_url().await else {
        return;
    };
    if std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .arg("status")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        assert!(
            !common::in_ci(),
            "rabbitmqctl is needed to close a connection"
        );
        eprintln!("SKIP: rabbitmqctl not usable");
        return;
    }
    let queue = common::unique_queue("amqp-reconnect");
    let dir = tempfile::tempdir().expect("dir");
    let mut common_args = common::sqlite_common(dir.path());
    common_args.broker_url = Some(amqp.clone());
    common_args.queue = queue.clone();
    let mut args = common::serve_args();
    args.no_worker = true;
    let app = common::spawn_with(common_args, args).await;

    let mut accepted = Vec::new();
    let post = |n: usize| {
        let app = &app;
        async move {
            let r = app.post(opened("reconnect", n)).await;
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (
                status,
                body["task_id"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    for n in 0..5 {
        let (status, id) = post(n).await;
        assert_eq!(status, 202);
        accepted.push(id);
    }
    let before = server_connections(&queue);
    assert_eq!(before.len(), 1, "one connection: {before:?}");
    let closed = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "close_connection",
            &before[0],
            "test: connection dropped",
        ])
        .status()
        .expect("rabbitmqctl runs");
    assert!(closed.success());

    // Keep posting: answers are 202 or 503 (never anything else), and 202 comes back.
    let mut unavailable = 0;
    let mut n = 5;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, id) = post(n).await;
        n += 1;
        match status {
            202 => accepted.push(id),
            503 => unavailable += 1,
            other => panic!("unexpected status {other}"),
        }
        if status == 202 && accepted.len() >= 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the API did not recover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = server_connections(&queue);
    assert_eq!(after.len(), 1, "reconnected once: {after:?}");
    assert_ne!(after, before, "a new connection");
    eprintln!("503 answers while reconnecting: {unavailable}");

    // Every accepted callback is on the queue.
    let reader = queue::connect(&broker_cfg(&amqp, &queue, 256))
        .await
        .expect("reader");
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while got.len() < accepted.len() && std::time::Instant::now() < deadline {
        got.extend(
            reader
                .fetch(256, Duration::from_millis(300))
                .await
                .expect("fetch"),
        );
    }
    let mut ids: Vec<_> = got.iter().map(|d| d.task_id.clone()).collect();
    ids.sort();
    accepted.sort();
    assert_eq!(ids, accepted);
    reader.ack(&got).await.expect("ack");
    app.stop().await;
    cleanup(&amqp, &queue).await;
}

/// App settings on a temp SQLite database (API-only apps need no real store).
fn api_only(
    dir: &std::path::Path,
    amqp: &str,
    queue: &str,
) -> (CommonArgs, mailhook::config::ServeArgs) {
    let mut c = common::sqlite_common(dir);
    c.broker_url = Some(amqp.to_owned());
    c.queue = queue.to_owned();
    let mut args = common::serve_args();
    args.no_worker = true;
    (c, args)
}

fn assert_no_precondition_failure(py: &PythonWorker) {
    let log = py.log_text();
    assert!(
        !log.contains("PRECONDITION_FAILED"),
        "the Python worker hit a 406:\n{log}"
    );
}

/// mailhook's API publishes each example; a Python Celery worker receives exactly those payloads.
#[tokio::test]
async fn python_worker_receives_what_the_api_publishes() {
    let Some(amqp) = common::amqp_url().await else {
        return;
    };
    let Some(venv) = ensure_venv() else { return };
    let queue = common::unique_queue("amqp-py-consumes");
    // Python declares first here; mailhook declares first in the other tests.
    let py = PythonWorker::start(&venv, &WorkerOpts::new(&amqp, &queue)).await;
    let dir = tempfile::tempdir().expect("dir");
    let (c, args) = api_only(dir.path(), &amqp, &queue);
    let app = common::spawn_with(c, args).await;

    let mut sent: HashMap<String, Value> = HashMap::new();
    for name in common::EXAMPLES {
        let body = common::example(name);
        let r = app.post(body.clone()).await;
        assert_eq!(r.status(), 202, "{name}");
        let answer: Value = r.json().await.expect("json answer");
        let id = answer["task_id"].as_str().expect("task id").to_owned();
        sent.insert(id, serde_json::from_str(&body).expect("example is JSON"));
    }
    let got = py.wait_received(sent.len(), Duration::from_secs(60)).await;
    assert_eq!(got.len(), sent.len(), "each callback handled once");
    for line in &got {
        let id = line["task_id"].as_str().expect("task id");
        let want = sent
            .get(id)
            .unwrap_or_else(|| panic!("unknown task id {id}"));
        assert_eq!(&line["payload"], want, "payload of {id} arrives intact");
        assert!(
            line["received_at"].is_string(),
            "kwargs.received_at arrives"
        );
    }
    assert_no_precondition_failure(&py);
    py.stop(Duration::from_secs(10)).await;
    app.stop().await;
    cleanup(&amqp, &queue).await;
}

/// Python's `send_task(..., queue=...)` for each example; mailhook's worker stores the rows in
/// PostgreSQL.
#[tokio::test]
async fn mailhook_worker_stores_what_python_sends() {
    let Some((amqp, pg, venv)) = amqp_pg_python().await else {
        return;
    };
    let queue = common::unique_queue("amqp-py-produces");
    let app = common::spawn_with(amqp_common(&pg, &amqp, &queue), common::serve_args()).await;

    let payloads: Vec<String> = common::EXAMPLES
        .iter()
        .map(|n| common::example(n))
        .collect();
    let mut expected = 0usize;
    let mut message_ids = HashSet::new();
    for p in &payloads {
        let v: Box<serde_json::value::RawValue> = serde_json::from_str(p).expect("example is JSON");
        let rows = mailhook::infobip::normalize(&v, Utc::now()).expect("example is valid");
        expected += rows.len();
        message_ids.extend(rows.into_iter().map(|r| r.id_externo));
    }
    let ids = send_task(
        &venv,
        &amqp,
        &queue,
        mailhook::config::DEFAULT_TASK,
        &payloads,
    );
    assert_eq!(ids.len(), payloads.len());
    common::wait_for_rows(&app.store, expected as i64).await;
    for id in &message_ids {
        let rows = app.store.by_id_externo(id).await.expect("by id");
        assert!(!rows.is_empty(), "rows for message {id}");
    }
    common::eventually("queue drained", Duration::from_secs(15), || async {
        (ready_count(&amqp, &queue).await == 0).then_some(())
    })
    .await;
    let store = app.store.clone();
    app.stop().await;
    assert_eq!(store.count().await.expect("count"), expected as i64);
    cleanup(&amqp, &queue).await;
}

/// A Python worker and a mailhook worker consume one queue at once; ~200 callbacks through the
/// API are each handled exactly once in total (Python's lines plus PostgreSQL rows).
async fn shared_queue(python_declares_first: bool) {
    let Some((amqp, pg, venv)) = amqp_pg_python().await else {
        return;
    };
    let queue = common::unique_queue("amqp-shared");
    const N: usize = 200;

    let opts = WorkerOpts::new(&amqp, &queue);
    // A small prefetch, so RabbitMQ cannot hand nearly everything to mailhook while Python (one
    // message at a time) is busy: both workers really interleave on the queue.
    let mut args = common::serve_args();
    args.worker.prefetch = 4;
    let (py, app) = if python_declares_first {
        let py = PythonWorker::start(&venv, &opts).await;
        let app = common::spawn_with(amqp_common(&pg, &amqp, &queue), args).await;
        (py, app)
    } else {
        let app = common::spawn_with(amqp_common(&pg, &amqp, &queue), args).await;
        let py = PythonWorker::start(&venv, &opts).await;
        (py, app)
    };

    let tag = format!("shared-{python_declares_first}");
    post_many(&app, &tag, N).await;

    let handled = |py: &PythonWorker, rows: i64| py.received().len() + rows as usize;
    let store = app.store.clone();
    common::eventually(
        "every callback handled",
        Duration::from_secs(90),
        || async { (handled(&py, store.count().await.ok()?) >= N).then_some(()) },
    )
    .await;
    common::eventually("queue drained", Duration::from_secs(15), || async {
        (ready_count(&amqp, &queue).await == 0).then_some(())
    })
    .await;
    assert_no_precondition_failure(&py);
    let lines = py.received();
    if std::env::var_os("MAILHOOK_TEST_SHOW_PY_LOG").is_some() {
        eprintln!("{}", py.log_text());
    }
    py.stop(Duration::from_secs(15)).await;
    app.stop().await;

    common::celery::assert_shared_exactly_once(&lines, &store, &tag, N).await;
    cleanup(&amqp, &queue).await;
}

#[tokio::test]
async fn shared_queue_python_declares_first() {
    shared_queue(true).await;
}

#[tokio::test]
async fn shared_queue_mailhook_declares_first() {
    shared_queue(false).await;
}
