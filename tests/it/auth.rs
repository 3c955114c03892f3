//! Webhook authentication against the real app: HTTP Basic with rotated pairs, a secret header,
//! both at once (either suffices), `/health` open, and nothing stored from a 401.

use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::app::{spawn_in_temp_dir as spawn_auth, TestApp};
use crate::common::{example, wait_for_rows};

fn basic(user_pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    )
}

/// POSTs example `name` to `/email` with the given extra headers.
async fn post_with(app: &TestApp, name: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = app
        .client
        .post(app.url("/email"))
        .header("content-type", "application/json")
        .body(example(name));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("request sent")
}

/// Asserts a 401 with the JSON error body, and whether it offers Basic.
async fn assert_401(resp: reqwest::Response, offers_basic: bool, what: &str) {
    assert_eq!(resp.status(), 401, "{what}");
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if offers_basic {
        assert!(
            challenge
                .as_deref()
                .is_some_and(|c| c.starts_with("Basic realm=\"mailhook\"")),
            "{what}: {challenge:?}"
        );
    } else {
        assert_eq!(challenge, None, "{what}: no Basic challenge without Basic");
    }
    let err: Value = resp.json().await.expect("JSON error body");
    assert_eq!(err["kind"], "unauthorized", "{what}");
}

async fn rows_of(app: &TestApp, message_id: &str) -> Vec<String> {
    app.store
        .by_id_externo(message_id)
        .await
        .expect("rows")
        .into_iter()
        .map(|r| r.callback.status)
        .collect()
}

#[tokio::test]
async fn basic_auth_refuses_missing_wrong_malformed_and_accepts_rotated_pairs() {
    let app = spawn_auth(&["--basic-auth", "old:one,new:two:with-colon"]).await;
    let refusals: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("missing", vec![]),
        ("wrong password", vec![("authorization", basic("old:two"))]),
        ("unknown user", vec![("authorization", basic("nobody:one"))]),
        ("pairs crossed", vec![("authorization", basic("new:one"))]),
        ("empty", vec![("authorization", String::new())]),
        ("no token", vec![("authorization", "Basic".into())]),
        ("not base64", vec![("authorization", "Basic !!!".into())]),
        ("no colon", vec![("authorization", basic("oldone"))]),
        ("bearer", vec![("authorization", "Bearer old:one".into())]),
        (
            "plain text",
            vec![("authorization", "Basic old:one".into())],
        ),
    ];
    for (what, headers) in &refusals {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // Valid callbacks, so only the credentials can explain a refusal.
        assert_401(post_with(&app, "opened", &h).await, true, what).await;
        assert_401(post_with(&app, "unsubscribed", &h).await, true, what).await;
    }

    // Both pairs are accepted at once: the old one keeps working while Infobip moves to the new.
    let old = basic("old:one");
    let resp = post_with(&app, "clicked", &[("authorization", &old)]).await;
    assert_eq!(resp.status(), 202, "old pair");
    let new = basic("new:two:with-colon");
    let resp = post_with(&app, "complained", &[("authorization", &new)]).await;
    assert_eq!(resp.status(), 202, "new pair");

    // Exactly the two accepted callbacks arrive; the refused ones were posted first and never
    // queued, so once these two are stored nothing else can follow.
    wait_for_rows(&app.store, 2).await;
    assert_eq!(rows_of(&app, "yfkgy9xol5kpl33u384n").await, ["CLICKED"]);
    assert_eq!(rows_of(&app, "14b734recsf69n8zkao5").await, ["COMPLAINED"]);
    assert!(rows_of(&app, "3nghqee2ktl9c6ta3z56").await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn secret_header_right_wrong_missing() {
    let app = spawn_auth(&[
        "--auth-header",
        "X-Webhook-Secret",
        "--auth-secret",
        "current-secret,next-secret",
    ])
    .await;
    assert_401(post_with(&app, "opened", &[]).await, false, "missing").await;
    let wrong = [("x-webhook-secret", "current-secre")];
    assert_401(post_with(&app, "opened", &wrong).await, false, "wrong").await;
    let case = [("x-webhook-secret", "CURRENT-SECRET")];
    assert_401(
        post_with(&app, "opened", &case).await,
        false,
        "case matters",
    )
    .await;
    let other = [("x-other", "current-secret")];
    assert_401(
        post_with(&app, "opened", &other).await,
        false,
        "other header",
    )
    .await;
    let basic_only = [("authorization", basic("u:current-secret"))];
    let h: Vec<(&str, &str)> = basic_only.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_401(
        post_with(&app, "opened", &h).await,
        false,
        "Basic not configured",
    )
    .await;

    // Header names are case-insensitive on the wire; both secrets are accepted.
    let right = [("X-Webhook-Secret", "current-secret")];
    assert_eq!(post_with(&app, "clicked", &right).await.status(), 202);
    let next = [("x-webhook-secret", "next-secret")];
    assert_eq!(post_with(&app, "complained", &next).await.status(), 202);
    wait_for_rows(&app.store, 2).await;
    assert!(rows_of(&app, "3nghqee2ktl9c6ta3z56").await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn with_both_configured_either_suffices() {
    let app = spawn_auth(&[
        "--basic-auth",
        "infobip:pw",
        "--auth-header",
        "x-webhook-secret",
        "--auth-secret",
        "hdr",
    ])
    .await;
    assert_401(post_with(&app, "opened", &[]).await, true, "neither").await;
    let wrong_both = basic("infobip:nope");
    let h = [
        ("authorization", wrong_both.as_str()),
        ("x-webhook-secret", "nope"),
    ];
    assert_401(post_with(&app, "opened", &h).await, true, "both wrong").await;

    let good_basic = basic("infobip:pw");
    let h = [("authorization", good_basic.as_str())];
    assert_eq!(post_with(&app, "clicked", &h).await.status(), 202, "Basic");
    let h = [("x-webhook-secret", "hdr")];
    assert_eq!(
        post_with(&app, "complained", &h).await.status(),
        202,
        "header"
    );
    let h = [
        ("x-webhook-secret", "nope"),
        ("authorization", good_basic.as_str()),
    ];
    assert_eq!(
        post_with(&app, "unsubscribed", &h).await.status(),
        202,
        "right Basic beside a wrong header"
    );
    wait_for_rows(&app.store, 3).await;
    assert!(rows_of(&app, "3nghqee2ktl9c6ta3z56").await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn health_stays_open_and_unknown_routes_are_404() {
    let app = spawn_auth(&["--basic-auth", "u:p"]).await;
    let resp = app
        .client
        .get(app.url("/health"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let resp = app.client.get(app.url("/nope")).send().await.expect("sent");
    assert_eq!(resp.status(), 404);
    app.stop().await;
}

/// The check runs on the headers alone: a sender announcing 16 MiB and sending none of it is
/// refused at once, not after the request deadline (which reading the body would hit).
#[tokio::test]
async fn refused_before_the_body_is_read() {
    let app = spawn_auth(&["--basic-auth", "u:p", "--request-timeout", "20"]).await;
    let mut conn = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /email HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        app.addr,
        16 * 1024 * 1024
    );
    conn.write_all(head.as_bytes()).await.expect("write head");
    let mut buf = vec![0_u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("answered before any body byte was sent")
        .expect("read");
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("www-authenticate: basic"),
        "{reply}"
    );
    drop(conn);
    app.stop().await;
}
