//! SQLite settings shared by the embedded queue (`queue::sqlite`) and the store (`store`): the
//! same durability on both files, and WAL checkpoints taken off the committing connections.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Connection options for every SQLite file mailhook writes: WAL, and `synchronous=FULL` so that a
/// commit survives power loss, not only a process crash.
///
/// The rest is throughput, seen with `perf` under `bench/run.sh`'s load: statement journals
/// (multi-row upserts) in memory instead of temp files, a page cache large enough that a
/// group transaction does not spill to the WAL mid-way, and WAL checkpoints left to a
/// [`Checkpointer`] (committing connections only checkpoint as a backstop).
pub fn connect_options(url: &str) -> Result<SqliteConnectOptions, sqlx::Error> {
    Ok(SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30))
        .pragma("temp_store", "memory")
        .pragma("cache_size", "-4096")
        .pragma("wal_autocheckpoint", AUTOCHECKPOINT_BACKSTOP))
}

/// WAL pages after which a committing connection checkpoints by itself (SQLite's default is
/// 1000): reached only if the [`Checkpointer`] falls behind, and it bounds the WAL file.
const AUTOCHECKPOINT_BACKSTOP: &str = "2000";
/// How often the [`Checkpointer`] copies the WAL into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Checkpoints a WAL database from a connection of its own, so that the connections that
/// commit (the queue's writer, the store's inserts) no longer copy the WAL into the database
/// inside a commit: under load that copy was a third of the queue writer's time, and every
/// request of the group waited for it. `PASSIVE` never waits for readers or writers.
pub struct Checkpointer {
    task: tokio::task::JoinHandle<()>,
}

impl Checkpointer {
    /// Connects and starts checkpointing every [`CHECKPOINT_EVERY`]; stops when dropped.
    pub async fn start(opts: &SqliteConnectOptions) -> Result<Self, sqlx::Error> {
        // A pool of one, not a bare connection: rustc cannot yet prove a spawned future that
        // borrows a `&mut SqliteConnection` as executor `Send`.
        let conn = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await?;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = sqlx::raw_sql("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&conn)
                    .await
                {
                    tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "WAL checkpoint failed; retrying"
                    );
                }
            }
        });
        Ok(Checkpointer { task })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
