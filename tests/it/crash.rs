//! Crash safety on the embedded default: `kill -9` under concurrent load, restart on the same
//! files, and every callback that got a 2xx is stored exactly once.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mailhook::store;
use tokio_util::sync::CancellationToken;

use crate::common::brokers::{amqp_url, broker_cfg, redis_url};
use crate::common::databases::pg_database;
use crate::common::process::{free_port, start, wait_healthy, Load, Proc};
use crate::common::{binary, eventually, unique_queue};

/// Every accepted id has exactly one row, and no id has more than one.
async fn assert_stored_once(dir: &Path, accepted: &[String]) {
    let url = format!("sqlite://{}", dir.join("mailhook.db").display());
    let s = store::connect(&url, 1).await.expect("store");
    let want: HashSet<&String> = accepted.iter().collect();
    assert_eq!(want.len(), accepted.len(), "ids are unique");
    let pool = sqlx::SqlitePool::connect(&url).await.expect("pool");
    eventually(
        &format!("{} accepted callbacks stored", want.len()),
        Duration::from_secs(60),
        || async {
            let stored: Vec<String> = sqlx::query_scalar("SELECT id_externo FROM email_callback")
                .fetch_all(&pool)
                .await
                .ok()?;
            let set: HashSet<&String> = stored.iter().collect();
            assert_eq!(set.len(), stored.len(), "a callback was stored twice");
            want.iter().all(|id| set.contains(*id)).then_some(())
        },
    )
    .await;
    assert!(s.count().await.expect("count") >= accepted.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_serve_under_load_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let client = reqwest::Client::new();
    let port = free_port();
    let mut all = Vec::new();
    for round in 0..2 {
        let p = start(dir.path(), &["serve"], port);
        wait_healthy(&client, p.port).await;
        let tag = if round == 0 { "r0" } else { "r1" };
        let load = Load::start(p.port, 32, tag);
        load.wait_accepted(300 * (round + 1)).await;
        drop(p); // SIGKILL while requests, commits and batches are in flight
        all.extend(load.stop().await);
    }
    let p = start(dir.path(), &["serve"], port);
    wait_healthy(&client, p.port).await;
    assert_stored_once(dir.path(), &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_separate_worker_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let client = reqwest::Client::new();
    let api = start(dir.path(), &["serve", "--no-worker"], free_port());
    wait_healthy(&client, api.port).await;
    let migrate = Command::new(binary())
        .arg("migrate")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("mailhook.db").display()),
        )
        .status()
        .expect("migrate");
    assert!(migrate.success());
    let load = Load::start(api.port, 16, "w");
    let started = Instant::now();
    let table = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("mailhook.db").display()
    ))
    .await
    .expect("table");
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM email_callback")
            .fetch_one(&table)
            .await
            .expect("count")
    };
    for _ in 0..3 {
        let before = rows().await;
        let worker = start(dir.path(), &["worker", "--prefetch", "64"], 0);
        // Killed once it has stored a batch, while the load keeps more coming: mid-batch.
        eventually(
            "the worker to store a batch",
            Duration::from_secs(30),
            || async { (rows().await > before).then_some(()) },
        )
        .await;
        drop(worker); // SIGKILL mid-batch
    }
    load.wait_accepted(200).await;
    let accepted = load.stop().await;
    let _worker = start(dir.path(), &["worker"], 0);
    assert_stored_once(dir.path(), &accepted).await;
    assert!(started.elapsed() < Duration::from_secs(120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().expect("dir");
    let client = reqwest::Client::new();
    let mut p = start(dir.path(), &["serve"], free_port());
    wait_healthy(&client, p.port).await;
    let load = Load::start(p.port, 8, "t");
    load.wait_accepted(100).await;
    let pid = p.child.id().to_string();
    let term = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = p.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no exit within the shutdown deadline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let accepted = load.stop().await;
    assert!(status.success(), "exit status {status:?}");
    let p2 = start(dir.path(), &["serve"], free_port());
    wait_healthy(&client, p2.port).await;
    assert_stored_once(dir.path(), &accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_bounds_a_stalled_request() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().expect("dir");
    let client = reqwest::Client::new();
    let mut p = start(
        dir.path(),
        &[
            "serve",
            "--shutdown-timeout",
            "1",
            "--request-timeout",
            "120",
        ],
        free_port(),
    );
    wait_healthy(&client, p.port).await;
    // A sender that stalls mid-body would hold graceful shutdown forever without a deadline.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .expect("connect");
    s.write_all(b"POST /email HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
        .await
        .expect("write");
    let started = Instant::now();
    let pid = p.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let status = loop {
        if let Some(s) = p.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "shutdown deadline not honoured"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(s);
}

/// `kill -9` of an API node on a real broker under load: every callback that got a 202 is on
/// the queue (the broker confirmed it first), and a worker then stores each exactly once.
async fn kill_9_of_an_api_node_on(broker_url: String) {
    let Some(pg) = pg_database().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let queue = unique_queue("crash-api");
    let client = reqwest::Client::new();
    let port = free_port();
    let child = Command::new(binary())
        .args(["serve", "--no-worker"])
        .current_dir(dir.path())
        .env("BROKER_URL", &broker_url)
        .env("MAILHOOK_QUEUE", &queue)
        .env("MAILHOOK_BIND", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mailhook");
    let api = Proc { child, port };
    wait_healthy(&client, port).await;
    let load = Load::start(port, 32, "api9");
    load.wait_accepted(300).await;
    drop(api); // SIGKILL with publishes in flight
    let accepted = load.stop().await;

    let cfg = broker_cfg(&broker_url, &queue, Duration::from_secs(3600));
    let broker = mailhook::queue::connect(&cfg).await.expect("broker");
    let s = store::connect(&pg, 2).await.expect("store");
    s.migrate().await.expect("migrate");
    let halt = CancellationToken::new();
    let worker = mailhook::worker::Worker::new(broker, s.clone(), Default::default());
    let handle = tokio::spawn(worker.run(halt.clone()));
    eventually(
        "every accepted callback stored",
        Duration::from_secs(60),
        || async {
            for id in &accepted {
                if s.by_id_externo(id).await.ok()?.len() != 1 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    halt.cancel();
    handle.await.expect("worker");
    assert!(s.count().await.expect("count") >= accepted.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_api_node_on_redis_loses_nothing() {
    let Some(url) = redis_url().await else { return };
    kill_9_of_an_api_node_on(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_api_node_on_rabbitmq_loses_nothing() {
    let Some(url) = amqp_url().await else { return };
    kill_9_of_an_api_node_on(url).await;
}
