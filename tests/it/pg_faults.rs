//! PostgreSQL going away and coming back: callbacks keep being accepted (the queue holds them),
//! the worker retries with backoff, reconnects by itself, and stores each one once.

use std::time::Duration;

use sqlx::Connection;

use crate::common::app::{common_args, serve_args, spawn_with};
use crate::common::databases::{pg_admin_url, pg_database};
use crate::common::{eventually, example, wait_for_rows};
use crate::faults::{health, max_attempts};

#[tokio::test]
async fn database_outage_delays_but_loses_nothing() {
    let Some(db_url) = pg_database().await else {
        return;
    };
    let db_name = db_url.rsplit('/').next().expect("db name").to_owned();
    let admin_url = pg_admin_url();
    let dir = tempfile::tempdir().expect("dir");
    let queue_url = format!("sqlite://{}", dir.path().join("q.db").display());
    let common = common_args(&["--database-url", &db_url, "--broker-url", &queue_url]);
    let app = spawn_with(common, serve_args(&["--stall-after", "1"])).await;

    assert_eq!(app.post(example("delivered")).await.status(), 202);
    wait_for_rows(&app.store, 1).await;

    // "Restart" our own database: refuse new connections and kill the open ones.
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("admin");
    sqlx::query(&format!("ALTER DATABASE {db_name} ALLOW_CONNECTIONS false"))
        .execute(&mut admin)
        .await
        .expect("block");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db_name)
        .execute(&mut admin)
        .await
        .expect("terminate");

    // The API does not need the database: callbacks are still accepted.
    for name in ["opened", "clicked", "delivered-dict"] {
        assert_eq!(app.post(example(name)).await.status(), 202, "{name}");
    }
    // The worker holds its batch and retries; /health names the store's error and, past
    // --stall-after, a stalled worker, while callbacks are still accepted.
    let body = eventually("a stalled worker", Duration::from_secs(20), || async {
        let (code, body) = health(&app).await;
        (code == 200 && body["worker"].as_str()?.starts_with("stalled")).then_some(body)
    })
    .await;
    assert_eq!(body["status"], "degraded", "{body}");
    assert_ne!(body["store"], "ok", "{body}");
    // No delivery attempt is spent on the outage.
    let q_url = format!("sqlite://{}", dir.path().join("q.db").display());
    assert_eq!(max_attempts(&q_url).await, Some(1));

    sqlx::query(&format!("ALTER DATABASE {db_name} ALLOW_CONNECTIONS true"))
        .execute(&mut admin)
        .await
        .expect("unblock");
    wait_for_rows(&app.store, 8).await;
    for id in ["3nghqee2ktl9c6ta3z56", "hikah5b6b3hfqocz5bux"] {
        assert_eq!(
            app.store.by_id_externo(id).await.expect("rows").len(),
            1,
            "{id}"
        );
    }
    app.stop().await;
}
