//! Infobip e-mail callbacks: payload shapes and their normalization into rows.
//!
//! Everything here is pure: no clock, no I/O. The API calls [`parse`] to validate a body before
//! queueing it, and the worker calls [`normalize`] on the same payload, so a payload the API
//! accepted is one the worker can store.

pub mod callback_data;
mod error;
mod time;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use error::PayloadError;

/// Infobip sends delivery reports in buckets of at most this many results.
pub const MAX_RESULTS: usize = 2000;

/// One event inside a callback, borrowed from the parsed payload.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A delivery report result (`results[i]`, or a bare result at the top level).
    Delivery(&'a serde_json::Map<String, Value>),
    /// A tracking event (`notificationType` at the top level).
    Tracking(&'a serde_json::Map<String, Value>),
}

impl<'a> Event<'a> {
    fn fields(&self) -> &'a serde_json::Map<String, Value> {
        match self {
            Event::Delivery(m) | Event::Tracking(m) => m,
        }
    }

    /// The event's status: `status.groupName` for delivery reports, `notificationType` for tracking.
    pub fn status(&self) -> &'a str {
        // `parse` has checked that these exist and are non-empty strings.
        match self {
            Event::Delivery(m) => delivery_status(m).unwrap_or_default(),
            Event::Tracking(m) => m
                .get("notificationType")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        }
    }

    /// Infobip's `messageId`, as a string even when it arrived as a number.
    pub fn message_id(&self) -> String {
        message_id(self.fields()).unwrap_or_default()
    }
}

/// The events of a valid callback, in payload order.
#[derive(Debug)]
pub struct Callback<'a> {
    /// At least one event.
    pub events: Vec<Event<'a>>,
}

/// Checks that `payload` is an Infobip e-mail callback and lists its events.
pub fn parse(payload: &Value) -> Result<Callback<'_>, PayloadError> {
    let obj = match payload {
        Value::Object(obj) => obj,
        other => return Err(PayloadError::NotAnObject(json_kind(other))),
    };
    if let Some(results) = obj.get("results") {
        let list = results
            .as_array()
            .ok_or(PayloadError::ResultsNotAList(json_kind(results)))?;
        if list.is_empty() {
            return Err(PayloadError::NoResults);
        }
        if list.len() > MAX_RESULTS {
            return Err(PayloadError::TooManyResults(list.len()));
        }
        let events = list
            .iter()
            .enumerate()
            .map(|(i, r)| delivery(r).map_err(|e| PayloadError::InResult(i, Box::new(e))))
            .collect::<Result<_, _>>()?;
        return Ok(Callback { events });
    }
    if let Some(kind) = obj.get("notificationType") {
        match kind.as_str() {
            Some(s) if !s.trim().is_empty() => {}
            _ => return Err(PayloadError::BadNotificationType),
        }
        check_message_id(obj)?;
        return Ok(Callback {
            events: vec![Event::Tracking(obj)],
        });
    }
    if obj.contains_key("messageId") || obj.contains_key("status") {
        return Ok(Callback {
            events: vec![delivery(payload)?],
        });
    }
    Err(PayloadError::NotACallback)
}

fn delivery(result: &Value) -> Result<Event<'_>, PayloadError> {
    let obj = result
        .as_object()
        .ok_or(PayloadError::ResultNotAnObject(json_kind(result)))?;
    if !obj.contains_key("messageId") && !obj.contains_key("status") {
        return Err(PayloadError::NeitherMessageIdNorStatus);
    }
    check_message_id(obj)?;
    if delivery_status(obj).is_none() {
        return Err(PayloadError::BadStatus);
    }
    Ok(Event::Delivery(obj))
}

fn check_message_id(obj: &serde_json::Map<String, Value>) -> Result<(), PayloadError> {
    match obj.get("messageId") {
        None | Some(Value::Null) => Err(PayloadError::MissingMessageId),
        Some(_) if message_id(obj).is_none() => Err(PayloadError::BadMessageId),
        Some(_) => Ok(()),
    }
}

fn message_id(obj: &serde_json::Map<String, Value>) -> Option<String> {
    match obj.get("messageId")? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `status.groupName`; a status given as a plain string is taken as is.
fn delivery_status(obj: &serde_json::Map<String, Value>) -> Option<&str> {
    let s = match obj.get("status")? {
        Value::Object(st) => st.get("groupName")?.as_str()?,
        Value::String(s) => s.as_str(),
        _ => return None,
    };
    (!s.trim().is_empty()).then_some(s)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One row of `email_callback`, ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCallback {
    /// `status.groupName` or `notificationType`.
    pub status: String,
    /// `to` (delivery report) or `recipient` (tracking event).
    pub email: Option<String>,
    /// When our API received the callback (UTC).
    pub data_recebimento: DateTime<Utc>,
    /// Infobip's `messageId`.
    pub id_externo: String,
    /// `qj_contact_id` from `callbackData`, when readable.
    pub qj_contact_id: Option<i64>,
    /// The provider's event time (`doneAt` or `sendDateTime`), in UTC.
    pub event_at: Option<DateTime<Utc>>,
    /// `status.name` (delivery reports).
    pub status_name: Option<String>,
    /// `error.name` (delivery reports).
    pub error_name: Option<String>,
    /// `error.permanent` (delivery reports).
    pub error_permanent: Option<bool>,
    /// `bulkId`.
    pub bulk_id: Option<String>,
    /// `eventId` (tracking events; Infobip's deduplication key).
    pub event_id: Option<String>,
    /// The clicked URL (`url`, CLICKED events).
    pub url: Option<String>,
    /// Country from `geoLocation` or `geoLocationInfo`.
    pub country: Option<String>,
    /// City from `geoLocation` or `geoLocationInfo`.
    pub city: Option<String>,
    /// `callbackData` decoded to JSON (text), when readable.
    pub callback_data: Option<String>,
    /// The event's own JSON, unknown fields included.
    pub raw: String,
    /// Hex SHA-256 identifying the event, unique in the table: a redelivery adds no row.
    pub dedupe_key: String,
}

/// Turns a callback payload into one row per event.
pub fn normalize(
    payload: &Value,
    received_at: DateTime<Utc>,
) -> Result<Vec<NewCallback>, PayloadError> {
    Ok(parse(payload)?
        .events
        .iter()
        .map(|e| row(*e, received_at))
        .collect())
}

fn row(event: Event<'_>, received_at: DateTime<Utc>) -> NewCallback {
    let m = event.fields();
    let text = |k: &str| m.get(k).and_then(Value::as_str).map(clean);
    let id_externo = clean(&event.message_id());
    let status = clean(event.status());
    let (email, event_time_raw, event_at) = match event {
        Event::Delivery(_) => {
            let done = m.get("doneAt");
            (text("to"), done, done.and_then(time::parse_event_time))
        }
        Event::Tracking(_) => {
            let t = m.get("sendDateTime").or_else(|| m.get("doneAt"));
            (text("recipient"), t, t.and_then(time::parse_event_time))
        }
    };
    let status_name = m
        .get("status")
        .and_then(|s| s.get("name"))
        .and_then(Value::as_str)
        .map(clean);
    let error = m.get("error");
    let error_name = error
        .and_then(|e| e.get("name"))
        .and_then(Value::as_str)
        .map(clean);
    let error_permanent = error
        .and_then(|e| e.get("permanent"))
        .and_then(Value::as_bool);
    let event_id = match m.get("eventId") {
        Some(Value::String(s)) if !s.is_empty() => Some(clean(s)),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let geo = m.get("geoLocation").or_else(|| m.get("geoLocationInfo"));
    let geo_text = |k: &str| {
        geo.and_then(|g| g.get(k))
            .and_then(Value::as_str)
            .map(clean)
    };
    let (callback_json, qj_contact_id) = match m.get("callbackData") {
        Some(Value::String(s)) => {
            callback_data::read(s).map_or((None, None), |r| (Some(r.json), r.contact_id))
        }
        Some(v @ Value::Object(_)) => (Some(v.to_string()), callback_data::contact_id(v)),
        _ => (None, None),
    };
    let url = text("url");
    let dedupe_key = dedupe_key(
        event_id.as_deref(),
        &id_externo,
        &status,
        event_at
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
            .or_else(|| event_time_raw.map(Value::to_string))
            .as_deref(),
        url.as_deref(),
    );
    NewCallback {
        status,
        email,
        data_recebimento: received_at,
        id_externo,
        qj_contact_id,
        event_at,
        status_name,
        error_name,
        error_permanent,
        bulk_id: text("bulkId"),
        event_id,
        url,
        country: geo_text("countryName"),
        city: geo_text("city"),
        callback_data: callback_json,
        // Serializing a map cannot fail (string keys, no non-finite floats in a parsed Value).
        raw: serde_json::to_string(m).unwrap_or_default(),
        dedupe_key,
    }
}

/// Text columns never hold NUL: PostgreSQL's `text` cannot store it. JSON columns keep it escaped.
fn clean(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_owned()
    }
}

/// Infobip documents `eventId` as the deduplication key; without it, an event is identified by
/// its message, status, provider time and URL (a second open a minute later is a new event).
fn dedupe_key(
    event_id: Option<&str>,
    message_id: &str,
    status: &str,
    event_time: Option<&str>,
    url: Option<&str>,
) -> String {
    let mut h = Sha256::new();
    match event_id {
        Some(id) => {
            h.update(b"event\0");
            h.update(id.as_bytes());
        }
        None => {
            for part in [
                "identity",
                message_id,
                status,
                event_time.unwrap_or(""),
                url.unwrap_or(""),
            ] {
                h.update(part.as_bytes());
                h.update(b"\0");
            }
        }
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests;
