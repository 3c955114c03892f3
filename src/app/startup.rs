//! Start-up treated like the running service: a database or broker that cannot be reached or
//! opened yet is retried with backoff up to the start-up deadline, and the log says within a
//! second what the process waits for; past the deadline, the last error is returned, named.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::StartError;
use crate::health::{with_causes, Backoff};
use crate::queue::QueueError;
use crate::store::StoreError;

/// How soon the log says what start-up waits for, even while one attempt hangs.
const SAY_WITHIN: Duration = Duration::from_secs(1);
/// Longest silence while waiting (one line per retry would flood the log for a minute).
const SAY_EVERY: Duration = Duration::from_secs(10);
/// Longest wait for one attempt (a server that never answers): then a fresh one.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `attempt` until it succeeds, fails for good (a bad URL: no retry can help), or
/// `deadline` has passed since the first try; `what` names the thing waited for in the log and
/// the final error (no password in it).
pub(super) async fn wait_for<T, E, F, Fut>(
    what: &str,
    deadline: Duration,
    mut attempt: F,
) -> Result<T, StartError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Into<StartError>,
{
    let started = Instant::now();
    let give_up_at = started + deadline;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut said_at: Option<Instant> = None;
    // Shown when the deadline cuts an attempt short: the cause seen before.
    let mut last: Option<StartError> = None;
    let gave_up = |source: Option<StartError>| StartError::GaveUp {
        what: what.to_owned(),
        waited: started.elapsed(),
        source: source.map(Box::new),
    };
    loop {
        let attempt_ends = give_up_at.min(Instant::now() + ATTEMPT_TIMEOUT);
        let attempt = tokio::time::timeout_at(attempt_ends, attempt());
        tokio::pin!(attempt);
        let result = tokio::select! {
            r = &mut attempt => r,
            () = tokio::time::sleep(SAY_WITHIN), if said_at.is_none() => {
                tracing::info!(waiting_for = what, "still connecting");
                said_at = Some(Instant::now());
                attempt.await
            }
        };
        let error: StartError = match result {
            Err(_) if attempt_ends >= give_up_at => return Err(gave_up(last)),
            Err(_) => StartError::NoAnswer(ATTEMPT_TIMEOUT),
            Ok(Ok(v)) => {
                if said_at.is_some() {
                    tracing::info!(ready = what, after = ?started.elapsed(), "connected");
                }
                return Ok(v);
            }
            Ok(Err(e)) => e.into(),
        };
        if is_permanent(&error) {
            return Err(error);
        }
        let left = give_up_at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(gave_up(Some(error)));
        }
        // The last wait is cut short: one more attempt right at the deadline.
        let wait = backoff.next_wait().min(left);
        if said_at.is_none_or(|at| at.elapsed() >= SAY_EVERY) {
            tracing::warn!(
                waiting_for = what,
                error = %with_causes(&error),
                retry_in = ?wait,
                gives_up_in = ?left,
                "cannot start yet; retrying"
            );
            said_at = Some(Instant::now());
        }
        last = Some(error);
        tokio::time::sleep(wait).await;
    }
}

/// Failures no retry can mend: a URL naming nothing we support, or that cannot be parsed.
fn is_permanent(e: &StartError) -> bool {
    let sqlx_config = |e: &sqlx::Error| matches!(e, sqlx::Error::Configuration(_));
    match e {
        StartError::Store(s) => match s {
            StoreError::UnsupportedUrl(_) => true,
            StoreError::Database(e) | StoreError::Open { source: e, .. } => sqlx_config(e),
            // A migration that cannot run for lack of a connection is retried; one that is
            // missing, changed or dirty is not.
            StoreError::Migrate(m) => !matches!(
                m,
                sqlx::migrate::MigrateError::Execute(_)
                    | sqlx::migrate::MigrateError::ExecuteMigration(..)
            ),
        },
        StartError::Queue(q) => match q {
            QueueError::UnsupportedUrl(_) => true,
            QueueError::Sqlite(crate::queue::sqlite::Error::Sql(e))
            | QueueError::Sqlite(crate::queue::sqlite::Error::Open { source: e, .. }) => {
                sqlx_config(e)
            }
            QueueError::Redis(crate::queue::redis::Error::Redis(e)) => {
                e.kind() == ::redis::ErrorKind::InvalidClientConfig
            }
            _ => false,
        },
        _ => false,
    }
}
