//! mailhook: receives Infobip e-mail callbacks, queues them durably, stores one row per event.
//!
//! `infobip` is the pure payload logic; `queue` and `store` are the two I/O seams, each a trait
//! with one implementation per backend; `http` and `worker` sit on top; `app` wires them.

pub mod app;
pub mod config;
pub mod http;
pub mod infobip;
pub mod queue;
pub mod store;
pub mod worker;
