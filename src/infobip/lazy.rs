//! Reading a callback without building a JSON tree.
//!
//! A 5-result report parsed into `serde_json::Value` is a few hundred allocations (every key,
//! every string, every map node), and perf under load put a sixth of the process in malloc and
//! free. Here an object is read as its keys and the raw text of each value, borrowed from the
//! payload ([`RawValue`]); only the fields a row needs are read further, and an event's `raw`
//! column is its own text instead of a re-serialized tree. serde_json does the parsing: nothing
//! here scans JSON by hand except [`depth`].

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Number, Value};

/// A JSON object: its members in order, values as raw text. A key given twice reads as its
/// last value, as in `serde_json::Map`.
#[derive(Debug, Clone, Default)]
pub struct Obj<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> Obj<'a> {
    /// Reads `raw` as an object; `None` when it is anything else.
    pub fn parse(raw: &'a RawValue) -> Option<Obj<'a>> {
        if kind(raw) != Kind::Object {
            return None;
        }
        serde_json::from_str(raw.get()).ok()
    }

    /// The raw value of member `key`.
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// Whether `key` is a member (whatever its value, `null` included).
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Member `key` when it is a string.
    pub fn str(&self, key: &str) -> Option<Cow<'a, str>> {
        self.get(key).and_then(as_str)
    }

    /// Member `key` when it is an object.
    pub fn obj(&self, key: &str) -> Option<Obj<'a>> {
        self.get(key).and_then(Obj::parse)
    }
}

impl<'de> Deserialize<'de> for Obj<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Obj<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Obj<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some((k, v)) = map.next_entry::<Str<'de>, &'de RawValue>()? {
                    fields.push((k.0, v));
                }
                Ok(Obj { fields })
            }
        }
        d.deserialize_map(V)
    }
}

/// A string borrowed from the payload when it has no escapes, owned otherwise. (serde's own
/// `Cow<str>` always copies outside of derived structs.)
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The six JSON kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    /// How error messages name the kind ("got an array").
    pub fn name(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool => "a boolean",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::Array => "an array",
            Kind::Object => "an object",
        }
    }
}

/// The kind of a raw value, from its first byte (serde_json has validated the text).
pub fn kind(raw: &RawValue) -> Kind {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'{') => Kind::Object,
        Some(b'[') => Kind::Array,
        Some(b'"') => Kind::String,
        Some(b't' | b'f') => Kind::Bool,
        Some(b'n') => Kind::Null,
        _ => Kind::Number,
    }
}

/// The raw value when it is a string, unescaped.
pub fn as_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    if kind(raw) != Kind::String {
        return None;
    }
    serde_json::from_str::<Str<'_>>(raw.get()).ok().map(|s| s.0)
}

/// The elements of the raw value when it is an array.
pub fn as_array(raw: &RawValue) -> Option<Vec<&RawValue>> {
    if kind(raw) != Kind::Array {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

/// The raw value when it is a boolean.
pub fn as_bool(raw: &RawValue) -> Option<bool> {
    match raw.get().trim() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// The raw value when it is a number, as serde_json reads it.
pub fn as_number(raw: &RawValue) -> Option<Number> {
    if kind(raw) != Kind::Number {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

/// The raw value as a tree, for the rare paths that need one.
pub fn to_value(raw: &RawValue) -> Option<Value> {
    serde_json::from_str(raw.get()).ok()
}

/// Deepest nesting of arrays and objects in `json`, which must be valid JSON. serde_json
/// refuses more than 128 levels when it builds a tree, but not when it only skims a value, so
/// the API checks it here (a byte scan: nothing else in JSON opens or closes a level).
pub fn depth(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).expect("valid JSON")
    }

    #[test]
    fn objects_read_lazily_and_last_key_wins() {
        let r = raw(r#"{"a": 1, "b": "x\"y", "a": [2], "c": {"d": null}}"#);
        let o = Obj::parse(&r).expect("object");
        assert_eq!(o.get("a").map(RawValue::get), Some("[2]"));
        assert_eq!(o.str("b").as_deref(), Some("x\"y"));
        assert!(o.obj("c").is_some_and(|c| c.contains_key("d")));
        assert!(o.get("z").is_none());
        assert!(Obj::parse(&raw("[1]")).is_none());
    }

    #[test]
    fn kinds_and_scalars() {
        assert_eq!(kind(&raw("null")), Kind::Null);
        assert_eq!(kind(&raw("-1.5e3")), Kind::Number);
        assert_eq!(as_bool(&raw("true")), Some(true));
        assert_eq!(as_bool(&raw("1")), None);
        assert_eq!(as_number(&raw("12")).and_then(|n| n.as_i64()), Some(12));
        assert_eq!(as_str(&raw("12")), None);
        assert_eq!(as_array(&raw("[1, \"a\"]")).map(|v| v.len()), Some(2));
    }

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(depth(br#"{"a": "[[[{", "b": [[1]]}"#), 3);
        assert_eq!(depth(br#"["\"[", "\\", [2]]"#), 2);
        assert_eq!(depth(b"1"), 0);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "\\PC{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[\"\\\\a-c\\[\\]{}]{0,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn value_depth(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(value_depth).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(value_depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    proptest! {
        /// Every member reads back as the tree has it, and the byte scan measures the tree.
        #[test]
        fn agrees_with_value(v in arb_json()) {
            let text = v.to_string();
            let r = raw(&text);
            prop_assert_eq!(depth(text.as_bytes()), value_depth(&v));
            if let Value::Object(m) = &v {
                let o = Obj::parse(&r).expect("object");
                for (k, val) in m {
                    let got = o.get(k).and_then(to_value);
                    prop_assert_eq!(got.as_ref(), Some(val));
                    prop_assert_eq!(o.str(k).map(Cow::into_owned), val.as_str().map(str::to_owned));
                }
            } else {
                prop_assert!(Obj::parse(&r).is_none());
            }
        }
    }
}
