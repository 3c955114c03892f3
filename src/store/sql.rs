//! SQLite, PostgreSQL and MySQL/MariaDB stores. The SQL is the same but for placeholders, JSON
//! casts and the upsert clause, which sqlx's `QueryBuilder` and per-backend literals take care of;
//! a macro writes every impl so they cannot drift apart.

use async_trait::async_trait;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{
    Connection, Executor, MySql, MySqlPool, PgPool, Postgres, QueryBuilder, Sqlite, SqlitePool,
};

use super::{Store, StoreError, StoredCallback};
use crate::infobip::NewCallback;
use crate::sqlite::{connect_options, file_of, Checkpointer};

/// Rows per INSERT statement: 18 parameters each stays under both databases' limits.
const CHUNK: usize = 1000;
/// How long a failed batch's ROLLBACK may take before its connection is closed regardless.
const ROLLBACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

macro_rules! columns {
    () => {
        "email_callback (status, email, data_recebimento, id_externo, qj_contact_id, event_at, \
         status_name, error_name, error_permanent, bulk_id, event_id, url, country, city, \
         callback_data, raw, dedupe_key) "
    };
}

/// `email_callback` in a SQLite file (WAL, `synchronous=FULL`).
pub struct SqliteStore {
    pool: SqlitePool,
    _checkpointer: Checkpointer,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let opts = connect_options(url)?;
        let open = |source| StoreError::Open {
            path: file_of(&opts),
            source,
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(opts.clone())
            .await
            .map_err(open)?;
        let checkpointer = Checkpointer::start(&opts).await.map_err(open)?;
        Ok(SqliteStore {
            pool,
            _checkpointer: checkpointer,
        })
    }
}

/// `email_callback` in PostgreSQL.
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to PostgreSQL.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        // One plain connection first: the pool retries a refused connection until its acquire
        // timeout and then reports only that it timed out; start-up wants the cause at once.
        sqlx::PgConnection::connect(url).await?.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(PostgresStore { pool })
    }
}

/// `email_callback` in MySQL or MariaDB.
pub struct MySqlStore {
    pool: MySqlPool,
}

impl MySqlStore {
    /// Connects to MySQL/MariaDB.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        // As for PostgreSQL: the cause of a failure at once, not the pool's timeout.
        sqlx::MySqlConnection::connect(url).await?.close().await?;
        let pool = MySqlPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(MySqlStore { pool })
    }
}

/// PostgreSQL `jsonb` refuses the escape `\u0000`; it becomes `\ufffd`. Only real escapes are
/// touched: in `\\u0000` (an escaped backslash, then text) nothing changes.
fn pg_json(text: &str) -> String {
    if !text.contains("\\u0000") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let esc = &rest[i..];
        if let Some(after) = esc.strip_prefix("\\u0000") {
            out.push_str("\\ufffd");
            rest = after;
        } else {
            // A backslash and the character it escapes, copied as they are.
            let n = esc[1..].chars().next().map_or(1, |c| 1 + c.len_utf8());
            out.push_str(&esc[..n]);
            rest = &esc[n..];
        }
    }
    out.push_str(rest);
    out
}

/// Arguments: the store, its sqlx database, migrations folder, the clause that skips a duplicate
/// `dedupe_key`, a cast for JSON parameters, the opening and closing of an expression reading a
/// JSON column as text, and a function preparing JSON text for the column.
macro_rules! sql_store {
    ($store:ty, $db:ty, $migrations:literal, $on_conflict:literal, $json_cast:literal,
     $read_open:literal, $read_close:literal, $json:expr) => {
        impl $store {
            /// BEGIN, the inserts, COMMIT: how many rows were new (see [`Store::insert_batch`]).
            async fn insert_in_transaction(
                conn: &mut sqlx::pool::PoolConnection<$db>,
                rows: &[NewCallback],
            ) -> Result<u64, sqlx::Error> {
                let json: fn(&str) -> String = $json;
                (&mut **conn).execute("BEGIN").await?;
                let mut inserted = 0;
                for chunk in rows.chunks(CHUNK) {
                    let mut q = QueryBuilder::<$db>::new(concat!("INSERT INTO ", columns!()));
                    q.push_values(chunk, |mut b, r| {
                        b.push_bind(&r.status)
                            .push_bind(&r.email)
                            .push_bind(r.data_recebimento)
                            .push_bind(&r.id_externo)
                            .push_bind(r.qj_contact_id)
                            .push_bind(r.event_at)
                            .push_bind(&r.status_name)
                            .push_bind(&r.error_name)
                            .push_bind(r.error_permanent)
                            .push_bind(&r.bulk_id)
                            .push_bind(&r.event_id)
                            .push_bind(&r.url)
                            .push_bind(&r.country)
                            .push_bind(&r.city)
                            .push_bind(r.callback_data.as_deref().map(json))
                            .push_unseparated($json_cast)
                            .push_bind(json(&r.raw))
                            .push_unseparated($json_cast)
                            .push_bind(&r.dedupe_key);
                    });
                    q.push($on_conflict);
                    inserted += q.build().execute(&mut **conn).await?.rows_affected();
                }
                (&mut **conn).execute("COMMIT").await?;
                Ok(inserted)
            }
        }

        #[async_trait]
        impl Store for $store {
            async fn migrate(&self) -> Result<(), StoreError> {
                sqlx::migrate!($migrations).run(&self.pool).await?;
                Ok(())
            }

            async fn insert_batch(&self, rows: &[NewCallback]) -> Result<u64, StoreError> {
                if rows.is_empty() {
                    return Ok(0);
                }
                // The transaction is ours, not sqlx's `Transaction`: when its COMMIT fails,
                // sqlx hands the connection back to the pool, and SQLite keeps a transaction
                // open after a COMMIT that failed with SQLITE_FULL (so that it can be
                // retried); the next batches on that connection were then answered
                // "inserted", acked, and rolled back with it. Here a connection that failed
                // anywhere is rolled back and closed, never reused.
                let mut conn = self.pool.acquire().await?;
                let result = Self::insert_in_transaction(&mut conn, rows).await;
                if result.is_err() {
                    // Bounded: a connection that hangs is closed all the same.
                    let _ = tokio::time::timeout(ROLLBACK_TIMEOUT, conn.execute("ROLLBACK")).await;
                    conn.close_on_drop();
                }
                Ok(result?)
            }

            async fn by_id_externo(
                &self,
                id_externo: &str,
            ) -> Result<Vec<StoredCallback>, StoreError> {
                let mut q = QueryBuilder::<$db>::new(concat!(
                    "SELECT id, status, email, data_recebimento, id_externo, qj_contact_id, ",
                    "event_at, status_name, error_name, error_permanent, bulk_id, event_id, url, ",
                    "country, city, ",
                    $read_open,
                    "callback_data",
                    $read_close,
                    " AS callback_data, ",
                    $read_open,
                    "raw",
                    $read_close,
                    " AS raw, dedupe_key FROM email_callback WHERE id_externo = "
                ));
                q.push_bind(id_externo).push(" ORDER BY id");
                Ok(q.build_query_as().fetch_all(&self.pool).await?)
            }

            async fn count(&self) -> Result<i64, StoreError> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM email_callback")
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
        }
    };
}

sql_store!(
    SqliteStore,
    Sqlite,
    "migrations/sqlite",
    " ON CONFLICT (id_externo, dedupe_key) DO NOTHING",
    "",
    "",
    "",
    |s| s.to_owned()
);
sql_store!(
    PostgresStore,
    Postgres,
    "migrations/postgres",
    " ON CONFLICT (id_externo, dedupe_key) DO NOTHING",
    "::jsonb",
    "",
    "::text",
    pg_json
);
// MySQL has no ON CONFLICT; INSERT IGNORE would also turn data errors into silent warnings,
// so it is a no-op update on the duplicate key.
sql_store!(
    MySqlStore,
    MySql,
    "migrations/mysql",
    " ON DUPLICATE KEY UPDATE id = id",
    "",
    "CAST(",
    " AS CHAR)",
    |s| s.to_owned()
);

#[cfg(test)]
mod tests {
    use super::pg_json;

    #[test]
    fn only_real_nul_escapes_are_replaced() {
        assert_eq!(pg_json(r#"{"a":"x\u0000y"}"#), r#"{"a":"x\ufffdy"}"#);
        assert_eq!(pg_json(r#"{"a":"x\\u0000y"}"#), r#"{"a":"x\\u0000y"}"#);
        assert_eq!(pg_json(r#"{"a":"\\\u0000"}"#), r#"{"a":"\\\ufffd"}"#);
        assert_eq!(pg_json(r#"{"a":"é\"\u0000"}"#), r#"{"a":"é\"\ufffd"}"#);
        assert_eq!(pg_json("plain"), "plain");
    }
}
