//! Infobip e-mail callbacks: payload shapes and their normalization into rows.
//!
//! Everything here is pure: no clock, no I/O. The API calls [`parse`] to validate a body before
//! queueing it, and the worker calls [`normalize`] on the same payload, so a payload the API
//! accepted is one the worker can store.

pub mod callback_data;
mod error;
mod time;

use std::borrow::Cow;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::json::{self, Kind, Obj};
pub use error::PayloadError;

/// Infobip sends delivery reports in buckets of at most this many results.
pub const MAX_RESULTS: usize = 2000;

/// One event inside a callback: its members, read lazily, and its own JSON text.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A delivery report result (`results[i]`, or a bare result at the top level).
    Delivery(Obj<'a>, &'a RawValue),
    /// A tracking event (`notificationType` at the top level).
    Tracking(Obj<'a>, &'a RawValue),
}

impl<'a> Event<'a> {
    fn fields(&self) -> &Obj<'a> {
        match self {
            Event::Delivery(m, _) | Event::Tracking(m, _) => m,
        }
    }

    fn raw(&self) -> &'a RawValue {
        match self {
            Event::Delivery(_, r) | Event::Tracking(_, r) => r,
        }
    }

    /// The event's status: `status.groupName` for delivery reports, `notificationType` for tracking.
    pub fn status(&self) -> Cow<'a, str> {
        // `parse` has checked that these exist and are non-empty strings.
        match self {
            Event::Delivery(m, _) => delivery_status(m).unwrap_or_default(),
            Event::Tracking(m, _) => m.str("notificationType").unwrap_or_default(),
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
pub fn parse(payload: &RawValue) -> Result<Callback<'_>, PayloadError> {
    let obj = Obj::parse(payload).ok_or(PayloadError::NotAnObject(json_kind(payload)))?;
    if let Some(results) = obj.get("results") {
        let list =
            json::as_array(results).ok_or(PayloadError::ResultsNotAList(json_kind(results)))?;
        if list.is_empty() {
            return Err(PayloadError::NoResults);
        }
        if list.len() > MAX_RESULTS {
            return Err(PayloadError::TooManyResults(list.len()));
        }
        let events = list
            .into_iter()
            .enumerate()
            .map(|(i, r)| delivery(r).map_err(|e| PayloadError::InResult(i, Box::new(e))))
            .collect::<Result<_, _>>()?;
        return Ok(Callback { events });
    }
    if let Some(kind) = obj.get("notificationType") {
        match json::as_str(kind) {
            Some(s) if !s.trim().is_empty() => {}
            _ => return Err(PayloadError::BadNotificationType),
        }
        check_message_id(&obj)?;
        return Ok(Callback {
            events: vec![Event::Tracking(obj, payload)],
        });
    }
    if obj.contains_key("messageId") || obj.contains_key("status") {
        return Ok(Callback {
            events: vec![delivery_fields(obj, payload)?],
        });
    }
    Err(PayloadError::NotACallback)
}

fn delivery(result: &RawValue) -> Result<Event<'_>, PayloadError> {
    let obj = Obj::parse(result).ok_or(PayloadError::ResultNotAnObject(json_kind(result)))?;
    delivery_fields(obj, result)
}

fn delivery_fields<'a>(obj: Obj<'a>, raw: &'a RawValue) -> Result<Event<'a>, PayloadError> {
    if !obj.contains_key("messageId") && !obj.contains_key("status") {
        return Err(PayloadError::NeitherMessageIdNorStatus);
    }
    check_message_id(&obj)?;
    if delivery_status(&obj).is_none() {
        return Err(PayloadError::BadStatus);
    }
    Ok(Event::Delivery(obj, raw))
}

fn check_message_id(obj: &Obj<'_>) -> Result<(), PayloadError> {
    match obj.get("messageId").map(|r| (r, json::kind(r))) {
        None | Some((_, Kind::Null)) => Err(PayloadError::MissingMessageId),
        Some(_) if message_id(obj).is_none() => Err(PayloadError::BadMessageId),
        Some(_) => Ok(()),
    }
}

fn message_id(obj: &Obj<'_>) -> Option<String> {
    let raw = obj.get("messageId")?;
    match json::kind(raw) {
        Kind::String => json::as_str(raw)
            .filter(|s| !s.trim().is_empty())
            .map(Cow::into_owned),
        Kind::Number => json::as_number(raw).map(|n| n.to_string()),
        _ => None,
    }
}

/// `status.groupName`; a status given as a plain string is taken as is.
fn delivery_status<'a>(obj: &Obj<'a>) -> Option<Cow<'a, str>> {
    let raw = obj.get("status")?;
    let s = match json::kind(raw) {
        Kind::Object => Obj::parse(raw)?.str("groupName")?,
        Kind::String => json::as_str(raw)?,
        _ => return None,
    };
    (!s.trim().is_empty()).then_some(s)
}

fn json_kind(v: &RawValue) -> &'static str {
    json::kind(v).name()
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
    payload: &RawValue,
    received_at: DateTime<Utc>,
) -> Result<Vec<NewCallback>, PayloadError> {
    Ok(parse(payload)?
        .events
        .iter()
        .map(|e| row(e, received_at))
        .collect())
}

fn row(event: &Event<'_>, received_at: DateTime<Utc>) -> NewCallback {
    let m = event.fields();
    let text = |k: &str| m.str(k).map(|s| clean(&s));
    let id_externo = clean(&event.message_id());
    let status = clean(&event.status());
    let (email, event_time_raw) = match event {
        Event::Delivery(..) => (text("to"), m.get("doneAt")),
        Event::Tracking(..) => (
            text("recipient"),
            m.get("sendDateTime").or_else(|| m.get("doneAt")),
        ),
    };
    let event_at = event_time_raw.and_then(time::parse_event_time);
    let status_obj = m.obj("status");
    let status_name = status_obj.and_then(|s| s.str("name")).map(|s| clean(&s));
    let error = m.obj("error");
    let error_name = error
        .as_ref()
        .and_then(|e| e.str("name"))
        .map(|s| clean(&s));
    let error_permanent = error
        .as_ref()
        .and_then(|e| e.get("permanent"))
        .and_then(json::as_bool);
    let event_id = m.get("eventId").and_then(|r| match json::kind(r) {
        Kind::String => json::as_str(r).filter(|s| !s.is_empty()).map(|s| clean(&s)),
        Kind::Number => json::as_number(r).map(|n| n.to_string()),
        _ => None,
    });
    let geo = m
        .get("geoLocation")
        .or_else(|| m.get("geoLocationInfo"))
        .and_then(Obj::parse);
    let geo_text = |k: &str| geo.as_ref().and_then(|g| g.str(k)).map(|s| clean(&s));
    let (callback_json, qj_contact_id) = match m.get("callbackData").map(|r| (r, json::kind(r))) {
        Some((r, Kind::String)) => json::as_str(r)
            .and_then(|s| callback_data::read(&s))
            .map_or((None, None), |r| (Some(r.json), r.contact_id)),
        Some((r, Kind::Object)) => json::to_value(r).map_or((None, None), |v| {
            (Some(v.to_string()), callback_data::contact_id(&v))
        }),
        _ => (None, None),
    };
    let url = text("url");
    let dedupe_key = dedupe_key(
        event_id.as_deref(),
        &id_externo,
        &status,
        event_at
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
            .or_else(|| {
                event_time_raw
                    .and_then(json::to_value)
                    .map(|v| v.to_string())
            })
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
        // The event's own text, as the sender wrote it (valid JSON: serde_json read it).
        raw: event.raw().get().to_owned(),
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
