//! Shared test harness: spawn the real app on port 0 against its own temp files or databases.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod celery;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailhook::app::App;
use mailhook::config::{CommonArgs, ServeArgs, WorkerArgs};
use mailhook::store::{self, Store};
use tokio_util::sync::CancellationToken;

/// The seed's examples, by file name.
pub const EXAMPLES: [&str; 8] = [
    "delivered",
    "undeliverable",
    "suppressed-bounce",
    "delivered-dict",
    "opened",
    "clicked",
    "unsubscribed",
    "complained",
];

/// Reads `tests/fixtures/examples/NAME.json`.
pub fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/examples")
        .join(format!("{name}.json"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Default worker settings for tests.
pub fn worker_args() -> WorkerArgs {
    WorkerArgs {
        concurrency: 1,
        prefetch: 256,
        max_attempts: 3,
        shutdown_timeout: 10,
    }
}

/// Settings for an app on its own temp SQLite files.
pub fn sqlite_common(dir: &Path) -> CommonArgs {
    CommonArgs {
        database_url: format!("sqlite://{}", dir.join("mailhook.db").display()),
        broker_url: None,
        queue: "email-webhook".into(),
        task_name: mailhook::config::DEFAULT_TASK.into(),
        visibility_timeout: Some(5),
    }
}

/// A running app.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<std::io::Result<()>>,
    pub dir: Option<tempfile::TempDir>,
}

impl TestApp {
    /// URL of `path` on this app.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POSTs `body` to `/email`.
    pub async fn post(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(self.url("/email"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Stops the app gracefully and waits for it.
    pub async fn stop(self) -> Option<tempfile::TempDir> {
        self.shutdown.cancel();
        let _ = self.handle.await;
        self.dir
    }
}

/// Spawns the app (API and worker) on port 0 with its own temp SQLite files.
pub async fn spawn_app() -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let common = sqlite_common(dir.path());
    let mut app = spawn_with(common, serve_args()).await;
    app.dir = Some(dir);
    app
}

/// Serve settings on port 0 with the worker.
pub fn serve_args() -> ServeArgs {
    ServeArgs {
        bind: "127.0.0.1:0".parse().expect("addr"),
        no_worker: false,
        body_limit: 16 * 1024 * 1024,
        request_timeout: 30,
        max_in_flight: 1024,
        basic_auth: Vec::new(),
        auth_header: None,
        auth_secret: Vec::new(),
        worker: worker_args(),
    }
}

/// Spawns the app with the given settings.
pub async fn spawn_with(common: CommonArgs, args: ServeArgs) -> TestApp {
    init_tracing();
    let store = store::connect(&common.database_url, 2)
        .await
        .expect("store");
    let app = App::build(common, args).await.expect("app builds");
    store.migrate().await.expect("migrated");
    let addr = app.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run(shutdown.clone()));
    TestApp {
        addr,
        client: reqwest::Client::new(),
        store,
        shutdown,
        handle,
        dir: None,
    }
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the table holds exactly `n` rows.
pub async fn wait_for_rows(store: &Arc<dyn Store>, n: i64) {
    eventually(&format!("{n} rows"), Duration::from_secs(30), || async {
        (store.count().await.ok()? == n).then_some(())
    })
    .await;
}

/// The `mailhook` binary built for the tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mailhook"))
}

/// True when running in CI, where a missing service is a failure and not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns `Some(url)` for a service that answers, `None` (skip) when it is absent outside CI;
/// panics when it is absent in CI.
pub async fn require_service(name: &str, env: &str, default: &str) -> Option<String> {
    let url = std::env::var(env).unwrap_or_else(|_| default.to_owned());
    let hostport = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.rsplit('@').next())
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let ok = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(hostport.as_str()),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if ok {
        return Some(url);
    }
    assert!(
        !in_ci(),
        "{name} is not reachable at {hostport} and CI=true: failing, not skipping"
    );
    eprintln!("SKIP: {name} not reachable at {hostport} (set CI=true to make this a failure)");
    None
}

/// PostgreSQL server used by tests (`MAILHOOK_TEST_POSTGRES`, default the local trust-auth one).
pub const PG_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Creates a fresh, uniquely named PostgreSQL database and returns its URL; `None` (skip) when
/// PostgreSQL is absent outside CI.
pub async fn pg_database() -> Option<String> {
    fresh_database::<sqlx::PgConnection>("PostgreSQL", "MAILHOOK_TEST_POSTGRES", PG_DEFAULT).await
}

/// Creates `mailhook_test_<uuid>` on the server behind `env` (or `default`) and returns its URL.
async fn fresh_database<C>(service: &str, env: &str, default: &str) -> Option<String>
where
    C: sqlx::Connection,
    for<'c> &'c mut C: sqlx::Executor<'c>,
{
    let admin = require_service(service, env, default).await?;
    let name = format!("mailhook_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = C::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("connect to {service}: {e}"));
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}

/// A Redis URL for an isolated test (`MAILHOOK_TEST_REDIS`, default local Redis db 0), or
/// `None` (skip) when Redis is absent outside CI. Tests isolate by queue name.
pub async fn redis_url() -> Option<String> {
    require_service("Redis", "MAILHOOK_TEST_REDIS", "redis://127.0.0.1:6379/0").await
}

/// An AMQP URL (`MAILHOOK_TEST_AMQP`, default local RabbitMQ), or `None` (skip) when RabbitMQ
/// is absent outside CI. Tests isolate by queue name.
pub async fn amqp_url() -> Option<String> {
    require_service(
        "RabbitMQ",
        "MAILHOOK_TEST_AMQP",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
    .await
}

/// A queue name no other test uses.
pub fn unique_queue(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// MySQL/MariaDB server used by tests (`MAILHOOK_TEST_MYSQL`, default the local root account).
pub const MYSQL_DEFAULT: &str = "mysql://root@127.0.0.1:3306/test";

/// Creates a fresh MySQL/MariaDB database and returns its URL; `None` (skip) when the server is
/// absent outside CI.
pub async fn mysql_database() -> Option<String> {
    fresh_database::<sqlx::MySqlConnection>("MariaDB", "MAILHOOK_TEST_MYSQL", MYSQL_DEFAULT).await
}
