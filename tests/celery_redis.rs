//! mailhook on Redis, alone and sharing the queue with Python Celery, each test on its own
//! queue name.
//! Redis, PostgreSQL and Python that are not usable are skipped locally and fail under CI=true.
//!
//! kombu keeps one `unacked` bookkeeping per Redis database and every consumer restores every
//! queue's expired entries with its own visibility timeout. The tests with the default (3600 s)
//! share database 0; each test with a short timeout gets a database of its own, so it can never
//! hand back another test's in-flight message.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::celery::{self as py, opened, post_many, PythonWorker, WorkerOpts};
use mailhook::config::DEFAULT_TASK;
use mailhook::config::{CommonArgs, ServeArgs};
use mailhook::queue::{self, Broker, BrokerConfig, TaskMessage};
use mailhook::store::{self, Store};
use serde_json::value::RawValue;
use serde_json::Value;

/// `url` with its database number replaced by `db`.
fn with_db(url: &str, db: u8) -> String {
    match url.rsplit_once('/') {
        Some((base, n)) if n.parse::<u8>().is_ok() => format!("{base}/{db}"),
        _ => format!("{}/{db}", url.trim_end_matches('/')),
    }
}

/// App settings: `database` for rows, Redis at `redis` on `queue`, kombu's visibility timeout
/// unless `visibility` says otherwise.
fn redis_common(database: &str, redis: &str, queue: &str, visibility: Option<u64>) -> CommonArgs {
    CommonArgs {
        database_url: database.to_owned(),
        broker_url: Some(redis.to_owned()),
        queue: queue.to_owned(),
        task_name: DEFAULT_TASK.into(),
        visibility_timeout: visibility,
    }
}

/// An API-only app on `queue`, with a throwaway SQLite store it never writes to.
async fn api_only(dir: &std::path::Path, redis: &str, queue: &str) -> common::TestApp {
    let db = format!("sqlite://{}", dir.join("unused.db").display());
    let args = ServeArgs {
        no_worker: true,
        ..common::serve_args()
    };
    common::spawn_with(redis_common(&db, redis, queue, None), args).await
}

fn broker_cfg(redis: &str, queue: &str, visibility: Duration) -> BrokerConfig {
    BrokerConfig {
        url: redis.to_owned(),
        queue: queue.to_owned(),
        visibility_timeout: visibility,
        prefetch: 256,
    }
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// Messages waiting on the queue's list.
async fn ready_count(url: &str, queue: &str) -> i64 {
    redis::cmd("LLEN")
        .arg(queue)
        .query_async(&mut redis_conn(url).await)
        .await
        .expect("LLEN")
}

/// Removes the test's keys so runs do not pile up on the server.
async fn cleanup(url: &str, queue: &str) {
    let _: Result<(), _> = redis::cmd("DEL")
        .arg(queue)
        .arg(format!("{queue}.dlq"))
        .arg(format!("_kombu.binding.{queue}"))
        .arg(format!("_kombu.binding_permanent.{queue}"))
        .query_async(&mut redis_conn(url).await)
        .await;
}

/// The harness itself: Python's producer reaches Python's worker on a fresh queue.
#[tokio::test]
async fn python_harness_round_trip() {
    let Some(redis) = common::redis_url().await else {
        return;
    };
    let Some(venv) = py::ensure_venv() else {
        return;
    };
    let queue = common::unique_queue("py-harness");
    let worker = PythonWorker::start(&venv, &WorkerOpts::new(&redis, &queue)).await;
    let payload = common::example("opened");
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
    let Some(redis) = common::redis_url().await else {
        return;
    };
    let Some(venv) = py::ensure_venv() else {
        return;
    };
    let queue = common::unique_queue("redis-py-consumes");
    let dir = tempfile::tempdir().expect("dir");
    let app = api_only(dir.path(), &redis, &queue).await;
    let py = PythonWorker::start(&venv, &WorkerOpts::new(&redis, &queue)).await;

    let before = Utc::now();
    let mut sent: HashMap<String, Value> = HashMap::new();
    for name in common::EXAMPLES {
        let body = common::example(name);
        let r = app.post(body.clone()).await;
        assert_eq!(r.status(), 202, "{name}");
        let answer: Value = r.json().await.expect("json answer");
        let id = answer["task_id"].as_str().expect("task id").to_owned();
        sent.insert(id, serde_json::from_str(&body).expect("example is JSON"));
    }
    let after = Utc::now();
    let got = py.wait_received(sent.len(), Duration::from_secs(60)).await;
    assert_eq!(got.len(), sent.len(), "each callback handled once");
    for line in &got {
        let id = line["task_id"].as_str().expect("task id");
        let want = sent
            .get(id)
            .unwrap_or_else(|| panic!("unknown task id {id}"));
        assert_eq!(&line["payload"], want, "payload of {id} arrives intact");
        let at = line["received_at"].as_str().expect("received_at is sent");
        let at = DateTime::parse_from_rfc3339(at).expect("received_at is RFC 3339");
        assert!(
            before <= at && at <= after,
            "received_at {at} is the API's receive time"
        );
    }
    let log = py.log_text();
    assert!(
        !log.contains("KeyError") && !log.contains("Traceback"),
        "python worker log:\n{log}"
    );
    assert_eq!(ready_count(&redis, &queue).await, 0);
    py.stop(Duration::from_secs(10)).await;
    app.stop().await;
    cleanup(&redis, &queue).await;
}

/// Redis, a fresh PostgreSQL database and the Celery venv, or `None` to skip (outside CI).
async fn redis_pg_python() -> Option<(String, String, std::path::PathBuf)> {
    Some((
        common::redis_url().await?,
        common::pg_database().await?,
        py::ensure_venv()?,
    ))
}

/// Python's `send_task(..., queue=...)` for each example; mailhook's worker stores the rows in
/// PostgreSQL, as the pure normalizer says they should be.
#[tokio::test]
async fn mailhook_worker_stores_what_python_sends() {
    let Some((redis, pg, venv)) = redis_pg_python().await else {
        return;
    };
    let queue = common::unique_queue("redis-py-produces");
    let app = common::spawn_with(
        redis_common(&pg, &redis, &queue, None),
        common::serve_args(),
    )
    .await;

    let payloads: Vec<String> = common::EXAMPLES
        .iter()
        .map(|n| common::example(n))
        .collect();
    let mut expected = Vec::new();
    for p in &payloads {
        let v: Box<RawValue> = serde_json::from_str(p).expect("example is JSON");
        expected.extend(mailhook::infobip::normalize(&v, Utc::now()).expect("example is valid"));
    }
    let before = Utc::now();
    let ids = py::send_task(&venv, &redis, &queue, DEFAULT_TASK, &payloads);
    assert_eq!(ids.len(), payloads.len());
    common::wait_for_rows(&app.store, expected.len() as i64).await;
    for want in &expected {
        let rows = app
            .store
            .by_id_externo(&want.id_externo)
            .await
            .expect("by id");
        let row = rows
            .iter()
            .find(|r| r.status == want.status && r.event_at == want.event_at)
            .unwrap_or_else(|| panic!("no row {} {}: {rows:?}", want.id_externo, want.status));
        assert_eq!(row.email, want.email, "{}", want.id_externo);
        assert_eq!(row.qj_contact_id, want.qj_contact_id, "{}", want.id_externo);
        // Python sends no received_at: the worker's clock stands in.
        assert!(row.data_recebimento >= before - chrono::Duration::seconds(1));
    }
    common::eventually("queue drained", Duration::from_secs(15), || async {
        (ready_count(&redis, &queue).await == 0).then_some(())
    })
    .await;
    let store = app.store.clone();
    app.stop().await;
    assert_eq!(
        store.count().await.expect("count"),
        expected.len() as i64,
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
    let queue = common::unique_queue("redis-shared");
    const N: usize = 200;
    let py = PythonWorker::start(&venv, &WorkerOpts::new(&redis, &queue)).await;
    // Small batches, so the mailhook worker does not drain the queue before Python's first
    // poll: both must take part.
    let mut args = common::serve_args();
    args.worker.prefetch = 8;
    let app = common::spawn_with(redis_common(&pg, &redis, &queue, None), args).await;

    post_many(&app, "shared", N).await;
    let store = app.store.clone();
    common::eventually(
        "every callback handled",
        Duration::from_secs(90),
        || async {
            let rows = usize::try_from(store.count().await.ok()?).ok()?;
            (py.received().len() + rows >= N).then_some(())
        },
    )
    .await;
    common::eventually("queue drained", Duration::from_secs(15), || async {
        (ready_count(&redis, &queue).await == 0).then_some(())
    })
    .await;
    let lines = py.received();
    py.stop(Duration::from_secs(15)).await;
    app.stop().await;

    py::assert_shared_exactly_once(&lines, &store, "shared", N).await;
    cleanup(&redis, &queue).await;
}

/// kill -9 of a mailhook worker: it fetched a batch, stored a third of it, and died before
/// acking. After the visibility timeout the next worker gets the whole batch back, and the
/// dedupe key absorbs the third already stored: every callback once, none lost.
#[tokio::test]
async fn killed_worker_batch_comes_back_without_doubles() {
    let Some(redis) = common::redis_url().await else {
        return;
    };
    let Some(pg) = common::pg_database().await else {
        return;
    };
    let redis = with_db(&redis, 2);
    let queue = common::unique_queue("redis-crash");
    const N: usize = 60;
    let vt = Duration::from_secs(2);

    let producer = queue::connect(&broker_cfg(&redis, &queue, vt))
        .await
        .expect("producer");
    for n in 0..N {
        let p = opened("crash", n);
        let m = TaskMessage::for_payload(DEFAULT_TASK, p.as_bytes(), Utc::now());
        producer.publish(&m).await.expect("publish");
    }
    let store: Arc<dyn Store> = store::connect(&pg, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    {
        let doomed = queue::connect(&broker_cfg(&redis, &queue, vt))
            .await
            .expect("consumer");
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
        // Nothing acked: the batch sits in `unacked`, as a killed process leaves it.
    }
    let app = common::spawn_with(
        redis_common(&pg, &redis, &queue, Some(vt.as_secs())),
        common::serve_args(),
    )
    .await;
    common::wait_for_rows(&app.store, N as i64).await;
    common::eventually("queue drained", Duration::from_secs(15), || async {
        (ready_count(&redis, &queue).await == 0).then_some(())
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
    cleanup(&redis, &queue).await;
}

/// Our `unacked` entries are kombu's: a batch a mailhook consumer died holding is restored by a
/// Python worker's own `restore_visible`, and handled there.
#[tokio::test]
async fn python_worker_restores_what_a_dead_mailhook_consumer_held() {
    let Some(redis) = common::redis_url().await else {
        return;
    };
    let Some(venv) = py::ensure_venv() else {
        return;
    };
    let redis = with_db(&redis, 3);
    let queue = common::unique_queue("redis-py-restores");
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
    let redis = with_db(&redis, 4);
    let queue = common::unique_queue("redis-mh-restores");
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
    common::eventually("python took the task", Duration::from_secs(30), || async {
        py.log_text()
            .contains(&format!("[{}] received", ids[0]))
            .then_some(())
    })
    .await;
    py.kill();
    assert_eq!(ready_count(&redis, &queue).await, 0, "held unacked");

    let app = common::spawn_with(
        redis_common(&pg, &redis, &queue, Some(vt.as_secs())),
        common::serve_args(),
    )
    .await;
    common::wait_for_rows(&app.store, 1).await;
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
    let Some(redis) = common::redis_url().await else {
        return;
    };
    let Some(venv) = py::ensure_venv() else {
        return;
    };
    let redis = with_db(&redis, 6);
    let queue = common::unique_queue("redis-garbage");
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
    let mut common_args = common::sqlite_common(dir.path());
    common_args.broker_url = Some(redis.clone());
    common_args.queue = queue.clone();
    let app = common::spawn_with(common_args, common::serve_args()).await;
    let broker = queue::connect(&broker_cfg(&redis, &queue, Duration::from_secs(3600)))
        .await
        .expect("broker");
    let dead = common::eventually("3 dead letters", Duration::from_secs(30), || async {
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
    assert_eq!(broker.dlq_replay(Some(&id)).await.expect("replay"), 1);
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
    let Some(redis) = common::redis_url().await else {
        return;
    };
    // Database 5 is this test's alone: its clients are the ones to kill.
    let redis = with_db(&redis, 5);
    let queue = common::unique_queue("redis-reconnect");
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
    let mut admin = redis_conn(&with_db(&redis, 0)).await;
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

/// Fetches until `n` deliveries arrived or the deadline passes.
async fn fetch_n(b: &Arc<dyn Broker>, n: usize) -> Vec<queue::Delivery> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while got.len() < n && std::time::Instant::now() < deadline {
        got.extend(
            b.fetch(n - got.len(), Duration::from_millis(300))
                .await
                .expect("fetch"),
        );
    }
    got
}
