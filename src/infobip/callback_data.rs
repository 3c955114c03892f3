//! `callbackData` decoding.
//!
//! Infobip echoes back whatever string the sender attached to a message. Our senders wrote it two
//! ways: as JSON (`{"qj_contact_id": 3}`) and as the `str()` of a Python dict
//! (`{'qj_contact_id': '124127953', 'ok': True}`), with `\uXXXX` escapes and surrogate pairs.
//! No crate parses Python literals, so a small recursive-descent parser lives here; it is pure,
//! bounded in depth, and never panics on any input (see the property tests and the fuzz target).

use serde_json::{Map, Number, Value};

/// Deepest nesting the Python-literal parser follows before refusing the input.
pub const MAX_DEPTH: usize = 64;

/// serde_json (with its `raw_value` feature, which we enable) reads an object with this key as a
/// raw value, so JSON holding it cannot be read back into a `Value`: its JSON form is refused
/// already, and the fuzzer found the Python form slipping through. Treated as unreadable.
const SERDE_RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// Decodes a `callbackData` string as JSON, or failing that as a Python literal.
///
/// Returns `None` when the text is neither: the caller keeps the raw string in the event's JSON.
pub fn decode(text: &str) -> Option<Value> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        return Some(v);
    }
    let mut p = PyParser {
        src: trimmed.as_bytes(),
        text: trimmed,
        pos: 0,
    };
    let v = p.value(0)?;
    p.skip_ws();
    (p.pos == p.src.len()).then_some(v)
}

/// `callbackData` as stored: JSON text for the `callback_data` column, and `qj_contact_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The data as JSON text (the sender's own text when it already was JSON).
    pub json: String,
    /// `qj_contact_id`, when present and an integer or a string holding one.
    pub contact_id: Option<i64>,
}

/// Decodes `callbackData` for a row: [`decode`] then [`contact_id`], keeping the sender's own
/// text when it already is JSON (it was just validated by the same parser) instead of
/// serializing the tree again; this runs for every stored event.
pub fn read(text: &str) -> Option<Read> {
    let trimmed = text.trim();
    if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        return Some(Read {
            json: trimmed.to_owned(),
            contact_id: contact_id(&v),
        });
    }
    let v = decode(trimmed)?;
    Some(Read {
        json: v.to_string(),
        contact_id: contact_id(&v),
    })
}

fn float_id(f: f64) -> Option<i64> {
    (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

/// Reads `qj_contact_id` from decoded callback data: an integer, or a string holding one.
pub fn contact_id(data: &Value) -> Option<i64> {
    match data.get("qj_contact_id")? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().and_then(float_id)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
}

struct PyParser<'a> {
    src: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl PyParser<'_> {
    fn skip_ws(&mut self) {
        while self
            .src
            .get(self.pos)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        self.skip_ws();
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.skip_ws();
        match self.peek()? {
            b'{' => self.dict(depth),
            b'[' => self.seq(b']', depth),
            b'(' => self.seq(b')', depth),
            b'\'' | b'"' => self.string().map(Value::String),
            b'-' | b'+' | b'0'..=b'9' | b'.' => self.number(),
            _ => self.word(),
        }
    }

    fn dict(&mut self, depth: usize) -> Option<Value> {
        self.pos += 1; // '{'
        let mut map = Map::new();
        if self.eat(b'}') {
            return Some(Value::Object(map));
        }
        loop {
            let key = match self.value(depth + 1)? {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => if b { "True" } else { "False" }.to_owned(),
                Value::Null => "None".to_owned(),
                _ => return None, // unhashable key: not a Python dict literal
            };
            if key == SERDE_RAW_VALUE_TOKEN {
                return None;
            }
            if !self.eat(b':') {
                return None;
            }
            let value = self.value(depth + 1)?;
            map.insert(key, value);
            if self.eat(b',') {
                if self.eat(b'}') {
                    return Some(Value::Object(map));
                }
                continue;
            }
            return self.eat(b'}').then_some(Value::Object(map));
        }
    }

    fn seq(&mut self, close: u8, depth: usize) -> Option<Value> {
        self.pos += 1; // '[' or '('
        let mut items = Vec::new();
        if self.eat(close) {
            return Some(Value::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            if self.eat(b',') {
                if self.eat(close) {
                    return Some(Value::Array(items));
                }
                continue;
            }
            return self.eat(close).then_some(Value::Array(items));
        }
    }

    fn word(&mut self) -> Option<Value> {
        let rest = &self.src[self.pos..];
        for (word, value) in [
            (&b"True"[..], Value::Bool(true)),
            (b"False", Value::Bool(false)),
            (b"None", Value::Null),
        ] {
            if rest.starts_with(word)
                && !rest
                    .get(word.len())
                    .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
            {
                self.pos += word.len();
                return Some(value);
            }
        }
        None
    }

    fn number(&mut self) -> Option<Value> {
        let start = self.pos;
        while self.peek().is_some_and(|b| {
            b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'_')
        }) {
            self.pos += 1;
        }
        let raw: String = self.text[start..self.pos]
            .chars()
            .filter(|c| *c != '_')
            .collect();
        if let Ok(i) = raw.parse::<i64>() {
            return Some(Value::Number(i.into()));
        }
        let f = raw.parse::<f64>().ok()?;
        Number::from_f64(f).map(Value::Number)
    }

    /// A Python string literal in single or double quotes, with its escapes.
    fn string(&mut self) -> Option<String> {
        let quote = self.peek()?;
        self.pos += 1;
        let mut out = String::new();
        // A high surrogate waiting for its low half (`\ud83c\udf81`).
        let mut pending_high: Option<u32> = None;
        loop {
            // Copy the run up to the next quote or backslash in one go: both are ASCII, so the
            // run ends on a character boundary. (Char by char, this was the worker's hottest
            // function.)
            let run = self.src[self.pos..]
                .iter()
                .position(|&b| b == quote || b == b'\\')
                .unwrap_or(self.src.len() - self.pos);
            if run > 0 {
                flush_surrogate(&mut out, &mut pending_high);
                out.push_str(self.text.get(self.pos..self.pos + run)?);
                self.pos += run;
            }
            let c = self.text[self.pos..].chars().next()?;
            self.pos += c.len_utf8();
            if c as u32 == quote as u32 {
                flush_surrogate(&mut out, &mut pending_high);
                return Some(out);
            }
            if c != '\\' {
                flush_surrogate(&mut out, &mut pending_high);
                out.push(c);
                continue;
            }
            let e = self.text[self.pos..].chars().next()?;
            self.pos += e.len_utf8();
            let code = match e {
                'u' => self.hex(4)?,
                'U' => self.hex(8)?,
                'x' => self.hex(2)?,
                _ => {
                    flush_surrogate(&mut out, &mut pending_high);
                    match e {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'v' => out.push('\u{b}'),
                        'a' => out.push('\u{7}'),
                        '0' => out.push('\0'),
                        '\\' | '\'' | '"' => out.push(e),
                        '\n' => {} // line continuation
                        other => {
                            // Python keeps unknown escapes verbatim.
                            out.push('\\');
                            out.push(other);
                        }
                    }
                    continue;
                }
            };
            match (pending_high.take(), code) {
                (Some(high), 0xDC00..=0xDFFF) => {
                    let combined = 0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00);
                    out.push(char::from_u32(combined).unwrap_or(char::REPLACEMENT_CHARACTER));
                }
                (prev, 0xD800..=0xDBFF) => {
                    if prev.is_some() {
                        out.push(char::REPLACEMENT_CHARACTER);
                    }
                    pending_high = Some(code);
                }
                (prev, _) => {
                    if prev.is_some() {
                        out.push(char::REPLACEMENT_CHARACTER);
                    }
                    out.push(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
                }
            }
        }
    }

    fn hex(&mut self, digits: usize) -> Option<u32> {
        let s = self.text.get(self.pos..self.pos + digits)?;
        if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.pos += digits;
        u32::from_str_radix(s, 16).ok()
    }
}

/// A lone surrogate cannot live in a Rust string: it becomes U+FFFD.
fn flush_surrogate(out: &mut String, pending: &mut Option<u32>) {
    if pending.take().is_some() {
        out.push(char::REPLACEMENT_CHARACTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn json_object_with_integer() {
        let v = decode(r#"{"qj_contact_id": 3}"#).expect("json");
        assert_eq!(contact_id(&v), Some(3));
    }

    #[test]
    fn python_dict_with_numeric_string_and_escapes() {
        let v = decode(
            r"{'qj_contact_id': '124127953', 'qj_subject': 'voc\u00ea J\u00e1', 'n': 489166, 'ok': True, 'no': False, 'x': None}",
        )
        .expect("python literal");
        assert_eq!(contact_id(&v), Some(124127953));
        assert_eq!(v["qj_subject"], "você Já");
        assert_eq!(v["n"], 489166);
        assert_eq!(v["ok"], true);
        assert_eq!(v["no"], false);
        assert_eq!(v["x"], Value::Null);
    }

    #[test]
    fn surrogate_pairs_combine_in_both_forms() {
        let py = decode(r"{'s': 'gift \ud83c\udf81'}").expect("python");
        assert_eq!(py["s"], "gift 🎁");
        let js = decode(r#"{"s": "gift \ud83c\udf81"}"#).expect("json");
        assert_eq!(js["s"], "gift 🎁");
        let lone = decode(r"{'s': 'a\ud83cb'}").expect("lone surrogate");
        assert_eq!(lone["s"], "a\u{FFFD}b");
    }

    #[test]
    fn python_quotes_nesting_and_trailing_commas() {
        let v = decode(r#"{'a': "it's", 'b': [1, 2.5, -3,], 'c': (None,), 'd': {'e': 'f\'g'},}"#)
            .expect("python");
        assert_eq!(
            v,
            json!({"a": "it's", "b": [1, 2.5, -3], "c": [null], "d": {"e": "f'g"}})
        );
    }

    #[test]
    fn contact_id_variants() {
        assert_eq!(contact_id(&json!({"qj_contact_id": " 42 "})), Some(42));
        assert_eq!(contact_id(&json!({"qj_contact_id": 42.0})), Some(42));
        assert_eq!(contact_id(&json!({"qj_contact_id": 42.5})), None);
        assert_eq!(contact_id(&json!({"qj_contact_id": "abc"})), None);
        assert_eq!(contact_id(&json!({"qj_contact_id": null})), None);
        assert_eq!(contact_id(&json!({"other": 1})), None);
        assert_eq!(contact_id(&json!([1, 2])), None);
        assert_eq!(
            contact_id(&json!({"qj_contact_id": "99999999999999999999"})),
            None
        );
    }

    #[test]
    fn garbage_is_none() {
        for s in [
            "",
            "   ",
            "{",
            "{'a'",
            "{'a': }",
            "{'a': 1} trailing",
            "not json",
            "{'a': Truex}",
            "{[1]: 2}",
            "'\\u12'",
        ] {
            assert_eq!(decode(s), None, "{s:?}");
        }
    }

    /// Found by the `callback_data` fuzz target: this Python dict decoded to JSON text that
    /// serde_json could not read back.
    #[test]
    fn serde_raw_value_key_is_unreadable_in_both_forms() {
        for text in [
            r#"{"$serde_json::private::RawValue": True}"#,
            r#"{'a': {"$serde_json::private::RawValue": 1}}"#,
            r#"{"$serde_json::private::RawValue": true}"#,
        ] {
            assert_eq!(decode(text), None, "{text}");
            assert!(read(text).is_none(), "{text}");
        }
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert_eq!(decode(&deep), None);
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(decode(&ok).is_some());
    }

    /// Renders a JSON value as Python's `repr()` would (the form our senders produced).
    fn python_repr(v: &Value) -> String {
        match v {
            Value::Null => "None".into(),
            Value::Bool(true) => "True".into(),
            Value::Bool(false) => "False".into(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => {
                let mut out = String::from("'");
                for c in s.chars() {
                    match c {
                        '\'' => out.push_str("\\'"),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if (c as u32) < 0x20 => out.push_str(&format!("\\x{:02x}", c as u32)),
                        c if (c as u32) > 0xFFFF => {
                            // Encode as a surrogate pair, as a JSON-minded sender would.
                            let u = c as u32 - 0x10000;
                            out.push_str(&format!(
                                "\\u{:04x}\\u{:04x}",
                                0xD800 + (u >> 10),
                                0xDC00 + (u & 0x3FF)
                            ));
                        }
                        c if (c as u32) > 0x7e => out.push_str(&format!("\\u{:04x}", c as u32)),
                        c => out.push(c),
                    }
                }
                out.push('\'');
                out
            }
            Value::Array(items) => {
                format!(
                    "[{}]",
                    items.iter().map(python_repr).collect::<Vec<_>>().join(", ")
                )
            }
            Value::Object(map) => format!(
                "{{{}}}",
                map.iter()
                    .map(|(k, v)| format!(
                        "{}: {}",
                        python_repr(&Value::String(k.clone())),
                        python_repr(v)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| Value::Number(i.into())),
            "\\PC*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("\\PC{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(s in "\\PC*") {
            let _ = decode(&s);
        }

        #[test]
        fn never_panics_on_python_like_text(s in "[{}\\[\\]()'\",:\\\\ux0-9a-fTrueFalsNo ]{0,64}") {
            let _ = decode(&s);
        }

        #[test]
        fn json_round_trips(v in arb_json()) {
            let text = serde_json::to_string(&v).expect("serialize");
            prop_assert_eq!(decode(&text), Some(v));
        }

        #[test]
        fn python_repr_round_trips(v in arb_json()) {
            let text = python_repr(&v);
            prop_assert_eq!(decode(&text), Some(v));
        }

        #[test]
        fn read_agrees_with_decode(v in arb_json(), python in any::<bool>(), id in prop_oneof![
            Just(json!(null)), any::<i64>().prop_map(|i| json!(i)), any::<i64>().prop_map(|i| json!(i.to_string())),
            Just(json!(4.0)), Just(json!(4.5)), Just(json!("x")), Just(json!([1])), Just(json!(1e300)),
        ]) {
            let mut v = v;
            if let Value::Object(m) = &mut v {
                m.insert("qj_contact_id".into(), id);
            }
            let text = if python { python_repr(&v) } else { v.to_string() };
            let slow = decode(&text);
            let fast = read(&text);
            prop_assert_eq!(fast.is_some(), slow.is_some());
            if let (Some(f), Some(s)) = (fast, slow) {
                prop_assert_eq!(f.contact_id, contact_id(&s));
                let reparsed: Value = serde_json::from_str(&f.json).expect("json text");
                prop_assert_eq!(reparsed, s);
            }
        }

        #[test]
        fn read_agrees_with_decode_on_text(s in "\\PC*") {
            let slow = decode(&s);
            let fast = read(&s);
            prop_assert_eq!(fast.as_ref().map(|f| f.contact_id), slow.as_ref().map(contact_id));
        }

        #[test]
        fn contact_id_from_either_form(id in any::<i64>(), as_string in any::<bool>(), python in any::<bool>()) {
            let v = if as_string { json!({"qj_contact_id": id.to_string()}) } else { json!({"qj_contact_id": id}) };
            let text = if python { python_repr(&v) } else { v.to_string() };
            let decoded = decode(&text).expect("decodes");
            prop_assert_eq!(contact_id(&decoded), Some(id));
        }
    }
}
