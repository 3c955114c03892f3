use super::*;
use chrono::TimeZone;
use proptest::prelude::*;
use serde_json::{json, Value};

/// The payload as text, as the API and the worker read it (written compactly by `Value`).
fn raw(v: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).expect("JSON")
}

fn normalize(v: &Value, received_at: DateTime<Utc>) -> Result<Vec<NewCallback>, PayloadError> {
    super::normalize(&raw(v), received_at)
}

/// How many events `parse` finds in `v`.
fn parse(v: &Value) -> Result<usize, PayloadError> {
    super::parse(&raw(v)).map(|c| c.events.len())
}

fn example(name: &str) -> Value {
    let text = match name {
        "delivered" => include_str!("../../tests/fixtures/examples/delivered.json"),
        "undeliverable" => include_str!("../../tests/fixtures/examples/undeliverable.json"),
        "suppressed-bounce" => include_str!("../../tests/fixtures/examples/suppressed-bounce.json"),
        "delivered-dict" => include_str!("../../tests/fixtures/examples/delivered-dict.json"),
        "opened" => include_str!("../../tests/fixtures/examples/opened.json"),
        "clicked" => include_str!("../../tests/fixtures/examples/clicked.json"),
        "unsubscribed" => include_str!("../../tests/fixtures/examples/unsubscribed.json"),
        "complained" => include_str!("../../tests/fixtures/examples/complained.json"),
        other => panic!("no example {other}"),
    };
    serde_json::from_str(text).expect("example is JSON")
}

fn received() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 7, 16, 20, 30, 0)
        .single()
        .expect("valid time")
}

fn utc(s: &str) -> Option<DateTime<Utc>> {
    Some(
        DateTime::parse_from_rfc3339(s)
            .expect("test time")
            .with_timezone(&Utc),
    )
}

/// The columns we expect, minus `raw` and `dedupe_key` (checked by `check`).
#[derive(Debug, PartialEq)]
struct Expected<'a> {
    status: &'a str,
    email: Option<&'a str>,
    id_externo: &'a str,
    qj_contact_id: Option<i64>,
    event_at: Option<DateTime<Utc>>,
    status_name: Option<&'a str>,
    error_name: Option<&'a str>,
    error_permanent: Option<bool>,
    bulk_id: Option<&'a str>,
    event_id: Option<&'a str>,
    url: Option<&'a str>,
    country: Option<&'a str>,
    city: Option<&'a str>,
}

fn delivered(
    status: &'static str,
    id: &'static str,
    to: &'static str,
    contact: i64,
    at: &str,
    bulk: &'static str,
) -> Expected<'static> {
    Expected {
        status,
        email: Some(to),
        id_externo: id,
        qj_contact_id: Some(contact),
        event_at: utc(at),
        status_name: Some("DELIVERED_TO_HANDSET"),
        error_name: Some("NO_ERROR"),
        error_permanent: Some(false),
        bulk_id: Some(bulk),
        event_id: None,
        url: None,
        country: None,
        city: None,
    }
}

fn check(name: &str, expected: Vec<Expected<'_>>) -> Vec<NewCallback> {
    let payload = example(name);
    let rows = normalize(&payload, received()).expect("example normalizes");
    let got: Vec<Expected<'_>> = rows
        .iter()
        .map(|r| Expected {
            status: &r.status,
            email: r.email.as_deref(),
            id_externo: &r.id_externo,
            qj_contact_id: r.qj_contact_id,
            event_at: r.event_at,
            status_name: r.status_name.as_deref(),
            error_name: r.error_name.as_deref(),
            error_permanent: r.error_permanent,
            bulk_id: r.bulk_id.as_deref(),
            event_id: r.event_id.as_deref(),
            url: r.url.as_deref(),
            country: r.country.as_deref(),
            city: r.city.as_deref(),
        })
        .collect();
    assert_eq!(got, expected, "{name}");
    let events: Vec<Value> = match payload.get("results") {
        Some(Value::Array(list)) => list.clone(),
        _ => vec![payload.clone()],
    };
    for (row, event) in rows.iter().zip(&events) {
        assert_eq!(row.data_recebimento, received(), "{name}: received time");
        let raw: Value = serde_json::from_str(&row.raw).expect("raw is JSON");
        assert_eq!(&raw, event, "{name}: raw keeps the whole event");
        let cb: Value = serde_json::from_str(row.callback_data.as_deref().expect("callbackData"))
            .expect("callback_data is JSON");
        assert_eq!(
            callback_data::contact_id(&cb),
            row.qj_contact_id,
            "{name}: decoded callbackData"
        );
        assert_eq!(row.dedupe_key.len(), 64);
    }
    rows
}

#[test]
fn example_delivered() {
    check(
        "delivered",
        vec![delivered(
            "DELIVERED",
            "yfkgy9xol5kpl33u384n",
            "joao.madero@quite.com.br",
            3,
            "2024-07-16T20:26:54.966Z",
            "7dy3rajfsn3en76hsztl",
        )],
    );
}

#[test]
fn example_undeliverable() {
    check(
        "undeliverable",
        vec![Expected {
            status: "UNDELIVERABLE",
            email: Some("joao.madero@quite.com.br"),
            id_externo: "vzl7uvqhq7lt1fa66718",
            qj_contact_id: Some(3),
            event_at: utc("2024-07-16T20:15:21.288Z"),
            status_name: Some("UNDELIVERABLE_REJECTED_OPERATOR"),
            error_name: Some("EC_SENDER_ADDRESS_INVALID"),
            error_permanent: Some(true),
            bulk_id: Some("u38ifa6y5hsjyacodpyn"),
            event_id: None,
            url: None,
            country: None,
            city: None,
        }],
    );
}

#[test]
fn example_suppressed_bounce_is_a_bare_result() {
    let rows = check(
        "suppressed-bounce",
        vec![Expected {
            status: "UNDELIVERABLE",
            email: Some("paulorobetovlopes@hotmail.com"),
            id_externo: "1955tld5lqf3mn9ou3tz",
            qj_contact_id: Some(310372388),
            event_at: utc("2024-09-03T18:10:44.395Z"),
            status_name: Some("UNDELIVERABLE_REJECTED_OPERATOR"),
            error_name: Some("EC_SUPPRESSED_BOUNCE"),
            error_permanent: Some(true),
            bulk_id: Some("svulxb6rjqajapkmvyvy"),
            event_id: None,
            url: None,
            country: None,
            city: None,
        }],
    );
    let cb: Value =
        serde_json::from_str(rows[0].callback_data.as_deref().unwrap_or_default()).expect("json");
    assert_eq!(
        cb["qj_subject"],
        "Paulo, você foi contemplado com uma condição especial Geru! 🎁"
    );
    assert_eq!(cb["qj_firing_id"], 485456);
}

#[test]
fn example_delivered_dict_python_literal_callback_data() {
    let at = |ms: &str| format!("2024-08-07T11:43:07.{ms}Z");
    let rows = check(
        "delivered-dict",
        vec![
            delivered(
                "DELIVERED",
                "jymy9kls8qx59blkizg4",
                "xbbvalle@mail.com",
                124127953,
                &at("621"),
                "fsfrqsxr66vigdfltnpz",
            ),
            delivered(
                "DELIVERED",
                "e8d7z6zlm8o88t7k58qi",
                "thiagocsfoz@mail.com",
                111372120,
                &at("547"),
                "u13d2uoz3z4j43kbdyfu",
            ),
            delivered(
                "DELIVERED",
                "1ruocbp8ccqv1sx2k7uy",
                "lgg.noia@mail.com",
                208821129,
                &at("564"),
                "p7tfqzt6kiaj2sabheaj",
            ),
            delivered(
                "DELIVERED",
                "rap1yuru9sy6rktvgq77",
                "thiagogiatti0@mail.com",
                277652016,
                &at("575"),
                "k1msf8rhepnazoi52c7c",
            ),
            delivered(
                "DELIVERED",
                "hikah5b6b3hfqocz5bux",
                "luisgomes@mail.com",
                261041888,
                &at("582"),
                "mprhxcn1g79hhi4hyops",
            ),
        ],
    );
    let cb: Value =
        serde_json::from_str(rows[0].callback_data.as_deref().unwrap_or_default()).expect("json");
    assert_eq!(
        cb["qj_subject"],
        "Alexandre, agora você pode contar com a QuiteJá para dar adeus a pendência Geru!"
    );
}

fn tracking(
    status: &'static str,
    id: &'static str,
    to: &'static str,
    at: &str,
    bulk: &'static str,
    url: Option<&'static str>,
    geo: Option<(&'static str, &'static str)>,
) -> Expected<'static> {
    Expected {
        status,
        email: Some(to),
        id_externo: id,
        qj_contact_id: Some(3),
        event_at: utc(at),
        status_name: None,
        error_name: None,
        error_permanent: None,
        bulk_id: Some(bulk),
        event_id: None,
        url,
        country: geo.map(|g| g.0),
        city: geo.map(|g| g.1),
    }
}

#[test]
fn example_opened() {
    check(
        "opened",
        vec![tracking(
            "OPENED",
            "3nghqee2ktl9c6ta3z56",
            "joao.madero@quite.com.br",
            "2024-07-16T20:24:04.325Z",
            "o22v6rmvov7bdigol2n4",
            None,
            Some(("United States", "Mountain View")),
        )],
    );
}

#[test]
fn example_clicked() {
    check(
        "clicked",
        vec![tracking(
            "CLICKED",
            "yfkgy9xol5kpl33u384n",
            "joao.madero@quite.com.br",
            "2024-07-16T20:27:20.510Z",
            "7dy3rajfsn3en76hsztl",
            Some("www.google.com?utm_medium=email"),
            Some(("Brazil", "Sao Paulo")),
        )],
    );
}

#[test]
fn example_unsubscribed_uses_geo_location() {
    check(
        "unsubscribed",
        vec![tracking(
            "UNSUBSCRIBED",
            "14b734recsf69n8zkao5",
            "john.doe@some-domain.com",
            "2024-01-01T11:00:00Z",
            "ikzzmbhu6223bxkhmyrj",
            None,
            Some(("United States", "Los Angeles")),
        )],
    );
}

#[test]
fn example_complained() {
    check(
        "complained",
        vec![tracking(
            "COMPLAINED",
            "14b734recsf69n8zkao5",
            "john.doe@some-domain.com",
            "2024-01-01T11:00:00Z",
            "ikzzmbhu6223bxkhmyrj",
            None,
            None,
        )],
    );
}

fn key(payload: &Value) -> String {
    normalize(payload, received()).expect("valid")[0]
        .dedupe_key
        .clone()
}

#[test]
fn dedupe_keys_separate_genuine_events_and_join_redeliveries() {
    let opened = example("opened");
    let later = Utc
        .with_ymd_and_hms(2030, 1, 1, 0, 0, 0)
        .single()
        .expect("time");
    // A redelivery, received later, is the same event.
    assert_eq!(
        key(&opened),
        normalize(&opened, later).expect("valid")[0].dedupe_key
    );
    // A second open a minute later is another event.
    let mut again = opened.clone();
    again["sendDateTime"] = json!(1721161444325_i64 + 60_000);
    assert_ne!(key(&opened), key(&again));
    // UNSUBSCRIBED and COMPLAINED of one message at one instant are two events.
    assert_ne!(key(&example("unsubscribed")), key(&example("complained")));
    // DELIVERED and CLICKED of one message are two events.
    assert_ne!(key(&example("delivered")), key(&example("clicked")));
    // Two clicks at one instant on different links are two events.
    let mut other_link = example("clicked");
    other_link["url"] = json!("https://example.com/other");
    assert_ne!(key(&example("clicked")), key(&other_link));
}

#[test]
fn event_id_is_the_dedupe_key_when_present() {
    let mut a = example("opened");
    a["eventId"] = json!("evt-1");
    let mut b = a.clone();
    b["sendDateTime"] = json!(1);
    assert_eq!(key(&a), key(&b));
    let mut c = a.clone();
    c["eventId"] = json!("evt-2");
    assert_ne!(key(&a), key(&c));
    assert_eq!(
        normalize(&a, received()).expect("valid")[0]
            .event_id
            .as_deref(),
        Some("evt-1")
    );
}

#[test]
fn numeric_message_id_and_new_notification_types() {
    let payload =
        json!({"notificationType": "LATE_BOUNCE", "messageId": 12345, "recipient": "a@b.c"});
    let rows = normalize(&payload, received()).expect("valid");
    assert_eq!(rows[0].status, "LATE_BOUNCE");
    assert_eq!(rows[0].id_externo, "12345");
    assert_eq!(rows[0].qj_contact_id, None);
    assert_eq!(rows[0].callback_data, None);
    assert_eq!(rows[0].event_at, None);
    let future = json!({"notificationType": "SOMETHING_NEW", "messageId": "m"});
    assert_eq!(
        normalize(&future, received()).expect("valid")[0].status,
        "SOMETHING_NEW"
    );
}

#[test]
fn unreadable_callback_data_still_stores_the_event() {
    let mut p = example("delivered");
    p["results"][0]["callbackData"] = json!("{'qj_contact_id': oops");
    let row = &normalize(&p, received()).expect("valid")[0];
    assert_eq!(row.qj_contact_id, None);
    assert_eq!(row.callback_data, None);
    assert!(row.raw.contains("oops"));
}

#[test]
fn not_callbacks_are_refused_with_a_reason() {
    let cases = [
        (json!(null), PayloadError::NotAnObject("null")),
        (json!([1]), PayloadError::NotAnObject("an array")),
        (json!("x"), PayloadError::NotAnObject("a string")),
        (json!({}), PayloadError::NotACallback),
        (json!({"foo": 1}), PayloadError::NotACallback),
        (
            json!({"results": "x"}),
            PayloadError::ResultsNotAList("a string"),
        ),
        (
            json!({"results": {}}),
            PayloadError::ResultsNotAList("an object"),
        ),
        (json!({"results": []}), PayloadError::NoResults),
        (
            json!({"results": [{}]}),
            PayloadError::InResult(0, Box::new(PayloadError::NeitherMessageIdNorStatus)),
        ),
        (
            json!({"results": [{"messageId": "m", "status": {"groupName": "DELIVERED"}}, 3]}),
            PayloadError::InResult(1, Box::new(PayloadError::ResultNotAnObject("a number"))),
        ),
        (
            json!({"results": [{"messageId": "m"}]}),
            PayloadError::InResult(0, Box::new(PayloadError::BadStatus)),
        ),
        (
            json!({"results": [{"status": {"groupName": "DELIVERED"}}]}),
            PayloadError::InResult(0, Box::new(PayloadError::MissingMessageId)),
        ),
        (
            json!({"notificationType": "OPENED"}),
            PayloadError::MissingMessageId,
        ),
        (
            json!({"notificationType": "OPENED", "messageId": ""}),
            PayloadError::BadMessageId,
        ),
        (
            json!({"notificationType": "OPENED", "messageId": [1]}),
            PayloadError::BadMessageId,
        ),
        (
            json!({"notificationType": "", "messageId": "m"}),
            PayloadError::BadNotificationType,
        ),
        (
            json!({"notificationType": 7, "messageId": "m"}),
            PayloadError::BadNotificationType,
        ),
    ];
    for (payload, expected) in cases {
        assert_eq!(parse(&payload).unwrap_err(), expected, "{payload}");
    }
    let many =
        json!({"results": vec![json!({"messageId": "m", "status": "DELIVERED"}); MAX_RESULTS + 1]});
    assert_eq!(
        parse(&many).unwrap_err(),
        PayloadError::TooManyResults(MAX_RESULTS + 1)
    );
}

#[test]
fn the_largest_bucket_is_accepted() {
    let result = example("delivered")["results"][0].clone();
    let payload = json!({"results": vec![result; MAX_RESULTS]});
    assert_eq!(
        normalize(&payload, received()).expect("valid").len(),
        MAX_RESULTS
    );
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| Value::Number(i.into())),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("results"),
            Just("notificationType"),
            Just("messageId"),
            Just("status"),
            Just("groupName"),
            Just("callbackData"),
            Just("doneAt"),
            Just("sendDateTime"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    let key = prop_oneof![
        Just("results".to_owned()),
        Just("notificationType".to_owned()),
        Just("messageId".to_owned()),
        Just("status".to_owned()),
        Just("groupName".to_owned()),
        Just("callbackData".to_owned()),
        Just("doneAt".to_owned()),
        Just("sendDateTime".to_owned()),
        Just("eventId".to_owned()),
        Just("error".to_owned()),
        Just("geoLocation".to_owned()),
        "\\PC{0,6}",
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn normalize_never_panics_and_agrees_with_parse(v in arb_json()) {
        match (parse(&v), normalize(&v, received())) {
            (Ok(events), Ok(rows)) => {
                prop_assert_eq!(events, rows.len());
                for r in rows {
                    prop_assert!(!r.status.is_empty());
                    prop_assert!(!r.id_externo.is_empty());
                }
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "parse {:?} vs normalize {:?}", a.is_ok(), b.is_ok()),
        }
    }

    #[test]
    fn any_message_id_and_status_is_stored(id in "[A-Za-z0-9]{1,30}", status in "[A-Z_]{1,20}", n in 1usize..20) {
        let payload = json!({"results": vec![json!({"messageId": id, "status": {"groupName": status}}); n]});
        let rows = normalize(&payload, received()).expect("valid");
        prop_assert_eq!(rows.len(), n);
        prop_assert!(rows.iter().all(|r| r.id_externo == id && r.status == status));
    }
}

/// Found by the `callback_data` fuzz target: the JSON text stored for a long number (4.000004e31)
/// read back one ULP off (4.0000040000000003e31) under serde_json's default, approximate float
/// parser; the `float_roundtrip` feature makes parsing exact, so stored JSON reads back unchanged.
#[test]
fn long_numbers_read_back_exactly() {
    for text in [
        "0000004000004000000000000000000000000",
        "333333333333333333333333333333333323333333",
        "{'n': 4.000004e31, 'm': 0.30000000000000004}",
    ] {
        let v = callback_data::decode(text).expect("decodes");
        let stored = v.to_string();
        let back: Value = serde_json::from_str(&stored).expect("stored text is JSON");
        assert_eq!(back, v, "{text}");
    }
    let payload = json!({"notificationType": "OPENED", "messageId": "m",
        "callbackData": "{'qj_contact_id': 7, 'n': 0000004000004000000000000000000000000}"});
    let rows = normalize(&payload, received()).expect("normalizes");
    let cb: Value =
        serde_json::from_str(rows[0].callback_data.as_deref().expect("decoded")).expect("JSON");
    assert_eq!(cb["n"].as_f64(), Some(4.000004e30));
    assert_eq!(rows[0].qj_contact_id, Some(7));
}
