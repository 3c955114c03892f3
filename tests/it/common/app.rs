//! The real app on port 0, configured the way the binary is: from a parsed command line.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use clap::Parser;
use mailhook::app::App;
use mailhook::config::{Cli, Command, CommonArgs, ServeArgs};
use mailhook::store::{self, Store};
use tokio_util::sync::CancellationToken;

/// Parses `mailhook ARGS...` as the binary does (flags, then environment, then defaults).
fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("mailhook").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("mailhook {args:?}: {e}"))
}

/// The settings of `mailhook serve FLAGS...`, on port 0, with 3 delivery attempts and 10 s to
/// shut down unless `flags` says otherwise.
pub fn serve_args(flags: &[&str]) -> ServeArgs {
    let mut argv = vec!["serve"];
    argv.extend_from_slice(flags);
    for (flag, value) in [
        ("--bind", "127.0.0.1:0"),
        ("--max-attempts", "3"),
        ("--shutdown-timeout", "10"),
    ] {
        if !flags.contains(&flag) {
            argv.extend([flag, value]);
        }
    }
    match parse(&argv).command {
        Command::Serve(args) => args,
        _ => unreachable!("`serve` parses as Command::Serve"),
    }
}

/// The settings every command shares, from `flags` (`--database-url`, `--broker-url`, ...).
pub fn common_args(flags: &[&str]) -> CommonArgs {
    let mut argv = flags.to_vec();
    argv.push("migrate");
    parse(&argv).common
}

/// Settings for an app on its own SQLite files in `dir` (the queue beside the database), with a
/// 5 s visibility timeout.
pub fn sqlite_common(dir: &Path) -> CommonArgs {
    let url = format!("sqlite://{}", dir.join("mailhook.db").display());
    common_args(&["--database-url", &url, "--visibility-timeout", "5"])
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
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }
}

/// Spawns the app (API and worker) on port 0 with its own temp SQLite files.
pub async fn spawn_app() -> TestApp {
    spawn_in_temp_dir(&[]).await
}

/// Spawns `mailhook serve FLAGS...` on its own temp SQLite files.
pub async fn spawn_in_temp_dir(flags: &[&str]) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut app = spawn_with(sqlite_common(dir.path()), serve_args(flags)).await;
    app.dir = Some(dir);
    app
}

/// Spawns the app with the given settings.
pub async fn spawn_with(common: CommonArgs, args: ServeArgs) -> TestApp {
    super::init_tracing();
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
