//! Real Python Celery for interop tests: a pinned virtualenv, a worker process, a producer.
//!
//! The virtualenv lives in `target/celery-venv`, built from `tests/celery/requirements.txt` and
//! rebuilt when that file changes (a stamp holds its hash). Two test runs in one checkout may
//! start at once, so the build happens under a file lock. Without a usable `python3`/`pip`, tests are skipped locally
//! and fail under `CI=true`, as for the other services.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// `tests/celery`: `tasks.py`, `send.py` and `requirements.txt`.
pub fn celery_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/celery")
}

/// `target/celery-venv`, beside the build output so `cargo clean` removes it.
fn venv_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("celery-venv")
}

/// Returns the virtualenv with the pinned Celery, building it if missing or stale; `None`
/// (skip, with a `SKIP:` line) when Python or the package index is unusable outside CI;
/// panics under `CI=true`.
pub fn ensure_venv() -> Option<PathBuf> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match VENV.get_or_init(build_venv) {
        Ok(p) => Some(p.clone()),
        Err(e) => {
            assert!(
                !super::in_ci(),
                "Python Celery is unusable and CI=true: failing, not skipping: {e}"
            );
            eprintln!("SKIP: Python Celery unusable ({e}); set CI=true to make this a failure");
            None
        }
    }
}

// A real cross-process lock (`File::lock`): two test runs may build the venv at once.
fn build_venv() -> Result<PathBuf, String> {
    let venv = venv_dir();
    let reqs = celery_dir().join("requirements.txt");
    let wanted = std::fs::read(&reqs).map_err(|e| format!("{}: {e}", reqs.display()))?;
    let wanted = hex::encode(Sha256::digest(&wanted));
    let stamp = venv.join("requirements.sha256");
    let parent = venv.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let lock_path = parent.join("celery-venv.lock");
    let lock = File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("lock {}: {e}", lock_path.display()))?;
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted) {
        return Ok(venv);
    }
    eprintln!("building {} (pip install, once)", venv.display());
    // A half-built venv from an interrupted run must not be trusted.
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--timeout",
            "60",
            "-r",
        ])
        .arg(&reqs))?;
    std::fs::write(&stamp, &wanted).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(venv)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ")
    ))
}

/// A `celery -A tasks worker` process on one queue, killed when dropped.
pub struct PythonWorker {
    child: Child,
    /// Its combined stdout/stderr.
    pub log: PathBuf,
    /// The file its task appends one JSON line per handled callback to.
    pub out: PathBuf,
    _dir: tempfile::TempDir,
}

/// How to start a [`PythonWorker`].
#[derive(Debug, Clone)]
pub struct WorkerOpts {
    /// Broker URL (`redis://...` or `amqp://...`).
    pub broker_url: String,
    /// Queue to consume (`-Q`).
    pub queue: String,
    /// Task name to register (`MAILHOOK_TASK_NAME`).
    pub task_name: String,
    /// Redis visibility timeout in seconds; must match mailhook's on the same Redis database.
    pub visibility_timeout: u64,
    /// Extra environment variables (e.g. `MAILHOOK_TASK_FAIL=1`).
    pub env: Vec<(String, String)>,
}

impl WorkerOpts {
    /// Defaults: the standard task name and kombu's default visibility timeout.
    pub fn new(broker_url: &str, queue: &str) -> Self {
        WorkerOpts {
            broker_url: broker_url.to_owned(),
            queue: queue.to_owned(),
            task_name: mailhook::config::DEFAULT_TASK.to_owned(),
            visibility_timeout: 3600,
            env: Vec::new(),
        }
    }
}

impl PythonWorker {
    /// Spawns the worker (not yet ready: see [`PythonWorker::wait_ready`]).
    pub fn spawn(venv: &Path, opts: &WorkerOpts) -> PythonWorker {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("worker.log");
        let out = dir.path().join("out.jsonl");
        let log_file = File::create(&log).expect("worker log");
        let err_file = log_file.try_clone().expect("worker log");
        // A unique node name: several workers share one broker in parallel tests.
        let node = format!("mh-{}@localhost", uuid::Uuid::new_v4().simple());
        let mut cmd = Command::new(venv.join("bin/celery"));
        cmd.current_dir(celery_dir())
            .args(["-A", "tasks", "worker", "-Q", &opts.queue])
            .args(["--pool", "solo", "--concurrency", "1", "-l", "info", "-n"])
            .arg(&node)
            // No broadcast chatter with other tests' workers, and a faster start.
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .env("CELERY_BROKER_URL", &opts.broker_url)
            .env("MAILHOOK_TASK_NAME", &opts.task_name)
            .env("MAILHOOK_OUT", &out)
            .env(
                "MAILHOOK_VISIBILITY_TIMEOUT",
                opts.visibility_timeout.to_string(),
            )
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(err_file));
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn celery worker");
        PythonWorker {
            child,
            log,
            out,
            _dir: dir,
        }
    }

    /// Spawns the worker and waits until it consumes (its log says `ready.`).
    pub async fn start(venv: &Path, opts: &WorkerOpts) -> PythonWorker {
        let mut w = Self::spawn(venv, opts);
        w.wait_ready(Duration::from_secs(60)).await;
        w
    }

    /// Polls the log for Celery's `ready.` line; panics with the log on timeout or exit.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let log = self.log_text();
            if log.contains(" ready.") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("celery worker exited ({status}) before ready:\n{log}");
            }
            assert!(
                start.elapsed() < timeout,
                "celery worker not ready after {timeout:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The worker's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every callback the worker's task handled so far: `{"task_id", "payload", "received_at"}`.
    pub fn received(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        // Only complete lines: the task may be writing one right now.
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).expect("task output line is JSON"))
            .collect()
    }

    /// Waits until the task handled at least `n` callbacks, then returns them all.
    pub async fn wait_received(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let start = Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < timeout,
                "python worker handled {} of {n} callbacks in {timeout:?}; log:\n{}",
                got.len(),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks for Celery's warm shutdown (SIGTERM: finish the task in hand) and waits for exit.
    pub async fn stop(mut self, timeout: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Drop kills it.
    }

    /// SIGKILL: the worker dies with whatever it holds unacked.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PythonWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Publishes each payload (one JSON document each) with Python's
/// `app.send_task(task, args=[payload], queue=queue)`; returns the task ids, in order.
pub fn send_task(
    venv: &Path,
    broker_url: &str,
    queue: &str,
    task: &str,
    payloads: &[String],
) -> Vec<String> {
    let mut child = Command::new(venv.join("bin/python"))
        .current_dir(celery_dir())
        .args(["send.py", "--queue", queue, "--task", task, "-"])
        .env("CELERY_BROKER_URL", broker_url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send.py");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for p in payloads {
            // One document per line: compact it, the fixtures are pretty-printed.
            let v: serde_json::Value = serde_json::from_str(p).expect("payload is JSON");
            writeln!(stdin, "{v}").expect("write payload");
        }
    }
    let out = child.wait_with_output().expect("send.py runs");
    assert!(
        out.status.success(),
        "send.py failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), payloads.len(), "one task id per payload");
    ids
}

/// POSTs `opened(tag, 0..n)` to the app from ten concurrent clients; each must get 202.
pub async fn post_many(app: &super::app::TestApp, tag: &str, n: usize) {
    let mut posts = tokio::task::JoinSet::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(n.div_ceil(10).max(1)) {
        let client = app.client.clone();
        let url = app.url("/email");
        let bodies: Vec<String> = chunk.iter().map(|&i| super::opened(tag, i)).collect();
        posts.spawn(async move {
            for b in bodies {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(b)
                    .send()
                    .await
                    .expect("sent");
                assert_eq!(r.status(), 202);
            }
        });
    }
    while let Some(r) = posts.join_next().await {
        r.expect("poster");
    }
}

/// Checks that every one of `n` callbacks (`opened(tag, 0..n)`) sent to a queue shared by a
/// Python worker (its output `lines`) and a mailhook worker (rows in `store`) was handled exactly
/// once in total, and that both took part. Returns the ids the Python worker handled.
pub async fn assert_shared_exactly_once(
    lines: &[serde_json::Value],
    store: &std::sync::Arc<dyn mailhook::store::Store>,
    tag: &str,
    n: usize,
) -> Vec<String> {
    let py_ids: Vec<String> = lines
        .iter()
        .map(|l| {
            l["payload"]["messageId"]
                .as_str()
                .expect("messageId")
                .to_owned()
        })
        .collect();
    let py_set: std::collections::HashSet<&String> = py_ids.iter().collect();
    assert_eq!(py_set.len(), py_ids.len(), "python handled none twice");
    let rows = store.count().await.expect("count");
    assert_eq!(
        py_ids.len() + rows as usize,
        n,
        "handled exactly once in total"
    );
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let stored = store.by_id_externo(&id).await.expect("by id").len();
        let expected = usize::from(!py_set.contains(&id));
        assert_eq!(
            stored,
            expected,
            "{id}: stored {stored}, handled by python: {}",
            expected == 0
        );
    }
    assert!(!py_ids.is_empty(), "the Python worker took part");
    assert!(rows > 0, "the mailhook worker took part");
    eprintln!("python handled {}, mailhook stored {rows}", py_ids.len());
    py_ids
}

/// Posts every example to mailhook's API; the Python worker `py` must handle exactly those
/// payloads, each once, intact, with the API's receive time as `received_at`.
pub async fn python_receives_the_examples(app: &super::app::TestApp, py: &PythonWorker) {
    let before = chrono::Utc::now();
    let mut sent: std::collections::HashMap<String, serde_json::Value> = Default::default();
    for name in super::EXAMPLES {
        let body = super::example(name);
        let r = app.post(body.clone()).await;
        assert_eq!(r.status(), 202, "{name}");
        let answer: serde_json::Value = r.json().await.expect("json answer");
        let id = answer["task_id"].as_str().expect("task id").to_owned();
        sent.insert(id, serde_json::from_str(&body).expect("example is JSON"));
    }
    let after = chrono::Utc::now();
    let got = py.wait_received(sent.len(), Duration::from_secs(60)).await;
    assert_eq!(got.len(), sent.len(), "each callback handled once");
    for line in &got {
        let id = line["task_id"].as_str().expect("task id");
        let want = sent
            .get(id)
            .unwrap_or_else(|| panic!("unknown task id {id}"));
        assert_eq!(&line["payload"], want, "payload of {id} arrives intact");
        let at = line["received_at"].as_str().expect("received_at is sent");
        let at = chrono::DateTime::parse_from_rfc3339(at).expect("received_at is RFC 3339");
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
}

/// Sends every example with Python's `send_task(..., queue=queue)`; mailhook's worker in `app`
/// must store the rows the pure normalizer makes of them, and only those. Returns the row count.
pub async fn mailhook_stores_the_examples(
    app: &super::app::TestApp,
    venv: &Path,
    broker_url: &str,
    queue: &str,
) -> usize {
    let payloads: Vec<String> = super::EXAMPLES.iter().map(|n| super::example(n)).collect();
    let mut expected = Vec::new();
    for p in &payloads {
        let v: Box<serde_json::value::RawValue> = serde_json::from_str(p).expect("example is JSON");
        expected.extend(
            mailhook::infobip::normalize(&v, chrono::Utc::now()).expect("example is valid"),
        );
    }
    let before = chrono::Utc::now();
    let task = mailhook::config::DEFAULT_TASK;
    let ids = send_task(venv, broker_url, queue, task, &payloads);
    assert_eq!(ids.len(), payloads.len());
    super::wait_for_rows(&app.store, expected.len() as i64).await;
    for want in &expected {
        let rows = app
            .store
            .by_id_externo(&want.id_externo)
            .await
            .expect("by id");
        let row = rows
            .iter()
            .find(|r| r.callback.status == want.status && r.callback.event_at == want.event_at)
            .unwrap_or_else(|| panic!("no row {} {}: {rows:?}", want.id_externo, want.status));
        assert_eq!(row.callback.email, want.email, "{}", want.id_externo);
        assert_eq!(
            row.callback.qj_contact_id, want.qj_contact_id,
            "{}",
            want.id_externo
        );
        // Python sends no received_at: the worker's clock stands in.
        assert!(row.callback.data_recebimento >= before - chrono::Duration::seconds(1));
    }
    expected.len()
}
