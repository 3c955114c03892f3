//! The `mailhook` binary as a process of its own (for `kill -9` and for disks that fill up),
//! and senders posting callbacks to it until stopped, keeping the messageIds answered 2xx.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{binary, eventually};

/// A `mailhook` process on a free port, killed (SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub port: u16,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `mailhook ARGS` run in `dir`, on the SQLite files there (the queue beside the database),
/// listening on `port`, logging warnings to the test's stderr. Adjust it, then [`spawn`].
pub fn mailhook(dir: &Path, args: &[&str], port: u16) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .current_dir(dir)
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("mailhook.db").display()),
        )
        .env_remove("BROKER_URL")
        .env_remove("CELERY_BROKER_URL")
        .env("MAILHOOK_BIND", format!("127.0.0.1:{port}"))
        .env("MAILHOOK_VISIBILITY_TIMEOUT", "2")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

/// Starts `cmd` (from [`mailhook`]) as a process listening on `port`.
pub fn spawn(mut cmd: Command, port: u16) -> Proc {
    let child = cmd.spawn().expect("spawn mailhook");
    Proc { child, port }
}

/// Starts `mailhook ARGS` in `dir` on `port` (see [`mailhook`]).
pub fn start(dir: &Path, args: &[&str], port: u16) -> Proc {
    spawn(mailhook(dir, args, port), port)
}

/// Waits until `/health` on `port` answers 2xx.
pub async fn wait_healthy(client: &reqwest::Client, port: u16) {
    let url = format!("http://127.0.0.1:{port}/health");
    eventually(
        "mailhook to answer /health",
        Duration::from_secs(30),
        || async {
            let r = client.get(&url).send().await.ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
}

/// A callback body for a fresh id prefix, and the messageIds it carries.
pub type MakeBody = Arc<dyn Fn(&str) -> (String, Vec<String>) + Send + Sync>;

/// One OPENED event with messageId `id`.
pub fn opened_body() -> MakeBody {
    Arc::new(|id: &str| {
        let body = json!({"notificationType": "OPENED", "messageId": id,
            "recipient": "a@b.c", "sendDateTime": 1721161444325_i64});
        (body.to_string(), vec![id.to_owned()])
    })
}

/// A delivery report of `events` results, messageIds `<id>-<n>`, each with `pad` bytes of
/// callbackData: the shape and size of what Infobip posts under load.
pub fn report_body(events: usize, pad: usize) -> MakeBody {
    let data = json!({"qj_contact_id": 7, "pad": "x".repeat(pad)}).to_string();
    Arc::new(move |id: &str| {
        let ids: Vec<String> = (0..events).map(|n| format!("{id}-{n}")).collect();
        let results: Vec<_> = ids
            .iter()
            .map(|m| {
                json!({"messageId": m, "to": "a@b.c", "doneAt": "2024-08-07T08:00:00.000+0000",
                    "status": {"groupName": "DELIVERED", "name": "DELIVERED_TO_HANDSET"},
                    "callbackData": data})
            })
            .collect();
        (json!({ "results": results }).to_string(), ids)
    })
}

/// Clients posting unique callbacks until stopped, keeping the messageIds answered 2xx.
pub struct Load {
    accepted: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    clients: JoinSet<()>,
}

impl Load {
    /// Starts `clients` tasks posting one OPENED event each time to `port`; ids are
    /// `<tag>-<client>-<n>`.
    pub fn start(port: u16, clients: usize, tag: &'static str) -> Load {
        Load::start_with(port, clients, tag, opened_body())
    }

    /// Starts `clients` tasks posting `body(<tag>-<client>-<n>)` to `port`.
    pub fn start_with(port: u16, clients: usize, tag: &'static str, body: MakeBody) -> Load {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for c in 0..clients {
            let accepted = accepted.clone();
            let stop = stop.clone();
            let body = body.clone();
            tasks.spawn(async move {
                // A request never outlives a dead server by much: it fails or times out.
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client");
                let url = format!("http://127.0.0.1:{port}/email");
                let mut i = 0u64;
                while !stop.is_cancelled() {
                    let (text, ids) = body(&format!("{tag}-{c}-{i}"));
                    i += 1;
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(text)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => {
                            accepted.lock().expect("lock").extend(ids);
                        }
                        // Refused (503 while the queue cannot take it): nothing to record.
                        Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                        // The server is down (killed, restarting): do not spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            });
        }
        Load {
            accepted,
            stop,
            clients: tasks,
        }
    }

    /// How many messageIds were accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.lock().expect("lock").len()
    }

    /// Waits until at least `n` messageIds were accepted.
    pub async fn wait_accepted(&self, n: usize) {
        eventually("load to get going", Duration::from_secs(30), || async {
            (self.accepted() >= n).then_some(())
        })
        .await;
    }

    /// Stops the clients, waits until each has its last answer, and returns the accepted ids.
    pub async fn stop(mut self) -> Vec<String> {
        self.stop.cancel();
        while let Some(r) = self.clients.join_next().await {
            r.expect("load client");
        }
        let accepted = self.accepted.lock().expect("lock");
        accepted.clone()
    }
}
