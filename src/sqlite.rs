//! SQLite settings shared by the embedded queue (`queue::sqlite`) and the store (`store`): the
//! same durability on both files, WAL checkpoints taken off the committing connections, and
//! which failures are the data's and which are the disk's.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteError, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};

use crate::health::{supervise, Backoff, Part};

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
/// Longest wait between two checkpoints that fail (a full disk fails each one until it is over).
const CHECKPOINT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// True when SQLite refused a statement's data (a constraint, a value too big or of the wrong
/// type, ...): the same data fails again, other data may go through. Anything else is an
/// outage, over when the fault is: a full disk (SQLITE_FULL), I/O errors (SQLITE_IOERR and its
/// extended codes), a read-only or locked file, a file that cannot be opened, a missing table.
pub fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<SqliteError>()
            .and_then(sqlx::error::DatabaseError::code)
            .and_then(|code| code.parse::<i32>().ok())
            // Primary result codes (the low byte of extended ones): TOOBIG, CONSTRAINT,
            // MISMATCH, RANGE.
            .is_some_and(|code| matches!(code & 0xff, 18 | 19 | 20 | 25)),
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

/// The file a SQLite URL names, for messages (`sqlite://mailhook.db` -> `mailhook.db`,
/// made absolute when the working directory is known).
pub fn file_of(opts: &SqliteConnectOptions) -> std::path::PathBuf {
    let file = opts.get_filename();
    std::env::current_dir()
        .map(|cwd| cwd.join(file))
        .unwrap_or_else(|_| file.to_path_buf())
}

/// Checkpoints a WAL database from a connection of its own, so that the connections that
/// commit (the queue's writer, the store's inserts) no longer copy the WAL into the database
/// inside a commit: under load that copy was a third of the queue writer's time, and every
/// request of the group waited for it. `PASSIVE` never waits for readers or writers.
pub struct Checkpointer {
    task: tokio::task::JoinHandle<()>,
}

impl Checkpointer {
    /// Connects and starts checkpointing every [`CHECKPOINT_EVERY`]; stops when dropped. A
    /// failing checkpoint (a full disk) is retried with backoff and logged once, then in
    /// summaries, until it recovers.
    pub async fn start(opts: &SqliteConnectOptions) -> Result<Self, sqlx::Error> {
        // A pool of one, not a bare connection: rustc cannot yet prove a spawned future that
        // borrows a `&mut SqliteConnection` as executor `Send`.
        let conn = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await?;
        let part = Arc::new(Part::new(format!(
            "WAL checkpoint of {}",
            file_of(opts).display()
        )));
        let task = tokio::spawn(supervise("the WAL checkpointer", part.clone(), move || {
            let (conn, part) = (conn.clone(), part.clone());
            async move {
                let mut backoff = Backoff::new(CHECKPOINT_EVERY, CHECKPOINT_BACKOFF_MAX);
                loop {
                    let wait = match sqlx::raw_sql("PRAGMA wal_checkpoint(PASSIVE)")
                        .execute(&conn)
                        .await
                    {
                        Ok(_) => {
                            part.ok();
                            backoff.reset();
                            CHECKPOINT_EVERY
                        }
                        Err(e) => {
                            part.failed(&e);
                            backoff.next_wait()
                        }
                    };
                    tokio::time::sleep(wait).await;
                }
            }
        }));
        Ok(Checkpointer { task })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{Connection, SqliteConnection};

    /// Real SQLite errors: what a constraint refuses is the data's; a full file, a missing
    /// table are outages.
    #[tokio::test]
    async fn refused_data_is_told_apart_from_outages() {
        let mut c = SqliteConnection::connect("sqlite::memory:")
            .await
            .expect("memory db");
        sqlx::raw_sql("CREATE TABLE t (x TEXT NOT NULL UNIQUE); INSERT INTO t VALUES ('a')")
            .execute(&mut c)
            .await
            .expect("schema");
        let run = |sql: &'static str| sqlx::raw_sql(sql);
        let duplicate = run("INSERT INTO t VALUES ('a')").execute(&mut c).await;
        assert!(is_data_error(&duplicate.expect_err("unique")));
        let null = run("INSERT INTO t VALUES (NULL)").execute(&mut c).await;
        assert!(is_data_error(&null.expect_err("not null")));
        let missing = run("INSERT INTO nowhere VALUES (1)").execute(&mut c).await;
        assert!(!is_data_error(&missing.expect_err("no such table")));
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut c)
            .await
            .expect("page_count");
        sqlx::raw_sql(&format!("PRAGMA max_page_count = {pages}"))
            .execute(&mut c)
            .await
            .expect("cap");
        let full = run("INSERT INTO t VALUES (hex(randomblob(100000)))")
            .execute(&mut c)
            .await
            .expect_err("full");
        assert!(full.to_string().contains("full"), "{full}");
        assert!(!is_data_error(&full));
    }
}
