//! One contract, every database: the same functions run against SQLite, PostgreSQL and MariaDB.

use std::sync::Arc;

use chrono::{SubsecRound, Utc};
use mailhook::infobip::{normalize, NewCallback};
use mailhook::store::{self, Store};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::Connection;

use crate::common::databases::{mysql_database, pg_database};
use crate::common::{example, EXAMPLES};

fn rows_of(name: &str) -> Vec<NewCallback> {
    let payload: Box<RawValue> = serde_json::from_str(&example(name)).expect("json");
    normalize(&payload, Utc::now()).expect("valid")
}

/// A row without what a database may rewrite: the JSON columns (compared as JSON) and the
/// receive time below the microsecond.
fn comparable(c: &NewCallback) -> NewCallback {
    NewCallback {
        data_recebimento: c.data_recebimento.trunc_subsecs(6),
        callback_data: None,
        raw: String::new(),
        ..c.clone()
    }
}

/// Every example's rows round-trip through the table column for column.
pub async fn examples_round_trip(s: Arc<dyn Store>) {
    for name in EXAMPLES {
        let rows = rows_of(name);
        assert_eq!(
            s.insert_batch(&rows).await.expect("insert"),
            rows.len() as u64,
            "{name}"
        );
        for r in &rows {
            let stored = s.by_id_externo(&r.id_externo).await.expect("read");
            let got = &stored
                .iter()
                .find(|x| x.callback.dedupe_key == r.dedupe_key)
                .unwrap_or_else(|| panic!("{name}: row {} stored", r.id_externo))
                .callback;
            assert_eq!(comparable(got), comparable(r), "{name}");
            let json = |s: &str| serde_json::from_str::<Value>(s).expect("json column");
            assert_eq!(
                got.callback_data.as_deref().map(json),
                r.callback_data.as_deref().map(json)
            );
            assert_eq!(json(&got.raw), json(&r.raw));
        }
    }
    assert_eq!(s.count().await.expect("count"), 12);
}

/// Inserting the same events again adds nothing, even all of them in one batch.
/// `exact` is false for MySQL, whose insert count includes matched duplicates.
pub async fn insert_is_idempotent(s: Arc<dyn Store>, exact: bool) {
    let rows = rows_of("delivered-dict");
    assert_eq!(s.insert_batch(&rows).await.expect("insert"), 5);
    let again = s.insert_batch(&rows).await.expect("again");
    assert_eq!(s.count().await.expect("count"), 5);
    let mut mixed = rows_of("opened");
    mixed.extend(rows.clone());
    mixed.extend(rows_of("opened"));
    let new = s.insert_batch(&mixed).await.expect("mixed");
    assert_eq!(s.count().await.expect("count"), 6);
    if exact {
        assert_eq!((again, new), (0, 1));
    }
}

/// A batch larger than one statement's parameter limit goes in whole.
pub async fn large_batch(s: Arc<dyn Store>) {
    let base = rows_of("delivered").remove(0);
    let rows: Vec<_> = (0..4500)
        .map(|i| {
            let mut r = base.clone();
            r.id_externo = format!("m-{i}");
            r.dedupe_key = format!("k-{i}");
            r
        })
        .collect();
    assert_eq!(s.insert_batch(&rows).await.expect("insert"), 4500);
    assert_eq!(s.count().await.expect("count"), 4500);
}

/// Text that PostgreSQL is picky about (NUL escapes, astral characters) is stored.
pub async fn awkward_text(s: Arc<dyn Store>) {
    let payload = serde_json::value::to_raw_value(&serde_json::json!({
        "notificationType": "OPENED", "messageId": "nul", "recipient": "a\u{0}b@x.y",
        "callbackData": "{\"qj_contact_id\": \"5\", \"s\": \"\\u0000 🎁\"}"
    }))
    .expect("JSON");
    let rows = normalize(&payload, Utc::now()).expect("valid");
    assert_eq!(s.insert_batch(&rows).await.expect("insert"), 1);
    let got = s.by_id_externo("nul").await.expect("read");
    assert_eq!(got[0].callback.qj_contact_id, Some(5));
    assert!(got[0]
        .callback
        .callback_data
        .as_deref()
        .is_some_and(|c| c.contains('🎁')));
}

/// The row that [`old_schema`] writes before upgrading: an event as normalize makes it.
fn old_row() -> NewCallback {
    rows_of("opened").remove(0)
}

/// Copies the first migration of `db`'s folder alone, to build the table as 0.1 shipped it.
fn first_migration(db: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(db);
    std::fs::copy(
        src.join("0001_email_callback.sql"),
        dir.path().join("0001_email_callback.sql"),
    )
    .expect("copy migration");
    dir
}

/// SQL inserting [`old_row`] into the first schema, with literals every database reads.
fn old_insert() -> String {
    let r = old_row();
    format!(
        "INSERT INTO email_callback (status, data_recebimento, id_externo, raw, dedupe_key) \
         VALUES ('{}', '2024-01-01 00:00:00', '{}', '{{}}', '{}')",
        r.status, r.id_externo, r.dedupe_key
    )
}

/// A table created and filled by the first migration keeps its rows through the later ones,
/// and still refuses their duplicates. `exact` as in [`insert_is_idempotent`].
pub async fn upgrade_keeps_rows(s: Arc<dyn Store>, exact: bool) {
    s.migrate().await.expect("upgrade");
    assert_eq!(s.count().await.expect("count"), 1);
    let r = old_row();
    let inserted = s
        .insert_batch(std::slice::from_ref(&r))
        .await
        .expect("insert");
    assert_eq!(
        s.count().await.expect("count"),
        1,
        "the duplicate was refused"
    );
    if exact {
        assert_eq!(inserted, 0);
    }
    let got = s.by_id_externo(&r.id_externo).await.expect("read");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].callback.dedupe_key, r.dedupe_key);
    let mut other = r.clone();
    other.dedupe_key = "another event".to_owned();
    s.insert_batch(&[other]).await.expect("insert");
    assert_eq!(s.count().await.expect("count"), 2);
}

/// Opens a connection with `$connect`, builds the table with the first migration of `$db` alone,
/// inserts [`old_row`] and closes.
macro_rules! fill_first_schema {
    ($connect:expr, $db:literal) => {{
        let mut conn = $connect.await.expect($db);
        let old = first_migration($db);
        let m = sqlx::migrate::Migrator::new(old.path())
            .await
            .expect("read");
        m.run(&mut conn).await.expect("old migrate");
        sqlx::raw_sql(&old_insert())
            .execute(&mut conn)
            .await
            .expect("old insert");
        conn.close().await.expect("close");
    }};
}

/// A store for one test, with the temp dir its SQLite file lives in (removed when dropped).
pub struct TestStore {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

impl TestStore {
    fn new(store: Arc<dyn Store>) -> Option<Self> {
        Some(TestStore { store, _dir: None })
    }
}

/// A temp dir and the URL of a SQLite file in it.
fn sqlite_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    (dir, url)
}

macro_rules! store_suite {
    ($make:path, $make_old:path, $exact:expr) => {
        #[tokio::test]
        async fn upgrade_keeps_rows() {
            let Some(s) = $make_old().await else { return };
            super::upgrade_keeps_rows(s.store.clone(), $exact).await;
        }
        #[tokio::test]
        async fn examples_round_trip() {
            let Some(s) = $make().await else { return };
            super::examples_round_trip(s.store.clone()).await;
        }
        #[tokio::test]
        async fn insert_is_idempotent() {
            let Some(s) = $make().await else { return };
            super::insert_is_idempotent(s.store.clone(), $exact).await;
        }
        #[tokio::test]
        async fn large_batch() {
            let Some(s) = $make().await else { return };
            super::large_batch(s.store.clone()).await;
        }
        #[tokio::test]
        async fn awkward_text() {
            let Some(s) = $make().await else { return };
            super::awkward_text(s.store.clone()).await;
        }
    };
}

mod sqlite {
    use super::*;

    async fn make() -> Option<TestStore> {
        let (dir, url) = sqlite_file();
        let store = store::connect(&url, 2).await.expect("sqlite");
        store.migrate().await.expect("migrate");
        Some(TestStore {
            store,
            _dir: Some(dir),
        })
    }

    async fn make_old() -> Option<TestStore> {
        let (dir, url) = sqlite_file();
        let opts = mailhook::sqlite::connect_options(&url).expect("url");
        fill_first_schema!(sqlx::SqliteConnection::connect_with(&opts), "sqlite");
        Some(TestStore {
            store: store::connect(&url, 2).await.expect("sqlite"),
            _dir: Some(dir),
        })
    }

    store_suite!(make, make_old, true);
}

mod postgres {
    use super::*;

    async fn make() -> Option<TestStore> {
        let url = pg_database().await?;
        let s = store::connect(&url, 2).await.expect("postgres");
        s.migrate().await.expect("migrate");
        TestStore::new(s)
    }

    async fn make_old() -> Option<TestStore> {
        let url = pg_database().await?;
        fill_first_schema!(sqlx::PgConnection::connect(&url), "postgres");
        TestStore::new(store::connect(&url, 2).await.expect("postgres"))
    }

    store_suite!(make, make_old, true);
}

mod mysql {
    use super::*;

    async fn make() -> Option<TestStore> {
        let url = mysql_database().await?;
        let s = store::connect(&url, 2).await.expect("mysql");
        s.migrate().await.expect("migrate");
        TestStore::new(s)
    }

    async fn make_old() -> Option<TestStore> {
        let url = mysql_database().await?;
        fill_first_schema!(sqlx::MySqlConnection::connect(&url), "mysql");
        TestStore::new(store::connect(&url, 2).await.expect("mysql"))
    }

    store_suite!(make, make_old, false);
}
