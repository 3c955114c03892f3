//! What each part of the service last did, kept where every other part can read it: the
//! queue's writer, the store and the worker record their successes and failures here; `GET
//! /health` reads it without waiting on any of them (it must answer while they are wedged), and
//! so can metrics.
//!
//! A [`Part`] also keeps the log readable when a failure repeats (a full disk fails every retry
//! for as long as it lasts): the first failure is logged, then a summary at most every
//! [`SUMMARY_EVERY`] with how many were left out, and the recovery once it comes.
//!
//! [`supervise`] keeps a background task running through panics. A leaf: nothing from the crate.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;

/// Longest silence about a failure that goes on.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// The parts `/health` reports on. Cheap to share (`Arc`); every field is updated in place.
#[derive(Debug)]
pub struct Health {
    /// Publishing to the broker (updated by every publish, and by the embedded queue's writer).
    pub queue: Arc<Part>,
    /// Inserting rows (updated by the worker around each insert).
    pub store: Arc<Part>,
    /// The consume loop: fetching, storing and acking batches.
    pub worker: Arc<Part>,
    /// A worker failing for longer than this is reported `stalled`.
    pub stall_after: Duration,
}

impl Health {
    /// Fresh parts, all healthy, none of them having done anything yet.
    pub fn new(stall_after: Duration) -> Self {
        Health {
            queue: Arc::new(Part::new("queue")),
            store: Arc::new(Part::new("store")),
            worker: Arc::new(Part::new("worker")),
            stall_after,
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new(Duration::from_secs(60))
    }
}

/// One part's record: how it is now, and how often it succeeded and failed.
#[derive(Debug)]
pub struct Part {
    name: String,
    /// `state.failing.is_some()`, readable without the lock: a success of a healthy part (every
    /// publish) takes no lock.
    is_failing: AtomicBool,
    state: Mutex<State>,
    successes: AtomicU64,
    failures: AtomicU64,
    /// Milliseconds since the Unix epoch; 0 before the first success.
    last_success_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    failing: Option<Failing>,
}

#[derive(Debug)]
struct Failing {
    since: Instant,
    error: String,
    /// Failures since the first, all told.
    count: u64,
    /// Failures not logged since the last line about this failure.
    unlogged: u64,
    last_logged: Instant,
}

/// A part as `/health` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Its last operation succeeded (or it has not done any yet).
    Ok,
    /// Its last operation failed with `error`, and every one since `for_` ago did.
    Failing { error: String, for_: Duration },
}

impl Part {
    /// A healthy part called `name` in the log.
    pub fn new(name: impl Into<String>) -> Self {
        Part {
            name: name.into(),
            is_failing: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_success_ms: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a success; logs the recovery when it was failing.
    pub fn ok(&self) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_success_ms.store(now_ms, Ordering::Relaxed);
        if !self.is_failing.load(Ordering::Acquire) {
            return;
        }
        let recovered = {
            let mut s = self.lock();
            self.is_failing.store(false, Ordering::Release);
            s.failing.take()
        };
        if let Some(f) = recovered {
            tracing::info!(
                part = %self.name,
                failures = f.count,
                after = ?f.since.elapsed(),
                "recovered"
            );
        }
    }

    /// Records a failure with `error` (its causes included); logs it if it is the first, if its
    /// text differs from the last logged, or as a summary once [`SUMMARY_EVERY`] has passed.
    pub fn failed(&self, error: &(dyn std::error::Error + 'static)) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let text = with_causes(error);
        let now = Instant::now();
        let mut s = self.lock();
        match &mut s.failing {
            None => {
                self.is_failing.store(true, Ordering::Release);
                s.failing = Some(Failing {
                    since: now,
                    error: text,
                    count: 1,
                    unlogged: 0,
                    last_logged: now,
                });
                drop(s);
                tracing::warn!(part = %self.name, error, "failing; retrying with backoff");
            }
            Some(f) => {
                f.count += 1;
                let changed = f.error != text;
                if !changed && now.duration_since(f.last_logged) < SUMMARY_EVERY {
                    f.unlogged += 1;
                    return;
                }
                let (suppressed, failures, for_) = (f.unlogged, f.count, f.since.elapsed());
                f.unlogged = 0;
                f.last_logged = now;
                f.error = text;
                drop(s);
                tracing::warn!(
                    part = %self.name,
                    error,
                    failures,
                    suppressed,
                    failing_for = ?for_,
                    "still failing"
                );
            }
        }
    }

    /// How it is now (no I/O, no waiting beyond a short lock).
    pub fn status(&self) -> Status {
        if !self.is_failing.load(Ordering::Acquire) {
            return Status::Ok;
        }
        match &self.lock().failing {
            None => Status::Ok,
            Some(f) => Status::Failing {
                error: f.error.clone(),
                for_: f.since.elapsed(),
            },
        }
    }

    /// When it last succeeded.
    pub fn last_success(&self) -> Option<SystemTime> {
        match self.last_success_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// Successes so far.
    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    /// Failures so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// `error` followed by its causes, `: `-separated; a cause whose text the message already ends
/// with (sqlx repeats its database error's text in its own message) is not repeated.
pub fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

/// Exponential backoff between retries of something that is down: `min`, doubled per failure
/// up to `max`, with jitter in the upper half so that retries of several tasks spread out.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// From `min` up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            failures: 0,
        }
    }

    /// The wait before the next retry; each call doubles the one after.
    pub fn next_wait(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let cap = self
            .min
            .saturating_mul(1u32 << (self.failures - 1).min(20))
            .min(self.max);
        let half = cap / 2;
        half + cap.mul_f64(rand::random::<f64>() * 0.5)
    }

    /// Back to `min`, after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A panic caught by [`supervise`].
#[derive(Debug, thiserror::Error)]
#[error("{task} panicked: {message}; restarted")]
pub struct Panicked {
    task: &'static str,
    message: String,
}

impl Panicked {
    /// The panic's message, from its payload.
    pub fn new(task: &'static str, payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        Panicked { task, message }
    }
}

/// Runs `task()` until it returns, starting it again (after a backoff) each time it panics, so
/// that a background task cannot stop for good; each panic is recorded on `part`.
pub async fn supervise<F, Fut>(name: &'static str, part: Arc<Part>, mut task: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match AssertUnwindSafe(task()).catch_unwind().await {
            Ok(()) => return,
            Err(payload) => {
                part.failed(&Panicked::new(name, payload.as_ref()));
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_fails_then_recovers() {
        let p = Part::new("test");
        assert_eq!(p.status(), Status::Ok);
        p.failed(&std::io::Error::other("disk full"));
        p.failed(&std::io::Error::other("disk full"));
        match p.status() {
            Status::Failing { error, .. } => assert_eq!(error, "disk full"),
            Status::Ok => panic!("failing expected"),
        }
        assert_eq!(p.failures(), 2);
        p.ok();
        assert_eq!(p.status(), Status::Ok);
        assert!(p.last_success().is_some());
        assert_eq!(p.successes(), 1);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] < Duration::from_millis(100));
        assert!(waits[1] >= Duration::from_millis(100));
        assert!(waits.iter().all(|w| *w < Duration::from_secs(1)));
        assert!(waits[7] >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_wait() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_supervised_task_that_panics_is_started_again() {
        let part = Arc::new(Part::new("test"));
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        supervise("flaky", part.clone(), move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::Relaxed) < 2 {
                    panic!("boom");
                }
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::Relaxed), 3);
        assert_eq!(part.failures(), 2);
    }
}
