//! The storage seam: one [`Store`] trait, one implementation per database.

mod sql;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use thiserror::Error;

use crate::infobip::NewCallback;

pub use sql::{MySqlStore, PostgresStore, SqliteStore};

/// Errors from the database.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database failed or could not be reached; retrying later may succeed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The SQLite file cannot be opened (a read-only or missing directory, ...).
    #[error("cannot open the database file {}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: sqlx::Error,
    },
    /// Migrations could not be applied.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The URL names no database we support (only the scheme is kept: URLs carry passwords).
    #[error(
        "unsupported DATABASE_URL scheme `{0}://`: expected sqlite://, postgres:// or mysql://"
    )]
    UnsupportedUrl(String),
}

impl StoreError {
    /// True when the database refused this data: retrying the same rows cannot help, while
    /// other rows may go through (so a batch is split, and a message whose rows keep being
    /// refused ends in the dead letters). Anything else is an outage, over when the fault is:
    /// the database unreachable, restarting, out of disk space (SQLite SQLITE_FULL, PostgreSQL
    /// class 53, MySQL "table is full" / error 28), read-only, failing I/O, or missing its
    /// table. Rows waiting for an outage to end are never dead-lettered for it.
    pub fn is_data_error(&self) -> bool {
        let StoreError::Database(e) = self else {
            return false;
        };
        if crate::sqlite::is_data_error(e) {
            return true;
        }
        let sqlx::Error::Database(db) = e else {
            return false;
        };
        if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
            // Refused values whose SQLSTATE is the generic HY000: an invalid character string
            // (1366, 1300), a row too large (1118), a statement over max_allowed_packet (1153,
            // 1301: one message alone may still fit).
            if matches!(my.number(), 1366 | 1300 | 1118 | 1153 | 1301) {
                return true;
            }
        } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            return false;
        }
        // SQLSTATE (PostgreSQL, and MySQL's mapping): data exceptions (22), integrity
        // constraints (23), program limits such as an index row too large (54).
        db.code()
            .is_some_and(|c| c.len() == 5 && ["22", "23", "54"].contains(&&c[..2]))
    }
}

/// A stored `email_callback` row, as read back: its id, and the columns as `insert_batch`
/// wrote them (the database may reformat the JSON text of `callback_data` and `raw`).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCallback {
    /// Row id.
    pub id: i64,
    /// Every other column.
    pub callback: NewCallback,
}

/// Read by column name, on every database sqlx decodes these column types on.
impl<'r, R> sqlx::FromRow<'r, R> for StoredCallback
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    DateTime<Utc>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        Ok(StoredCallback {
            id: row.try_get("id")?,
            callback: NewCallback {
                status: row.try_get("status")?,
                email: row.try_get("email")?,
                data_recebimento: row.try_get("data_recebimento")?,
                id_externo: row.try_get("id_externo")?,
                qj_contact_id: row.try_get("qj_contact_id")?,
                event_at: row.try_get("event_at")?,
                status_name: row.try_get("status_name")?,
                error_name: row.try_get("error_name")?,
                error_permanent: row.try_get("error_permanent")?,
                bulk_id: row.try_get("bulk_id")?,
                event_id: row.try_get("event_id")?,
                url: row.try_get("url")?,
                country: row.try_get("country")?,
                city: row.try_get("city")?,
                callback_data: row.try_get("callback_data")?,
                raw: row.try_get("raw")?,
                dedupe_key: row.try_get("dedupe_key")?,
            },
        })
    }
}

/// Where `email_callback` rows live.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Inserts all rows in one transaction, skipping events already stored (same `dedupe_key`).
    /// Returns how many rows were new; MySQL reports matched rows instead (duplicates included),
    /// because its protocol's FOUND_ROWS flag, which sqlx sets, counts a no-op upsert as a match.
    async fn insert_batch(&self, rows: &[NewCallback]) -> Result<u64, StoreError>;
    /// Rows of one Infobip message, oldest first.
    async fn by_id_externo(&self, id_externo: &str) -> Result<Vec<StoredCallback>, StoreError>;
    /// Number of rows in the table.
    async fn count(&self) -> Result<i64, StoreError>;
    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Opens the database named by the URL scheme (without migrating).
pub async fn connect(url: &str, max_connections: u32) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, max_connections).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(
            PostgresStore::connect(url, max_connections).await?,
        ))
    } else if url.starts_with("mysql:") {
        Ok(Arc::new(MySqlStore::connect(url, max_connections).await?))
    } else {
        Err(StoreError::UnsupportedUrl(
            url.split("://").next().unwrap_or_default().to_owned(),
        ))
    }
}
