//! Provider timestamps: `doneAt` as `2024-07-16T17:26:54.966-0300` (or RFC 3339), and
//! `sendDateTime` as epoch milliseconds (a number, or a string of digits).

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde_json::value::RawValue;

use crate::json::{self, Kind};

/// Reads an Infobip event time as UTC; `None` when it is not a time we recognise.
pub fn parse_event_time(v: &RawValue) -> Option<DateTime<Utc>> {
    match json::kind(v) {
        Kind::Number => from_millis(json::as_number(v)?.as_i64()?),
        Kind::String => {
            let s = json::as_str(v)?;
            let s = s.trim();
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                return from_millis(s.parse().ok()?);
            }
            DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z")
                .or_else(|_| DateTime::parse_from_rfc3339(s))
                .ok()
                .map(|t| t.with_timezone(&Utc))
                .filter(in_range)
        }
        _ => None,
    }
}

fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single().filter(in_range)
}

/// Years every database we store into can represent (PostgreSQL stops at 4713 BC).
fn in_range(t: &DateTime<Utc>) -> bool {
    (1..=9999).contains(&t.year())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse_event_time(v: &Value) -> Option<DateTime<Utc>> {
        super::parse_event_time(&serde_json::value::to_raw_value(v).expect("JSON"))
    }

    #[test]
    fn infobip_offset_without_colon() {
        let t = parse_event_time(&json!("2024-07-16T17:26:54.966-0300")).expect("parses");
        assert_eq!(t.to_rfc3339(), "2024-07-16T20:26:54.966+00:00");
    }

    #[test]
    fn rfc3339_and_epoch_millis() {
        assert_eq!(
            parse_event_time(&json!("2024-07-16T20:26:54Z")).map(|t| t.timestamp()),
            Some(1_721_161_614)
        );
        assert_eq!(
            parse_event_time(&json!(1721161444325_i64)).map(|t| t.timestamp_millis()),
            Some(1_721_161_444_325)
        );
        assert_eq!(
            parse_event_time(&json!("1721161444325")).map(|t| t.timestamp_millis()),
            Some(1_721_161_444_325)
        );
    }

    #[test]
    fn garbage_is_none() {
        for v in [
            json!("yesterday"),
            json!(null),
            json!(1.5),
            json!(""),
            json!(i64::MAX),
            json!("99999999999999999999999"),
        ] {
            assert_eq!(parse_event_time(&v), None, "{v}");
        }
    }
}
