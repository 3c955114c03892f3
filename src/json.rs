//! Reading JSON without building a tree: the payload reader every layer shares (the API checks
//! bodies with it, the worker reads task bodies and payloads with it, the fuzz targets too).
//!
//! A 5-result report parsed into `serde_json::Value` is a few hundred allocations (every key,
//! every string, every map node), and perf under load put a sixth of the process in malloc and
//! free. Here an object is read as its keys and the raw text of each value, borrowed from the
//! payload ([`RawValue`]); only the fields a row needs are read further, and an event's `raw`
//! column is its own text instead of a re-serialized tree. serde_json does the parsing: nothing
//! here scans JSON by hand, and [`read_json`] keeps serde_json's full strictness.

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

/// Reads a JSON document for lazy reading, refusing exactly what parsing it into a
/// `serde_json::Value` would refuse: the one way in for payloads (API, task bodies, fuzzing).
///
/// A skim into [`RawValue`] decodes no string, reads no number and follows nesting without a
/// limit, so the document is first visited in full by [`check_json`], building nothing.
pub fn read_json(json: &[u8]) -> Result<&RawValue, serde_json::Error> {
    check_json(json)?;
    serde_json::from_slice(json)
}

/// Checks `json` as strictly as a `Value` parse, without building anything: every string is
/// decoded (a lone UTF-16 surrogate escape is refused, which PostgreSQL's `jsonb` would refuse
/// later), every number read (out of range is refused) and nesting is limited to 128 levels.
fn check_json(json: &[u8]) -> Result<(), serde_json::Error> {
    serde_json::from_slice::<Checked>(json).map(|_| ())
}

/// Any JSON value, visited in full and kept as nothing.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Checked;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_unit<E>(self) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<Checked, A::Error> {
                while s.next_element::<Checked>()?.is_some() {}
                Ok(Checked)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Checked, A::Error> {
                while m.next_entry::<Checked, Checked>()?.is_some() {}
                Ok(Checked)
            }
        }
        d.deserialize_any(V)
    }
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

    /// Found by the `normalize` fuzz target: a lone surrogate escape passes a skim into
    /// `RawValue` but not a parse into `Value` (nor PostgreSQL's `jsonb`).
    #[test]
    fn check_json_is_as_strict_as_value() {
        for bad in [
            r#"{"a": "\ud82c\\udf81"}"#,
            "[1e400]",
            "[1, 2",
            r#"{"a": 1} x"#,
        ] {
            assert!(read_json(bad.as_bytes()).is_err(), "{bad}");
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
        }
        // The same nesting limit as `Value` (serde_json's 128), on either side of it.
        for n in [1, 100, 127, 128, 129, 200] {
            let nested = "[".repeat(n) + &"]".repeat(n);
            assert_eq!(
                check_json(nested.as_bytes()).is_ok(),
                serde_json::from_str::<Value>(&nested).is_ok(),
                "{n} levels"
            );
        }
        assert!(check_json(("[".repeat(200) + &"]".repeat(200)).as_bytes()).is_err());
        assert!(check_json(r#"{"a": ["\ud83c\udf81", -0.5, null, true, {}]}"#.as_bytes()).is_ok());
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

    proptest! {
        /// Every member reads back as the tree has it.
        #[test]
        fn agrees_with_value(v in arb_json()) {
            let text = v.to_string();
            let r = raw(&text);
            prop_assert!(check_json(text.as_bytes()).is_ok());
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

        /// On arbitrary text, `check_json` accepts exactly what `Value` parses.
        #[test]
        fn check_json_agrees_with_value_on_text(s in "[\\[\\]{}\",:0-9a-z\\\\ ]{0,40}") {
            prop_assert_eq!(
                check_json(s.as_bytes()).is_ok(),
                serde_json::from_str::<Value>(&s).is_ok()
            );
        }
    }
}
