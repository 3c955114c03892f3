//! Start-up failures are clear and alike on every backend: within a second the log says what
//! the process waits for, it retries until `--startup-timeout`, then exits non-zero naming what
//! it gave up on (a path for SQLite, a URL without its password for servers).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::binary;
use crate::common::process::free_port;
use crate::common::tmpfs::Tmpfs;

/// What a start-up attempt did: when its first line came, its output, its exit and when.
struct Outcome {
    first_line_after: Option<Duration>,
    output: String,
    success: bool,
    exited_after: Duration,
}

/// Runs `mailhook serve --startup-timeout SECS` in `dir` with `env`, until it exits.
fn run_serve(dir: &std::path::Path, env: &[(&str, String)], secs: u64) -> Outcome {
    let started = Instant::now();
    let mut cmd = Command::new(binary());
    cmd.args(["serve", "--startup-timeout", &secs.to_string()])
        .current_dir(dir)
        .env_remove("BROKER_URL")
        .env_remove("CELERY_BROKER_URL")
        .env("MAILHOOK_BIND", format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn mailhook");
    let lines: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ]
    .into_iter()
    .map(|pipe| {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().expect("lock").push((started.elapsed(), line));
            }
        })
    })
    .collect();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > Duration::from_secs(secs + 30) {
            let _ = child.kill();
            panic!("mailhook still running {secs} s past its start-up deadline");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let exited_after = started.elapsed();
    for r in readers {
        r.join().expect("reader");
    }
    let lines = lines.lock().expect("lock");
    Outcome {
        first_line_after: lines.iter().map(|(t, _)| *t).min(),
        output: lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        success: status.success(),
        exited_after,
    }
}

#[test]
fn every_backend_out_of_reach_is_waited_for_then_named() {
    let dir = tempfile::tempdir().expect("dir");
    let sqlite = format!("sqlite://{}", dir.path().join("mailhook.db").display());
    let cases = [
        (
            "Redis",
            "BROKER_URL",
            format!("redis://127.0.0.1:{}/0", free_port()),
        ),
        (
            "RabbitMQ",
            "BROKER_URL",
            format!("amqp://guest:hunter2@127.0.0.1:{}/%2f", free_port()),
        ),
        (
            "PostgreSQL",
            "DATABASE_URL",
            format!("postgres://postgres:hunter2@127.0.0.1:{}/x", free_port()),
        ),
        (
            "MariaDB",
            "DATABASE_URL",
            format!("mysql://root:hunter2@127.0.0.1:{}/x", free_port()),
        ),
    ];
    let runs: Vec<_> = cases
        .into_iter()
        .map(|(name, var, url)| {
            let dir = dir.path().to_owned();
            let sqlite = sqlite.clone();
            std::thread::spawn(move || {
                let mut env = vec![(var, url.clone())];
                if var == "BROKER_URL" {
                    env.push(("DATABASE_URL", sqlite));
                }
                (name, url, run_serve(&dir, &env, 3))
            })
        })
        .collect();
    for run in runs {
        let (name, url, o) = run.join().expect("run");
        let out = &o.output;
        assert!(!o.success, "{name}: exits non-zero\n{out}");
        let first = o.first_line_after.expect("something logged");
        assert!(
            first < Duration::from_millis(1500),
            "{name}: first line after {first:?}\n{out}"
        );
        assert!(
            out.contains("waiting_for") || out.contains("cannot start yet"),
            "{name}: says what it waits for\n{out}"
        );
        assert!(
            o.exited_after >= Duration::from_secs(2) && o.exited_after < Duration::from_secs(10),
            "{name}: retried until the deadline, then exited ({:?})\n{out}",
            o.exited_after
        );
        let shown = url
            .replace(":hunter2@", ":***@")
            .replacen("://guest:***", "://***", 1);
        assert!(out.contains("gave up after"), "{name}\n{out}");
        assert!(!out.contains("hunter2"), "{name}: no password shown\n{out}");
        let host = url.split('@').next_back().unwrap_or(&url);
        assert!(out.contains(host), "{name}: names {shown}\n{out}");
    }
}

#[test]
fn a_read_only_directory_is_named() {
    let Some(fs) = Tmpfs::mount("1m", None) else {
        return;
    };
    fs.read_only();
    let o = run_serve(
        fs.path(),
        &[("DATABASE_URL", "sqlite://mailhook.db".into())],
        2,
    );
    let out = &o.output;
    assert!(!o.success, "{out}");
    let path = fs.path().join("mailhook.db");
    assert!(
        out.contains(&path.display().to_string()),
        "names {}\n{out}",
        path.display()
    );
    assert!(out.contains("unable to open database file"), "{out}");
    assert!(out.contains("gave up after"), "{out}");
}
