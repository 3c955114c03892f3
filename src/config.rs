//! All configuration: flags, each with an environment twin, and defaults that need no setup.
//!
//! A leaf of the crate: it describes settings and resolves their defaults, and `app` turns them
//! into the queue's, the worker's and the HTTP layer's own configuration.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::HeaderName;
use clap::{Args, Parser, Subcommand};

use crate::secret::{BasicCredential, Secret};

/// Default Celery task name of a callback (a Python worker registers the same name).
pub const DEFAULT_TASK: &str = "mailhook.process_email_callback";

/// Receives Infobip e-mail callbacks on `POST /email`, queues them on `email-webhook`
/// (SQLite, Redis or RabbitMQ, in Celery's protocol) and stores one `email_callback` row per event.
#[derive(Debug, Parser)]
#[command(name = "mailhook", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Settings every command shares.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Database for `email_callback`: `sqlite://FILE` or `postgres://...`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://mailhook.db",
        global = true
    )]
    pub database_url: String,

    /// Broker: `sqlite://FILE`, `redis://host:port/db` or `amqp://user:pass@host:port/vhost`.
    /// Also read from CELERY_BROKER_URL. Default: a SQLite file beside a SQLite database
    /// (`mailhook-queue.db`).
    #[arg(long, env = "BROKER_URL", global = true, hide_env_values = true)]
    pub broker_url: Option<String>,

    /// Queue the callbacks travel on.
    #[arg(
        long,
        env = "MAILHOOK_QUEUE",
        default_value = "email-webhook",
        global = true
    )]
    pub queue: String,

    /// Celery task name of each message.
    #[arg(long, env = "MAILHOOK_TASK_NAME", default_value = DEFAULT_TASK, global = true)]
    pub task_name: String,

    /// Seconds an unacked message stays hidden before it is delivered again
    /// [default: 30 for SQLite, 3600 for Redis (kombu's default; Python workers must agree)].
    #[arg(long, env = "MAILHOOK_VISIBILITY_TIMEOUT", global = true)]
    pub visibility_timeout: Option<u64>,

    /// Seconds to keep retrying, at start, a database or broker that cannot be reached or
    /// opened (saying what it waits for), before exiting with an error.
    #[arg(
        long,
        env = "MAILHOOK_STARTUP_TIMEOUT",
        default_value_t = 60,
        global = true
    )]
    pub startup_timeout: u64,
}

impl CommonArgs {
    /// The broker URL: `--broker-url`/`BROKER_URL`, else `CELERY_BROKER_URL`, else the default.
    pub fn broker_url(&self) -> String {
        self.broker_url
            .clone()
            .or_else(|| {
                std::env::var("CELERY_BROKER_URL")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| default_broker_url(&self.database_url))
    }

    /// The visibility timeout: `--visibility-timeout`, else 3600 s on Redis (kombu's default,
    /// which Python workers sharing the database use too), else 30 s.
    pub fn visibility_timeout(&self) -> Duration {
        let default = if self.broker_url().starts_with("redis") {
            3600
        } else {
            30
        };
        Duration::from_secs(self.visibility_timeout.unwrap_or(default))
    }

    /// How long start-up waits for the database and the broker.
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.startup_timeout)
    }
}

/// The queue file sits beside a SQLite database (`mailhook.db` -> `mailhook-queue.db`).
pub fn default_broker_url(database_url: &str) -> String {
    const FALLBACK: &str = "sqlite://mailhook-queue.db";
    let Some(rest) = database_url.strip_prefix("sqlite://") else {
        return FALLBACK.to_owned();
    };
    let (path, query) = rest
        .split_once('?')
        .map_or((rest, None), |(p, q)| (p, Some(q)));
    if path.is_empty() || path.contains(":memory:") {
        return FALLBACK.to_owned();
    }
    let queue_path = match path.strip_suffix(".db") {
        Some(stem) => format!("{stem}-queue.db"),
        None => format!("{path}-queue"),
    };
    match query {
        Some(q) => format!("sqlite://{queue_path}?{q}"),
        None => format!("sqlite://{queue_path}"),
    }
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API (and, unless --no-worker, the worker) until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Run only the worker: consume the queue and store rows.
    Worker(WorkerArgs),
    /// Apply database migrations and exit.
    Migrate,
    /// Inspect and replay the dead-letter queue (`<queue>.dlq`).
    #[command(subcommand)]
    Dlq(DlqCommand),
}

/// `mailhook serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "MAILHOOK_BIND", default_value = "127.0.0.1:5000")]
    pub bind: SocketAddr,

    /// Run the API only (no worker in this process).
    #[arg(long, env = "MAILHOOK_NO_WORKER")]
    pub no_worker: bool,

    /// Largest accepted request body, in bytes (Infobip's 2000-result bucket is about 9 MB).
    #[arg(long, env = "MAILHOOK_BODY_LIMIT", default_value_t = 16 * 1024 * 1024)]
    pub body_limit: usize,

    /// Seconds a request may take, slow body upload included, before it is cut off.
    #[arg(long, env = "MAILHOOK_REQUEST_TIMEOUT", default_value_t = 30)]
    pub request_timeout: u64,

    /// Seconds the worker may fail to store before `/health` reports it `stalled`.
    #[arg(long, env = "MAILHOOK_STALL_AFTER", default_value_t = 60)]
    pub stall_after: u64,

    /// Callbacks handled at once; beyond this, 503 with Retry-After instead of buffering more
    /// bodies (memory stays under about this times the body limit when the queue is slow).
    #[arg(long, env = "MAILHOOK_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,

    /// Accepted HTTP Basic credentials, `USER:PASSWORD`; repeat the flag (or comma-separate) to
    /// accept several pairs while rotating. With --auth-header too, either one is enough.
    #[arg(
        long = "basic-auth",
        env = "MAILHOOK_BASIC_AUTH",
        value_name = "USER:PASSWORD",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub basic_auth: Vec<BasicCredential>,

    /// Header that must carry one of the --auth-secret values (e.g. `X-Webhook-Secret`).
    #[arg(long, env = "MAILHOOK_AUTH_HEADER", requires = "auth_secret")]
    pub auth_header: Option<HeaderName>,

    /// Accepted values of --auth-header; repeat (or comma-separate) to accept several.
    #[arg(
        long,
        env = "MAILHOOK_AUTH_SECRET",
        value_name = "SECRET",
        value_delimiter = ',',
        hide_env_values = true,
        requires = "auth_header"
    )]
    pub auth_secret: Vec<Secret>,

    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// Worker settings (`mailhook worker`, and the worker inside `mailhook serve`).
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Consume loops run in parallel by this process.
    #[arg(long, env = "MAILHOOK_WORKER_CONCURRENCY", default_value_t = 1)]
    pub concurrency: usize,

    /// Messages taken per batch (and unacked messages held per consumer on RabbitMQ).
    #[arg(long, env = "MAILHOOK_PREFETCH", default_value_t = 256)]
    pub prefetch: u16,

    /// Deliveries of a failing message before it goes to the dead-letter queue.
    #[arg(long, env = "MAILHOOK_MAX_ATTEMPTS", default_value_t = 10)]
    pub max_attempts: u32,

    /// Seconds allowed, after SIGTERM or SIGINT, to finish the batch in hand and requests in flight.
    #[arg(long, env = "MAILHOOK_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
}

/// `mailhook dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first, as JSON lines.
    List {
        /// How many to show.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put dead letters back on the queue.
    Replay {
        /// Replay only this dead letter.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<String>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_file_sits_beside_the_database() {
        assert_eq!(
            default_broker_url("sqlite://mailhook.db"),
            "sqlite://mailhook-queue.db"
        );
        assert_eq!(
            default_broker_url("sqlite:///var/lib/x/data.db?mode=rwc"),
            "sqlite:///var/lib/x/data-queue.db?mode=rwc"
        );
        assert_eq!(default_broker_url("sqlite://data"), "sqlite://data-queue");
        assert_eq!(
            default_broker_url("postgres://localhost/x"),
            "sqlite://mailhook-queue.db"
        );
        assert_eq!(
            default_broker_url("sqlite::memory:"),
            "sqlite://mailhook-queue.db"
        );
    }

    #[test]
    fn cli_parses_and_has_defaults() {
        let cli = Cli::try_parse_from(["mailhook", "serve", "--no-worker"]).expect("parses");
        let Command::Serve(s) = cli.command else {
            panic!("serve expected")
        };
        assert!(s.no_worker);
        assert_eq!(s.body_limit, 16 * 1024 * 1024);
        assert_eq!(cli.common.queue, "email-webhook");
        assert!(Cli::try_parse_from(["mailhook", "dlq", "replay"]).is_err());
        assert!(Cli::try_parse_from(["mailhook", "dlq", "replay", "--all"]).is_ok());
    }

    #[test]
    fn auth_flags_parse_repeat_and_pair_up() {
        let serve = |args: &[&str]| {
            let argv = ["mailhook", "serve"].iter().chain(args).copied();
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Serve(s) => s,
                _ => panic!("serve expected"),
            })
        };
        let s = serve(&["--basic-auth", "a:1,b:2", "--basic-auth", "c:3"]).expect("parses");
        let users: Vec<_> = s.basic_auth.iter().map(|c| c.user.as_str()).collect();
        assert_eq!(users, ["a", "b", "c"]);
        assert!(!format!("{s:?}").contains(":1"), "passwords are redacted");

        let s = serve(&[
            "--auth-header",
            "X-Webhook-Secret",
            "--auth-secret",
            "s1,s2",
        ])
        .expect("parses");
        assert_eq!(
            s.auth_header.as_ref().map(HeaderName::as_str),
            Some("x-webhook-secret")
        );
        assert_eq!(s.auth_secret.len(), 2);
        assert!(!format!("{s:?}").contains("s1"), "secrets are redacted");

        assert!(serve(&["--basic-auth", "nocolon"]).is_err());
        assert!(
            serve(&["--auth-header", "X-Secret"]).is_err(),
            "a header needs secrets"
        );
        assert!(
            serve(&["--auth-secret", "s"]).is_err(),
            "secrets need a header"
        );
        assert!(serve(&["--auth-header", "bad header", "--auth-secret", "s"]).is_err());
    }
}
