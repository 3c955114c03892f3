//! mailhook and Python Celery sharing a RabbitMQ queue, each test on its own queue name.
//! RabbitMQ and PostgreSQL that are not reachable are skipped locally and fail under CI=true.

use std::time::Duration;

use mailhook::config::{CommonArgs, ServeArgs};
use mailhook::queue;

use crate::common::app::{common_args, serve_args, spawn_with, sqlite_common};
use crate::common::brokers::{
    amqp_ready as ready_count, amqp_url, broker_cfg, cleanup_amqp as cleanup, fetch_n,
};
use crate::common::celery::{
    ensure_venv, mailhook_stores_the_examples, post_many, python_receives_the_examples,
    PythonWorker, WorkerOpts,
};
use crate::common::databases::pg_database;
use crate::common::{eventually, in_ci, opened, unique_queue};

/// App settings: rows in `database`, RabbitMQ at `amqp`, on `queue`.
fn amqp_common(database: &str, amqp: &str, queue: &str) -> CommonArgs {
    common_args(&[
        "--database-url",
        database,
        "--broker-url",
        amqp,
        "--queue",
        queue,
    ])
}

/// RabbitMQ, a fresh PostgreSQL database and the Celery venv, or `None` to skip (outside CI).
async fn amqp_pg_python() -> Option<(String, String, std::path::PathBuf)> {
    Some((amqp_url().await?, pg_database().await?, ensure_venv()?))
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
    let Some(amqp) = amqp_url().await else {
        return;
    };
    if std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .arg("status")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        assert!(!in_ci(), "rabbitmqctl is needed to close a connection");
        eprintln!("SKIP: rabbitmqctl not usable");
        return;
    }
    let queue = unique_queue("amqp-reconnect");
    let dir = tempfile::tempdir().expect("dir");
    let (c, args) = api_only(dir.path(), &amqp, &queue);
    let app = spawn_with(c, args).await;

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
    let reader = queue::connect(&broker_cfg(&amqp, &queue, Duration::from_secs(30)))
        .await
        .expect("reader");
    let got = fetch_n(&reader, accepted.len()).await;
    let mut ids: Vec<_> = got.iter().map(|d| d.task_id.clone()).collect();
    ids.sort();
    accepted.sort();
    assert_eq!(ids, accepted);
    reader.ack(&got).await.expect("ack");
    app.stop().await;
    cleanup(&amqp, &queue).await;
}

/// App settings on a temp SQLite database (API-only apps need no real store).
fn api_only(dir: &std::path::Path, amqp: &str, queue: &str) -> (CommonArgs, ServeArgs) {
    let database = sqlite_common(dir).database_url;
    (
        amqp_common(&database, amqp, queue),
        serve_args(&["--no-worker"]),
    )
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
    let Some(amqp) = amqp_url().await else {
        return;
    };
    let Some(venv) = ensure_venv() else { return };
    let queue = unique_queue("amqp-py-consumes");
    // Python declares first here; mailhook declares first in the other tests.
    let py = PythonWorker::start(&venv, &WorkerOpts::new(&amqp, &queue)).await;
    let dir = tempfile::tempdir().expect("dir");
    let (c, args) = api_only(dir.path(), &amqp, &queue);
    let app = spawn_with(c, args).await;

    python_receives_the_examples(&app, &py).await;
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
    let queue = unique_queue("amqp-py-produces");
    let app = spawn_with(amqp_common(&pg, &amqp, &queue), serve_args(&[])).await;

    let expected = mailhook_stores_the_examples(&app, &venv, &amqp, &queue).await;
    eventually("queue drained", Duration::from_secs(15), || async {
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
    let queue = unique_queue("amqp-shared");
    const N: usize = 200;

    let opts = WorkerOpts::new(&amqp, &queue);
    // A small prefetch, so RabbitMQ cannot hand nearly everything to mailhook while Python (one
    // message at a time) is busy: both workers really interleave on the queue.
    let args = serve_args(&["--prefetch", "4"]);
    let (py, app) = if python_declares_first {
        let py = PythonWorker::start(&venv, &opts).await;
        let app = spawn_with(amqp_common(&pg, &amqp, &queue), args).await;
        (py, app)
    } else {
        let app = spawn_with(amqp_common(&pg, &amqp, &queue), args).await;
        let py = PythonWorker::start(&venv, &opts).await;
        (py, app)
    };

    let tag = format!("shared-{python_declares_first}");
    post_many(&app, &tag, N).await;

    let handled = |py: &PythonWorker, rows: i64| py.received().len() + rows as usize;
    let store = app.store.clone();
    eventually(
        "every callback handled",
        Duration::from_secs(90),
        || async { (handled(&py, store.count().await.ok()?) >= N).then_some(()) },
    )
    .await;
    eventually("queue drained", Duration::from_secs(15), || async {
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

    crate::common::celery::assert_shared_exactly_once(&lines, &store, &tag, N).await;
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
