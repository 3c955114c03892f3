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
    /// True when the database refused this data (retrying the same rows cannot help), as
    /// opposed to being unreachable, busy or timing out.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => {
                // SQLite BUSY/LOCKED are transient even though they come back as database errors.
                let code = e.code();
                let busy = matches!(code.as_deref(), Some("5" | "6" | "517" | "262"));
                // PostgreSQL class 08 (connection), 40 (rollback), 53 (resources), 57 (operator
                // intervention, e.g. shutdown) are transient.
                let pg_transient = code
                    .as_deref()
                    .is_some_and(|c| c.len() == 5 && ["08", "40", "53", "57"].contains(&&c[..2]));
                !busy && !pg_transient
            }
            _ => false,
        }
    }
}

/// A stored `email_callback` row, as read back.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredCallback {
    /// Row id.
    pub id: i64,
    /// `status`.
    pub status: String,
    /// `email`.
    pub email: Option<String>,
    /// `data_recebimento` (UTC).
    pub data_recebimento: DateTime<Utc>,
    /// `id_externo`.
    pub id_externo: String,
    /// `qj_contact_id`.
    pub qj_contact_id: Option<i64>,
    /// `event_at` (UTC).
    pub event_at: Option<DateTime<Utc>>,
    /// `status_name`.
    pub status_name: Option<String>,
    /// `error_name`.
    pub error_name: Option<String>,
    /// `error_permanent`.
    pub error_permanent: Option<bool>,
    /// `bulk_id`.
    pub bulk_id: Option<String>,
    /// `event_id`.
    pub event_id: Option<String>,
    /// `url`.
    pub url: Option<String>,
    /// `country`.
    pub country: Option<String>,
    /// `city`.
    pub city: Option<String>,
    /// `callback_data` as JSON text.
    pub callback_data: Option<String>,
    /// `raw` as JSON text.
    pub raw: String,
    /// `dedupe_key`.
    pub dedupe_key: String,
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
