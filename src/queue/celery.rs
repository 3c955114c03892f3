//! Celery's task message, protocol v2, as Celery and Kombu 5.x write it.
//!
//! The body is `[args, kwargs, embed]` = `[[payload], {"received_at": ...}, {callbacks...}]`.
//! We write it by splicing the already-validated request body into a template, so the payload is
//! never re-serialized on the accept path.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::json::{self, Obj};
use thiserror::Error;

/// A Celery task message ready to publish.
#[derive(Debug, Clone)]
pub struct TaskMessage {
    /// Task id (uuid4), also the AMQP `correlation_id`.
    pub id: String,
    /// Task name, e.g. `mailhook.process_email_callback`.
    pub task: String,
    /// The JSON body `[args, kwargs, embed]`; shared, not copied, when a backend keeps the
    /// message (the SQLite writer holds it until its group commits).
    pub body: bytes::Bytes,
}

impl TaskMessage {
    /// Wraps a JSON payload (already validated) as the single argument of `task`.
    pub fn for_payload(task: &str, payload_json: &[u8], received_at: DateTime<Utc>) -> Self {
        const EMBED: &[u8] = br#"{"callbacks":null,"errbacks":null,"chain":null,"chord":null}"#;
        let received = received_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut body = Vec::with_capacity(payload_json.len() + 128);
        body.extend_from_slice(b"[[");
        body.extend_from_slice(payload_json);
        body.extend_from_slice(b"],{\"received_at\":\"");
        body.extend_from_slice(received.as_bytes());
        body.extend_from_slice(b"\"},");
        body.extend_from_slice(EMBED);
        body.push(b']');
        TaskMessage {
            id: uuid::Uuid::new_v4().to_string(),
            task: task.to_owned(),
            body: body.into(),
        }
    }

    /// The message headers Celery's `as_task_v2` writes.
    pub fn celery_headers(&self) -> Headers<'_> {
        // Celery's `origin` names the producing process; computed once, not a syscall per message.
        static ORIGIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let origin = ORIGIN.get_or_init(|| {
            format!(
                "gen{}@{}",
                std::process::id(),
                gethostname::gethostname().to_string_lossy()
            )
        });
        Headers {
            lang: "py",
            task: &self.task,
            id: &self.id,
            shadow: None,
            eta: None,
            expires: None,
            group: None,
            group_index: None,
            retries: 0,
            timelimit: [None, None],
            root_id: &self.id,
            parent_id: None,
            argsrepr: format!("[<payload of {} bytes>]", self.body.len()),
            kwargsrepr: "{}",
            origin,
            ignore_result: false,
            replaced_task_nesting: 0,
            stamped_headers: None,
            stamps: Map::new(),
        }
    }

    /// [`Self::celery_headers`] as a JSON map (AMQP turns it into a field table).
    pub fn headers(&self) -> Map<String, Value> {
        match serde_json::to_value(self.celery_headers()) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }
}

/// Celery's protocol-v2 message headers, serialized straight from borrowed fields: on the
/// Redis accept path, building them as a `json!` tree cost a fifth of the API's CPU.
#[derive(Debug, Serialize)]
pub struct Headers<'a> {
    lang: &'static str,
    task: &'a str,
    id: &'a str,
    shadow: Option<&'a str>,
    eta: Option<&'a str>,
    expires: Option<&'a str>,
    group: Option<&'a str>,
    group_index: Option<u32>,
    retries: u32,
    timelimit: [Option<f64>; 2],
    root_id: &'a str,
    parent_id: Option<&'a str>,
    argsrepr: String,
    kwargsrepr: &'static str,
    origin: &'a str,
    ignore_result: bool,
    replaced_task_nesting: u32,
    stamped_headers: Option<Vec<String>>,
    stamps: Map<String, Value>,
}

/// Why a task body cannot be read as a callback task.
#[derive(Debug, Error)]
pub enum BodyError {
    #[error("task body is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("task body must be [args, kwargs, embed] with args = [payload]")]
    BadShape,
}

/// The payload and receive time carried by a task body.
#[derive(Debug)]
pub struct TaskArgs<'a> {
    /// The Infobip payload, borrowed from the body.
    pub payload: &'a RawValue,
    /// `kwargs.received_at`, when the producer set it (Python producers may not).
    pub received_at: Option<DateTime<Utc>>,
}

/// Reads a protocol-v2 body `[[payload], {"received_at": ...}, {...}]`.
pub fn decode_body(body: &[u8]) -> Result<TaskArgs<'_>, BodyError> {
    let v = json::read_json(body).map_err(BodyError::NotJson)?;
    let parts = json::as_array(v).ok_or(BodyError::BadShape)?;
    let args = parts
        .first()
        .and_then(|a| json::as_array(a))
        .ok_or(BodyError::BadShape)?;
    let [payload] = args[..] else {
        return Err(BodyError::BadShape);
    };
    let received_at = parts
        .get(1)
        .and_then(|k| Obj::parse(k))
        .and_then(|k| k.str("received_at"))
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc));
    Ok(TaskArgs {
        payload,
        received_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    const TASK: &str = "mailhook.process_email_callback";

    #[test]
    fn body_round_trips_and_matches_celery_shape() {
        let at = Utc
            .with_ymd_and_hms(2024, 7, 16, 20, 30, 0)
            .single()
            .expect("time");
        let payload = br#"{"notificationType": "OPENED", "messageId": "m"}"#;
        let msg = TaskMessage::for_payload(TASK, payload, at);
        let v: Value = serde_json::from_slice(&msg.body).expect("body is JSON");
        assert_eq!(
            v,
            json!([
                [{"notificationType": "OPENED", "messageId": "m"}],
                {"received_at": "2024-07-16T20:30:00.000000Z"},
                {"callbacks": null, "errbacks": null, "chain": null, "chord": null}
            ])
        );
        let args = decode_body(&msg.body).expect("decodes");
        assert_eq!(
            args.payload.get(),
            r#"{"notificationType": "OPENED", "messageId": "m"}"#
        );
        assert_eq!(args.received_at, Some(at));
        let h = msg.headers();
        assert_eq!(h["task"], TASK);
        assert_eq!(h["id"], msg.id.as_str());
        assert_eq!(h["root_id"], msg.id.as_str());
        assert_eq!(h["lang"], "py");
    }

    #[test]
    fn python_producer_without_kwargs() {
        let args = decode_body(br#"[[{"a": 1}], {}, {}]"#).expect("decodes");
        assert_eq!(args.payload.get(), r#"{"a": 1}"#);
        assert_eq!(args.received_at, None);
        let args = decode_body(br#"[[{"a": 1}]]"#).expect("decodes");
        assert_eq!(args.received_at, None);
    }

    #[test]
    fn bad_bodies() {
        assert!(matches!(decode_body(b"nope"), Err(BodyError::NotJson(_))));
        for bad in [&b"{}"[..], b"[]", b"[[], {}]", b"[[1, 2], {}]", b"[{}, {}]"] {
            assert!(
                matches!(decode_body(bad), Err(BodyError::BadShape)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
