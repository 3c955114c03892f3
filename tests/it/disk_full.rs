//! A disk that fills up under load, for real (a tmpfs of the test's own): the issue's
//! acceptance check. Several senders post reports while the space runs out; every messageId
//! that got a 2xx is recorded; the space comes back; every one of them must be stored exactly
//! once within seconds, with no restart, and again after a `kill -9` and a restart.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use crate::common::databases::{pg_admin_url, pg_database};
use crate::common::eventually;
use crate::common::process::{free_port, mailhook, report_body, spawn, wait_healthy, Load, Proc};
use crate::common::tmpfs::Tmpfs;

/// Senders at once, and the report each posts: 5 events with about 800 bytes of callbackData.
const SENDERS: usize = 4;
const EVENTS: usize = 5;
const PAD: usize = 800;
/// How long the senders go on against the full disk.
const FULL_FOR: Duration = Duration::from_secs(3);
/// How long the service may take to store every accepted callback once space is back.
const RECOVERY: Duration = Duration::from_secs(20);

/// Stored rows per messageId.
async fn stored_sqlite(pool: &sqlx::SqlitePool) -> Option<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT id_externo, COUNT(*) FROM email_callback GROUP BY id_externo")
            .fetch_all(pool)
            .await
            .ok()?;
    Some(rows.into_iter().collect())
}

/// Waits until every accepted messageId has a row, failing at once on one stored twice.
async fn assert_stored_once<F, Fut>(accepted: &[String], within: Duration, stored: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<HashMap<String, i64>>>,
{
    let want: HashSet<&String> = accepted.iter().collect();
    assert_eq!(want.len(), accepted.len(), "messageIds are unique");
    let missing = eventually(
        &format!("{} accepted events stored", want.len()),
        within,
        || async {
            let rows = stored().await?;
            if let Some((id, n)) = rows.iter().find(|(_, n)| **n > 1) {
                panic!("{id} stored {n} times");
            }
            let missing = want.iter().filter(|id| !rows.contains_key(**id)).count();
            (missing == 0).then_some(missing)
        },
    )
    .await;
    assert_eq!(missing, 0);
}

/// `/health` status code on `port`, if it answers.
async fn health(client: &reqwest::Client, port: u16) -> Option<u16> {
    let r = client
        .get(format!("http://127.0.0.1:{port}/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

/// The check on a service that `start` runs on `port`: senders post reports while the
/// disk fills (`fs` left with `leave` bytes free) and until `fault_seen` has held for
/// [`FULL_FOR`]; the space comes back; every messageId that got a 2xx must be stored exactly
/// once (as `stored` reads the table) within [`RECOVERY`] with no restart, `/health` answer 200
/// again, and the same hold after a `kill -9` and a restart.
async fn fill_then_recover<Fa, FaFut, St, StFut>(
    fs: &Tmpfs,
    leave: u64,
    port: u16,
    tag: &'static str,
    start: impl Fn() -> Proc,
    fault_seen: Fa,
    stored: St,
) where
    Fa: Fn() -> FaFut,
    FaFut: Future<Output = Option<()>>,
    St: Fn() -> StFut,
    StFut: Future<Output = Option<HashMap<String, i64>>>,
{
    let client = reqwest::Client::new();
    let p = start();
    wait_healthy(&client, port).await;
    fs.fill_leaving(leave);

    let load = Load::start_with(port, SENDERS, tag, report_body(EVENTS, PAD));
    eventually("the fault to show", Duration::from_secs(30), &fault_seen).await;
    tokio::time::sleep(FULL_FOR).await;
    let accepted = load.stop().await;
    assert!(!accepted.is_empty(), "some callbacks were accepted");

    fs.resize("300m");
    assert_stored_once(&accepted, RECOVERY, &stored).await;
    eventually("/health to answer 200 again", RECOVERY, || async {
        (health(&client, port).await? == 200).then_some(())
    })
    .await;

    drop(p); // kill -9
    let _p = start();
    wait_healthy(&client, port).await;
    assert_stored_once(&accepted, RECOVERY, &stored).await;
}

/// The embedded default with everything on the small disk: the queue file, the table file,
/// and the log (stdout and stderr), as in the issue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_full_disk_loses_nothing_and_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount("24m", None) else {
        return;
    };
    let dir = fs.path();
    let port = free_port();
    let start = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("mailhook.log"))
            .expect("log");
        let mut cmd = mailhook(dir, &["serve"], port);
        cmd.env("RUST_LOG", "info")
            .env("MAILHOOK_VISIBILITY_TIMEOUT", "5")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        spawn(cmd, port)
    };
    let url = format!("sqlite://{}", dir.join("mailhook.db").display());
    let pool = sqlx::SqlitePool::connect_lazy(&url).expect("table");
    let client = reqwest::Client::new();
    // The queue refuses what it cannot commit, and /health says so.
    let refusing = || async { (health(&client, port).await? == 503).then_some(()) };
    fill_then_recover(&fs, 3 << 20, port, "full", start, refusing, || {
        stored_sqlite(&pool)
    })
    .await;
    pool.close().await;
}

/// Only the table's file on the small disk (the queue and the log on a big one): the worker's
/// commits fail while the API keeps accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_table_on_a_full_disk_loses_nothing() {
    let Some(fs) = Tmpfs::mount("16m", None) else {
        return;
    };
    let queue_dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let db = format!("sqlite://{}", fs.path().join("mailhook.db").display());
    let queue = format!("sqlite://{}", queue_dir.path().join("queue.db").display());
    let start = || {
        let mut cmd = mailhook(queue_dir.path(), &["serve"], port);
        cmd.env("DATABASE_URL", &db)
            .env("BROKER_URL", &queue)
            .env("MAILHOOK_VISIBILITY_TIMEOUT", "5");
        spawn(cmd, port)
    };
    let pool = sqlx::SqlitePool::connect_lazy(&db).expect("table");
    // The table stops growing for half a second: its disk is full.
    let last = std::sync::atomic::AtomicI64::new(-1);
    let stopped_growing = || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM email_callback")
            .fetch_one(&pool)
            .await
            .ok()?;
        (last.swap(n, std::sync::atomic::Ordering::Relaxed) == n).then_some(())
    };
    fill_then_recover(&fs, 2 << 20, port, "table", start, stopped_growing, || {
        stored_sqlite(&pool)
    })
    .await;
    pool.close().await;
}

/// A tablespace on a tmpfs of the test's own, holding one test database's `email_callback`
/// (table, TOAST and indexes): PostgreSQL runs out of space there and nowhere else. Dropped
/// with the database on drop (before the tmpfs goes).
struct PgTablespace {
    admin: String,
    name: String,
    database: String,
}

impl PgTablespace {
    async fn create(admin: &str, database: &str, dir: &std::path::Path) -> PgTablespace {
        use sqlx::Connection;
        let name = format!("mailhook_test_ts_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin).await.expect("admin");
        sqlx::raw_sql(&format!(
            "CREATE TABLESPACE {name} LOCATION '{}'",
            dir.display()
        ))
        .execute(&mut conn)
        .await
        .expect("create tablespace");
        PgTablespace {
            admin: admin.to_owned(),
            name,
            database: database.to_owned(),
        }
    }

    /// Moves `email_callback` and its indexes there.
    async fn hold_table(&self, db_url: &str) {
        let pool = sqlx::PgPool::connect(db_url).await.expect("db");
        sqlx::raw_sql(&format!(
            "ALTER TABLE email_callback SET TABLESPACE {}",
            self.name
        ))
        .execute(&pool)
        .await
        .expect("move table");
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'email_callback'",
        )
        .fetch_all(&pool)
        .await
        .expect("indexes");
        for i in indexes {
            sqlx::raw_sql(&format!("ALTER INDEX {i} SET TABLESPACE {}", self.name))
                .execute(&pool)
                .await
                .expect("move index");
        }
        pool.close().await;
    }
}

impl Drop for PgTablespace {
    fn drop(&mut self) {
        let (admin, name, database) =
            (self.admin.clone(), self.name.clone(), self.database.clone());
        // Drop cannot await: a thread of its own with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                use sqlx::Connection;
                let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await else {
                    return;
                };
                let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
                let _ = sqlx::raw_sql(&format!("DROP TABLESPACE IF EXISTS {name}"))
                    .execute(&mut conn)
                    .await;
            });
        })
        .join();
    }
}

/// Stored rows per messageId in PostgreSQL.
async fn stored_pg(pool: &sqlx::PgPool) -> Option<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT id_externo, COUNT(*) FROM email_callback GROUP BY id_externo")
            .fetch_all(pool)
            .await
            .ok()?;
    Some(rows.into_iter().collect())
}

/// PostgreSQL out of space for the table (the queue, embedded, on a big disk): the worker
/// holds what it cannot store, /health says so, and everything accepted is stored once the
/// space is back, with no dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_out_of_space_loses_nothing() {
    let Some(db_url) = pg_database().await else {
        return;
    };
    let Some(fs) = Tmpfs::mount("16m", Some("postgres")) else {
        return;
    };
    let database = db_url.rsplit('/').next().expect("db name").to_owned();
    let space = PgTablespace::create(&pg_admin_url(), &database, fs.path()).await;
    let store = mailhook::store::connect(&db_url, 1).await.expect("store");
    store.migrate().await.expect("migrate");
    space.hold_table(&db_url).await;

    let queue_dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let start = || {
        let mut cmd = mailhook(queue_dir.path(), &["serve"], port);
        cmd.env("DATABASE_URL", &db_url)
            .env("MAILHOOK_VISIBILITY_TIMEOUT", "5")
            .env("MAILHOOK_MAX_ATTEMPTS", "2");
        spawn(cmd, port)
    };
    let client = reqwest::Client::new();
    let store_failing = || async {
        let r = client
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .ok()?;
        let body: serde_json::Value = r.json().await.ok()?;
        (body["store"].as_str()? != "ok").then_some(())
    };
    let pool = sqlx::PgPool::connect(&db_url).await.expect("db");
    fill_then_recover(&fs, 2 << 20, port, "pg", start, store_failing, || {
        stored_pg(&pool)
    })
    .await;
    let dead = std::process::Command::new(crate::common::binary())
        .args(["dlq", "list"])
        .current_dir(queue_dir.path())
        .env("DATABASE_URL", &db_url)
        .output()
        .expect("dlq list");
    assert!(dead.status.success());
    assert_eq!(String::from_utf8_lossy(&dead.stdout), "", "no dead letter");
    pool.close().await;
}
