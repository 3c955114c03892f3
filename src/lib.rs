//! mailhook: receives Infobip e-mail callbacks, queues them durably, stores one row per event.
//!
//! `infobip` is the pure payload logic; `queue` and `store` are the two I/O seams, each a trait
//! with one implementation per backend (the queue's shared policy in `queue::Broker`); `http`
//! and `worker` sit on top; `app` wires them from `config`. `json` (the lazy JSON reader),
//! `sqlite` (SQLite settings shared by the queue and the store) and `secret` (credentials) are
//! leaves. Each module imports only from those below it (README, Layout).

pub mod app;
pub mod config;
pub mod health;
pub mod http;
pub mod infobip;
pub mod json;
pub mod queue;
pub mod secret;
pub mod sqlite;
pub mod store;
pub mod worker;
