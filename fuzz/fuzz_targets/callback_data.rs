//! Arbitrary text through the `callbackData` decoder (JSON, else Python literal), `contact_id`
//! and `read` (what a row stores). Nothing may panic; text that is JSON decodes to exactly that
//! JSON; what we store reads back as what we decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
// The pure core compiled on its own (see normalize.rs).
#[allow(dead_code)]
#[path = "../../src/infobip/mod.rs"]
mod infobip;
// The JSON reader the core reads payloads with (a leaf module of its own).
#[allow(dead_code)]
#[path = "../../src/json.rs"]
mod json;

use infobip::callback_data;
use serde_json::Value;

fuzz_target!(|text: &str| {
    let decoded = callback_data::decode(text);
    if let Some(v) = &decoded {
        // Whatever we decode, we may store as JSON text: it must read back the same.
        let stored = v.to_string();
        let back: Value = serde_json::from_str(&stored).expect("decoded value serializes to JSON");
        assert_eq!(&back, v, "stored callbackData reads back unchanged");
        assert_eq!(
            callback_data::decode(&stored).as_ref(),
            Some(v),
            "decode is idempotent"
        );
    }
    if let Ok(json) = serde_json::from_str::<Value>(text.trim()) {
        assert_eq!(
            decoded.as_ref(),
            Some(&json),
            "JSON text decodes as that JSON"
        );
        let again = serde_json::to_string(&json).expect("serializes");
        assert_eq!(
            callback_data::decode(&again),
            Some(json),
            "JSON round trips"
        );
    }
    // The row's fast path must agree with decode + contact_id.
    let read = callback_data::read(text);
    assert_eq!(read.is_some(), decoded.is_some(), "read and decode agree");
    if let (Some(r), Some(v)) = (&read, &decoded) {
        assert_eq!(r.contact_id, callback_data::contact_id(v));
        let stored: Value = serde_json::from_str(&r.json).expect("read gives JSON text");
        assert_eq!(&stored, v, "the stored text is the decoded value");
    }
});
