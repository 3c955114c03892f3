//! mailhook: receives Infobip e-mail callbacks, queues them durably, stores one row per event.

pub mod infobip;
