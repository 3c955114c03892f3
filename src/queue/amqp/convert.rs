//! Celery's message properties in AMQP terms: JSON headers as field tables (the way py-amqp
//! encodes Python values) and the few header values we read back.

use std::collections::BTreeMap;

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde_json::Value;

use crate::queue::TaskMessage;

/// The Celery task id: header `id` (protocol v2), else the correlation id.
pub(super) fn task_id_of(props: &BasicProperties) -> String {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("id"))
        .and_then(as_string)
        .or_else(|| props.correlation_id().as_ref().map(|c| c.to_string()))
        .unwrap_or_default()
}

pub(super) fn as_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub(super) fn as_u32(v: &AMQPValue) -> Option<u32> {
    let n: i64 = match *v {
        AMQPValue::ShortShortInt(n) => n.into(),
        AMQPValue::ShortShortUInt(n) => n.into(),
        AMQPValue::ShortInt(n) => n.into(),
        AMQPValue::ShortUInt(n) => n.into(),
        AMQPValue::LongInt(n) => n.into(),
        AMQPValue::LongUInt(n) => n.into(),
        AMQPValue::LongLongInt(n) => n,
        _ => return None,
    };
    u32::try_from(n.max(0)).ok()
}

/// A JSON value as an AMQP field value, the way py-amqp encodes Python values, so a Python
/// worker reads back the same headers Celery would have written.
pub fn json_to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(json_to_amqp).collect::<Vec<_>>(),
        )),
        Value::Object(m) => AMQPValue::FieldTable(json_map_to_table(m)),
    }
}

/// A JSON object as an AMQP field table.
pub fn json_map_to_table(m: &serde_json::Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in m {
        t.insert(ShortString::from(k.as_str()), json_to_amqp(v));
    }
    t
}

/// The AMQP properties Celery gives a task message.
pub(super) fn task_properties(msg: &TaskMessage) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(json_map_to_table(&msg.headers()))
        .with_correlation_id(msg.id.as_str().into())
        .with_delivery_mode(2)
        .with_priority(0)
}

pub(super) fn with_headers(
    props: BasicProperties,
    edit: impl FnOnce(&mut FieldTable),
) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    edit(&mut headers);
    props.with_headers(headers)
}

pub(super) fn without_headers(props: BasicProperties, names: &[&str]) -> BasicProperties {
    let kept: BTreeMap<ShortString, AMQPValue> = props
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| !names.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    props.with_headers(FieldTable::from(kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn headers_convert_like_py_amqp() {
        let v = json!({"a": null, "b": [null, 1], "c": {"d": true}, "e": "s", "f": 1.5});
        let Value::Object(m) = v else {
            panic!("object")
        };
        let t = json_map_to_table(&m);
        let h = t.inner();
        assert_eq!(h.get("a"), Some(&AMQPValue::Void));
        assert_eq!(
            h.get("b"),
            Some(&AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Void,
                AMQPValue::LongLongInt(1)
            ])))
        );
        assert!(matches!(h.get("c"), Some(AMQPValue::FieldTable(_))));
        assert_eq!(h.get("e").and_then(as_string).as_deref(), Some("s"));
        assert_eq!(h.get("f"), Some(&AMQPValue::Double(1.5)));
    }

    #[test]
    fn attempts_header_reads_any_integer() {
        assert_eq!(as_u32(&AMQPValue::LongLongInt(4)), Some(4));
        assert_eq!(as_u32(&AMQPValue::ShortShortUInt(2)), Some(2));
        assert_eq!(as_u32(&AMQPValue::LongInt(-1)), Some(0));
        assert_eq!(as_u32(&AMQPValue::LongString("3".into())), None);
    }
}
