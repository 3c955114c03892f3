//! Fresh, uniquely named PostgreSQL and MariaDB databases, one per test.

/// PostgreSQL server used by tests (`MAILHOOK_TEST_POSTGRES`, default the local trust-auth one).
pub const PG_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// MySQL/MariaDB server used by tests (`MAILHOOK_TEST_MYSQL`, default the local root account).
pub const MYSQL_DEFAULT: &str = "mysql://root@127.0.0.1:3306/test";

/// The PostgreSQL server's admin URL.
pub fn pg_admin_url() -> String {
    std::env::var("MAILHOOK_TEST_POSTGRES").unwrap_or_else(|_| PG_DEFAULT.into())
}

/// Creates a fresh, uniquely named PostgreSQL database and returns its URL; `None` (skip) when
/// PostgreSQL is absent outside CI.
pub async fn pg_database() -> Option<String> {
    fresh_database::<sqlx::PgConnection>("PostgreSQL", "MAILHOOK_TEST_POSTGRES", PG_DEFAULT).await
}

/// Creates a fresh MySQL/MariaDB database and returns its URL; `None` (skip) when the server is
/// absent outside CI.
pub async fn mysql_database() -> Option<String> {
    fresh_database::<sqlx::MySqlConnection>("MariaDB", "MAILHOOK_TEST_MYSQL", MYSQL_DEFAULT).await
}

/// Creates `mailhook_test_<uuid>` on the server behind `env` (or `default`) and returns its URL.
async fn fresh_database<C>(service: &str, env: &str, default: &str) -> Option<String>
where
    C: sqlx::Connection,
    for<'c> &'c mut C: sqlx::Executor<'c>,
{
    let admin = super::require_service(service, env, default).await?;
    let name = format!("mailhook_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = C::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("connect to {service}: {e}"));
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}
