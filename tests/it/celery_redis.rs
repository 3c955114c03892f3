//! mailhook on Redis, alone and sharing the queue with Python Celery, each test on its own
//! queue name.
//! Redis, PostgreSQL and Python that are not usable are skipped locally and fail under CI=true.
//!
//! kombu keeps one `unacked` bookkeeping per Redis database and every consumer restores every
//! queue's expired entries with its own visibility timeout. The tests with the default (3600 s)
//! share database 0; each test with a short timeout gets a database of its own, so it can never
//! hand back another test's in-flight message.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use mailhook::config::{CommonArgs, DEFAULT_TASK};
use mailhook::queue::{self, TaskMessage};
use serde_json::Value;

use crate::common::app::{common_args, serve_args, spawn_with, sqlite_common, TestApp};
use crate::common::brokers::{
    broker_cfg, cleanup_redis as cleanup, fetch_n, redis_conn, redis_db,
    redis_ready as ready_count, redis_url,
};
use crate::common::celery::{self as py, post_many, PythonWorker, WorkerOpts};
use crate::common::databases::pg_database;
use crate::common::{eventually, example, opened, unique_queue, wait_for_rows};

/// App settings: `database` for rows, Redis at `redis` on `queue`, kombu's visibility timeout
/// unless `visibility` says otherwise.
fn redis_common(database: &str, redis: &str, queue: &str, visibility: Option<u64>) -> CommonArgs {
    let mut flags = vec![
        "--database-url",
        database,
        "--broker-url",
        redis,
        "--queue",
        queue,
    ];
    let visibility = visibility.map(|v| v.to_string());
    if let Some(v) = &visibility {
        flags.extend(["--visibility-timeout", v.as_str()]);
    }
    common_args(&flags)
}

/// An API-only app on `queue`, with a throwaway SQLite store it never writes to.
async fn api_only(dir: &std::path::Path, redis: &str, queue: &str) -> TestApp {
    let db = format!("sqlite://{}", dir.join("unused.db").display());
    spawn_with(
        redis_common(&db, redis, queue, None),
        serve_args(&["--no-worker"]),
    )
    .await
}

/// The harness itself: Python's producer reaches Python's worker on a fresh queue.
#[tokio::test]
async fn python_harness_round_trip() {
    let Some((redis, venv)) = redis_python().await else {
        return;
    };
    let queue = unique_queue("py-harness");
    let worker = PythonWorker::start(&venv, &WorkerOpts::new(&redis, &queue)).await;
    let payload = example("opened");
    let ids = py::send_task(
        &venv,
        &redis,
        &queue,
        DEFAULT_TASK,
        std::slice::from_ref(&payload),
    );
    let got = worker.wait_received(1, Duration::from_secs(30)).await;
    assert_eq!(got[0]["task_id"], ids[0].as_str());
    let want: Value = serde_json::from_str(&payload).expect("fixture is JSON");
    assert_eq!(got[0]["payload"], want);
    worker.stop(Duration::from_secs(10)).await;
    cleanup(&redis, &queue).await;
}

/// mailhook's API publishes each example; a Python Celery worker receives exactly those
/// payloads, and the API's receive time as `received_at`.
#[tokio::test]
async fn python_worker_receives_what_the_api_publishes() {
    let Some((redis, venv)) = redis_python().await else {
        return;
    };
    let queue = unique_queue("redis-py-consumes");
    let dir = tempfile::tempdir().expect("dir");
    let app = api_only(dir.path(), &redis, &queue).await;
    let py = PythonWorker::start(&venv, &WorkerOpts::new(&redis, &queue)).await;

    py::python_receives_the_examples(&app, &py).await;
    assert_eq!(ready_count(&redis, &queue).await, 0);
    py.stop(Duration::from_secs(10)).await;
    app.stop().await;
    cleanup(&redis, &queue).await;
}

/// Redis and the Celery venv, or `None` to skip (outside CI).
async fn redis_python() -> Option<(String, std::path::PathBuf)> {
    Some((redis_url().await?, py::ensure_venv()?))
}

/// Redis, a fresh PostgreSQL database and the Celery venv, or `None` to skip (outside CI).
async fn redis_pg_python() -> Option<(String, String, std::path::PathBuf)> {
    Some((redis_url().await?, pg_database().await?, py::ensure_venv()?))
}

/// Python's `send_task(..., queue=...)` for each example; mailhook's worker stores the rows in
/// PostgreSQL, as the pure normalizer says they should be.
#[tokio::test]
async fn mailhook_worker_stores_what_python_sends() {
    let Some((redis, pg, venv)) = redis_pg_python().await else {
        return;
    };
    let queue = unique_queue("redis-py-produces");
    let app = spawn_with(redis_common(&pg, &redis, &queue, None), serve_args(&[])).await;

    let expected = py::mailhook_stores_the_examples(&app, &venv, &redis, &queue).await;
    eventually("queue drained", Duration::from_secs(15), || async {
        (ready_count(&redis, &queue).await == 0).then_some(())
    })
    .await;
    let store = app.store.clone();
    app.stop().await;
    assert_eq!(
        store.count().await.expect("count"),
        expected as i64,
        "one row per event"
    );
    cleanup(&redis, &queue).await;
}

/// A Python worker and a mailhook worker consume one queue at once; 200 callbacks through the
/// API are each handled exactly once in total (Python's lines plus PostgreSQL rows).
#[tokio::test]
async fn python_and_mailhook_workers_share_the_queue() {
    let Some((redis, pg, venv)) = redis_pg_python().await else {
        return;
    };
    let queue = unique_queue("redis-shared");
    const N: usize = 200;
    let py = PythonWorker::start(&venv, &WorkerOpts::new(&redis, &queue)).await;
    // Small batches, so the mailhook worker does not drain the queue before Python's first
    // poll: both must take part.
    let args = serve_args(&["--prefetch", "8"]);
    let app = spawn_with(redis_common(&pg, &redis, &queue, None), args).await;

    post_many(&app, "shared", N).await;
    let store = app.store.clone();
    eventually(
        "every callback handled",
        Duration::from_secs(90),
        || async {
            let rows = usize::try_from(store.count().await.ok()?).ok()?;
            (py.received().len() + rows >= N).then_some(())
        },
    )
    .await;
    eventually("queue drained", Duration::from_secs(15), || async {
        (ready_count(&redis, &queue).await == 0).then_some(())
    })
    .await;
    let lines = py.received();
    py.stop(Duration::from_secs(15)).await;
    app.stop().await;

    py::assert_shared_exactly_once(&lines, &store, "shared", N).await;
    cleanup(&redis, &queue).await;
}

/// Our `unacked` entries are kombu's: a batch a mailhook consumer died holding is restored by a
/// Python worker's own `restore_visible`, and handled there.
#[tokio::test]
async fn python_worker_restores_what_a_dead_mailhook_consumer_held() {
    let Some((redis, venv)) = redis_python().await else {
        return;
    };
    let redis = redis_db(&redis, 3);
    let queue = unique_queue("redis-py-restores");
    const N: usize = 10;
    let vt = Duration::from_secs(2);
    let producer = queue::connect(&broker_cfg(&redis, &queue, vt))
        .await
        .expect("producer");
    let mut sent = HashSet::new();
    for n in 0..N {
        let p = opened("py-restores", n);
        let m = TaskMessage::for_payload(DEFAULT_TASK, p.as_bytes(), Utc::now());
        producer.publish(&m).await.expect("publish");
        sent.insert(m.id);
    }
    {
        let doomed = queue::connect(&broker_cfg(&redis, &queue, vt))
            .await
            .expect("consumer");
        assert_eq!(fetch_n(&doomed, N).await.len(), N);
    }
    assert_eq!(ready_count(&redis, &queue).await, 0, "all held unacked");
    let mut opts = WorkerOpts::new(&redis, &queue);
    opts.visibility_timeout = vt.as_secs();
    opts.env
        .push(("MAILHOOK_RESTORE_INTERVAL".into(), "1".into()));
    let py = PythonWorker::start(&venv, &opts).await;
    let got = py.wait_received(N, Duration::from_secs(60)).await;
    let ids: HashSet<String> = got
        .iter()
        .map(|l| l["task_id"].as_str().expect("task id").to_owned())
        .collect();
    assert_eq!(got.len(), N, "each handled once");
    assert_eq!(ids, sent);
    py.stop(Duration::from_secs(10)).await;
    cleanup(&redis, &queue).await;
}

/// And the other way round: a Python worker killed mid-task leaves its message in `unacked`;
/// mailhook's restore puts it back and mailhook's worker stores it.
#[tokio::test]
async fn mailhook_restores_what_a_killed_python_worker_held() {
    let Some((redis, pg, venv)) = redis_pg_python().await else {
        return;
    };
    let redis = redis_db(&redis, 4);
    let queue = unique_queue("redis-mh-restores");
    let vt = Duration::from_secs(2);
    let mut opts = WorkerOpts::new(&redis, &queue);
    opts.visibility_timeout = vt.as_secs();
    opts.env.push(("MAILHOOK_TASK_SLEEP".into(), "60".into()));
    let mut py = PythonWorker::start(&venv, &opts).await;
    let payload = opened("mh-restores", 1);
    let ids = py::send_task(
        &venv,
        &redis,
        &queue,
        DEFAULT_TASK,
        std::slice::from_ref(&payload),
    );
    eventually("python took the task", Duration::from_secs(30), || async {
        py.log_text()
            .contains(&format!("[{}] received", ids[0]))
            .then_some(())
    })
    .await;
    py.kill();
    assert_eq!(ready_count(&redis, &queue).await, 0, "held unacked");

    let app = spawn_with(
        redis_common(&pg, &redis, &queue, Some(vt.as_secs())),
        serve_args(&[]),
    )
    .await;
    wait_for_rows(&app.store, 1).await;
    let rows = app
        .store
        .by_id_externo("mh-restores-1")
        .await
        .expect("by id");
    assert_eq!(rows.len(), 1);
    app.stop().await;
    cleanup(&redis, &queue).await;
}

/// What cannot be read is dead-lettered with the reason, never dropped: an envelope that is not
/// JSON, a body that is not base64, and a task this worker does not know (sent by Python).
#[tokio::test]
async fn unreadable_messages_are_dead_lettered_not_lost() {
    let Some((redis, venv)) = redis_python().await else {
        return;
    };
    let redis = redis_db(&redis, 6);
    let queue = unique_queue("redis-garbage");
    let mut c = redis_conn(&redis).await;
    let bad_body = serde_json::json!({
        "body": "%%% not base64 %%%",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"id": "bad-body", "task": DEFAULT_TASK},
        "properties": {"body_encoding": "base64", "delivery_tag": uuid::Uuid::new_v4().to_string(),
                       "delivery_info": {"exchange": "", "routing_key": queue}},
    });
    let _: () = redis::pipe()
        .lpush(&queue, "this is not a kombu envelope")
        .ignore()
        .lpush(&queue, bad_body.to_string())
        .ignore()
        .query_async(&mut c)
        .await
        .expect("LPUSH");
    py::send_task(
        &venv,
        &redis,
        &queue,
        "someone.elses_task",
        &[opened("garbage", 1)],
    );
    let dir = tempfile::tempdir().expect("dir");
    let db = sqlite_common(dir.path()).database_url;
    let app = spawn_with(redis_common(&db, &redis, &queue, None), serve_args(&[])).await;
    let broker = queue::connect(&broker_cfg(&redis, &queue, Duration::from_secs(3600)))
        .await
        .expect("broker");
    let dead = eventually("3 dead letters", Duration::from_secs(30), || async {
        let dl = broker.dlq_list(10).await.ok()?;
        (dl.len() == 3).then_some(dl)
    })
    .await;
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("someone.elses_task")),
        "{reasons:?}"
    );
    assert!(dead.iter().any(|d| d.task_id == "bad-body"), "{dead:?}");
    assert_eq!(ready_count(&redis, &queue).await, 0);
    let unacked: i64 = redis::cmd("HLEN")
        .arg("unacked")
        .query_async(&mut c)
        .await
        .expect("HLEN");
    assert_eq!(unacked, 0, "dead letters are acked");
    assert_eq!(app.store.count().await.expect("count"), 0);
    app.stop().await;
    // Replayed, the Python-sent one is intact and dead-letters again with the same reason.
    let id = dead
        .iter()
        .find(|d| d.reason.contains("someone.elses_task"))
        .map(|d| d.id.clone())
        .expect("python's dead letter");
    broker.dlq_replay(&id).await.expect("replay");
    let again = fetch_n(&broker, 1).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].task, "someone.elses_task");
    assert_eq!(again[0].attempts, 1, "attempts reset by replay");
    let args = queue::celery::decode_body(&again[0].body).expect("body intact");
    let payload: Value = serde_json::from_str(args.payload.get()).expect("JSON");
    assert_eq!(payload["messageId"], "garbage-1");
    broker.ack(&again).await.expect("ack");
    cleanup(&redis, &queue).await;
}

/// When Redis drops mailhook's connection, the API reconnects by itself: answers are 202 or
/// 503 meanwhile, and every callback answered 202 is on the queue.
#[tokio::test]
async fn api_reconnects_after_redis_drops_its_connection() {
    let Some(redis) = redis_url().await else {
        return;
    };
    // Database 5 is this test's alone: its clients are the ones to kill.
    let redis = redis_db(&redis, 5);
    let queue = unique_queue("redis-reconnect");
    let dir = tempfile::tempdir().expect("dir");
    let app = api_only(dir.path(), &redis, &queue).await;
    let post = |n: usize| {
        let app = &app;
        async move {
            let r = app.post(opened("reconnect", n)).await;
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or_default();
            let id = body["task_id"].as_str().unwrap_or_default().to_owned();
            (status, id)
        }
    };
    let mut accepted = Vec::new();
    for n in 0..5 {
        let (status, id) = post(n).await;
        assert_eq!(status, 202);
        accepted.push(id);
    }
    let mut admin = redis_conn(&redis_db(&redis, 0)).await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .expect("CLIENT LIST");
    let victims: Vec<&str> = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f == "db=5"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .collect();
    assert!(!victims.is_empty(), "mailhook's connection is listed");
    for id in &victims {
        let _: Result<i64, _> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(*id)
            .query_async(&mut admin)
            .await;
    }
    let mut unavailable = 0;
    let mut n = 5;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while accepted.len() < 10 {
        let (status, id) = post(n).await;
        n += 1;
        match status {
            202 => accepted.push(id),
            503 => unavailable += 1,
            other => panic!("unexpected status {other}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the API did not recover"
        );
    }
    eprintln!("503 answers while reconnecting: {unavailable}");
    let reader = queue::connect(&broker_cfg(&redis, &queue, Duration::from_secs(3600)))
        .await
        .expect("reader");
    let got = fetch_n(&reader, accepted.len()).await;
    let mut ids: Vec<_> = got.iter().map(|d| d.task_id.clone()).collect();
    ids.sort();
    accepted.sort();
    assert_eq!(ids, accepted, "every 202 is on the queue, once");
    reader.ack(&got).await.expect("ack");
    app.stop().await;
    cleanup(&redis, &queue).await;
}
