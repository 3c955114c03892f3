//! Arbitrary bytes through the API's own steps: JSON, `parse`, then the worker's `normalize`.
//! Neither may panic, and they must agree: a payload the API accepts is one the worker can store.
#![no_main]

use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
// The pure core compiled on its own: it touches no I/O, so the fuzz build skips the rest of
// mailhook's ~300 dependencies (a fresh sanitizer build drops from ~13 min to about 1).
#[allow(dead_code)]
#[path = "../../src/infobip/mod.rs"]
mod infobip;
// The JSON reader the core reads payloads with (a leaf module of its own).
#[allow(dead_code)]
#[path = "../../src/json.rs"]
mod json;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // The API's own JSON step.
    let Ok(payload) = json::read_json(data) else {
        return;
    };
    let received_at = Utc
        .timestamp_opt(1_721_161_444, 0)
        .single()
        .expect("a fixed, valid instant");
    let parsed = infobip::parse(payload);
    let rows = infobip::normalize(payload, received_at);
    match (parsed, rows) {
        (Ok(cb), Ok(rows)) => {
            assert_eq!(cb.events.len(), rows.len(), "one row per parsed event");
            assert!(
                !rows.is_empty(),
                "an accepted callback has at least one event"
            );
            assert!(rows.len() <= infobip::MAX_RESULTS);
            for (event, row) in cb.events.iter().zip(&rows) {
                assert!(!row.status.trim().is_empty(), "status is non-empty");
                assert!(!row.id_externo.trim().is_empty(), "message id is non-empty");
                assert!(!row.status.contains('\0') && !row.id_externo.contains('\0'));
                assert_eq!(row.status, event.status().replace('\0', "\u{FFFD}"));
                assert_eq!(row.dedupe_key.len(), 64, "hex SHA-256");
                assert_eq!(row.data_recebimento, received_at);
                // The stored JSON columns are themselves valid JSON.
                assert!(serde_json::from_str::<Value>(&row.raw).is_ok());
                if let Some(cb) = &row.callback_data {
                    assert!(serde_json::from_str::<Value>(cb).is_ok());
                }
            }
            // Pure: the same input gives the same rows.
            assert_eq!(infobip::normalize(payload, received_at).ok(), Some(rows));
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "parse and normalize refuse for the same reason"),
        (p, n) => panic!("parse and normalize disagree: {p:?} vs {n:?}"),
    }
});
