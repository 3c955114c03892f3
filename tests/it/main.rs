//! The integration tests, as one binary: the crate and its dependencies are linked once, not
//! once per file. `cargo test --test it <filter>` runs a part, e.g. `queue_contract::redis`.
//!
//! Every test starts the real thing (the app on port 0, real SQLite, PostgreSQL, MariaDB,
//! Redis, RabbitMQ and Python Celery) on its own files, database or queue name, so tests run in
//! parallel; a service that is absent is skipped locally and fails the run under `CI=true`.

mod common;

mod auth;
mod celery_amqp;
mod celery_redis;
mod crash;
mod disk_full;
mod dlq;
mod faults;
mod ingest;
mod limits;
mod pg_faults;
mod queue_contract;
mod startup;
mod store_contract;
