//! Throughput of the pure payload logic: `infobip::normalize` on each seed example and on a
//! 2000-result delivery report (Infobip's largest bucket), and `callback_data::decode` on the
//! JSON and Python-literal forms of `callbackData`.
//!
//! `cargo bench --bench normalize`; figures are events (or decoded strings) per second.

use std::hint::black_box;
use std::path::PathBuf;

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::value::RawValue;
use serde_json::Value;

use mailhook::infobip::{self, callback_data};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/examples")
}

fn load(name: &str) -> Value {
    let path = examples_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// A delivery report of `n` results cycled from `delivered-dict.json`, each with its own
/// `messageId`, as Infobip sends in a busy campaign.
fn batch(n: usize) -> Value {
    let seed = load("delivered-dict.json");
    let results = seed["results"].as_array().expect("results").clone();
    let batch: Vec<Value> = (0..n)
        .map(|i| {
            let mut r = results[i % results.len()].clone();
            r["messageId"] = Value::String(format!("bench{i:015}"));
            r
        })
        .collect();
    serde_json::json!({ "results": batch })
}

/// The payload as the worker reads it: JSON text.
fn raw(v: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).expect("serializes")
}

fn bench_normalize(c: &mut Criterion) {
    let received = Utc
        .with_ymd_and_hms(2024, 8, 7, 11, 43, 8)
        .single()
        .expect("valid time");
    let mut names: Vec<String> = std::fs::read_dir(examples_dir())
        .expect("examples dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 8, "expected the eight seed examples");

    let mut g = c.benchmark_group("normalize");
    for name in &names {
        let payload = raw(&load(name));
        let events = infobip::normalize(&payload, received)
            .expect("example normalizes")
            .len();
        g.throughput(Throughput::Elements(events as u64));
        g.bench_function(name.trim_end_matches(".json"), |b| {
            b.iter(|| infobip::normalize(black_box(&payload), received))
        });
    }
    let big = batch(infobip::MAX_RESULTS);
    g.throughput(Throughput::Elements(infobip::MAX_RESULTS as u64));
    g.sample_size(20);
    g.bench_function("batch-2000", |b| {
        let big = raw(&big);
        b.iter(|| infobip::normalize(black_box(&big), received))
    });
    g.finish();

    // The worker's whole decode path for the batch: bytes -> JSON -> rows.
    let text = serde_json::to_vec(&big).expect("serializes");
    let mut g = c.benchmark_group("parse+normalize");
    g.throughput(Throughput::Elements(infobip::MAX_RESULTS as u64));
    g.sample_size(20);
    g.bench_function("batch-2000-from-bytes", |b| {
        b.iter(|| {
            let v: &RawValue = serde_json::from_slice(black_box(&text)).expect("json");
            infobip::normalize(v, received).expect("normalizes").len()
        })
    });
    g.finish();
}

fn bench_callback_data(c: &mut Criterion) {
    let dict = load("delivered-dict.json");
    let python = dict["results"][0]["callbackData"]
        .as_str()
        .expect("callbackData string")
        .to_owned();
    let decoded = callback_data::decode(&python).expect("python literal decodes");
    let json_long = decoded.to_string();
    let json_short = load("opened.json")["callbackData"]
        .as_str()
        .expect("callbackData string")
        .to_owned();

    let mut g = c.benchmark_group("callback_data::decode");
    g.throughput(Throughput::Elements(1));
    for (label, text) in [
        ("json-short", &json_short),
        ("json-long", &json_long),
        ("python-literal-long", &python),
    ] {
        assert!(callback_data::decode(text).is_some(), "{label} decodes");
        g.bench_function(label, |b| b.iter(|| callback_data::decode(black_box(text))));
    }
    g.finish();
}

criterion_group!(benches, bench_normalize, bench_callback_data);
criterion_main!(benches);
