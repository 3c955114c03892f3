//! The shared test harness: the seed's examples, waiting with a deadline, and services that must
//! be there under `CI=true`. The real app in [`app`], brokers in [`brokers`], fresh databases in
//! [`databases`], Python Celery in [`celery`].

pub mod app;
pub mod brokers;
pub mod celery;
pub mod databases;
pub mod process;
pub mod tmpfs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailhook::store::Store;

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

/// An OPENED tracking event with `messageId` `<tag>-<n>` and `qj_contact_id` `n`.
pub fn opened(tag: &str, n: usize) -> String {
    format!(
        r#"{{"notificationType":"OPENED","recipient":"r{n}@example.com","sendDateTime":1721161444325,"messageId":"{tag}-{n}","callbackData":"{{\"qj_contact_id\": {n}}}"}}"#
    )
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

/// A queue name no other test uses.
pub fn unique_queue(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
