//! mailhook: receives Infobip e-mail callbacks, queues them durably, stores one row per event.
//!
//! `infobip` is the pure payload logic; `queue` and `store` are the two I/O seams, each a trait
//! with one implementation per backend; `http` and `worker` sit on top; `app` wires them.
//! `json` (the lazy JSON reader) and `sqlite` (SQLite settings shared by the queue and the store)
//! are leaves that several layers use.

pub mod app;
pub mod config;
pub mod http;
pub mod infobip;
pub mod json;
pub mod queue;
pub mod secret;
pub mod sqlite;
pub mod store;
pub mod worker;
