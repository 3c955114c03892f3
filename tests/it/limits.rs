//! Staying up under pressure: slow senders are cut off; an overloaded queue sheds load with 503.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::app::{spawn_app, spawn_in_temp_dir};
use crate::common::{eventually, example, wait_for_rows};

#[tokio::test]
async fn a_slow_body_is_cut_off_at_the_request_deadline() {
    let app = spawn_in_temp_dir(&["--request-timeout", "1"]).await;
    let mut s = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    s.write_all(
        b"POST /email HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{",
    )
    .await
    .expect("write");
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    // Trickle one byte every 100 ms; the server must answer 408 and stop waiting.
    let reply = loop {
        tokio::select! {
            n = s.read(&mut buf) => break String::from_utf8_lossy(&buf[..n.expect("read")]).into_owned(),
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if s.write_all(b" ").await.is_err() { break String::new(); }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "slow sender was not cut off"
        );
    };
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(
        reply.contains(r#""kind":"timeout""#),
        "a JSON error body: {reply}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = spawn_app().await;
    let r = app.client.get(app.url("/nope")).send().await.expect("sent");
    assert_eq!(r.status(), 404);
    let e: serde_json::Value = r.json().await.expect("json");
    assert_eq!(e["kind"], "not_found");
    let r = app
        .client
        .get(app.url("/email"))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 405);
    let e: serde_json::Value = r.json().await.expect("json");
    assert_eq!(e["kind"], "method_not_allowed");
    app.stop().await;
}

#[tokio::test]
async fn callbacks_beyond_the_in_flight_limit_get_503_not_memory() {
    let app = spawn_in_temp_dir(&["--max-in-flight", "1"]).await;
    // One sender holds the only permit with a body that never finishes.
    let mut stalled = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    stalled
        .write_all(b"POST /email HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
        .await
        .expect("write");
    let r = eventually("a shed request", Duration::from_secs(10), || async {
        let r = app.post(example("opened")).await;
        (r.status() == 503).then_some(r)
    })
    .await;
    assert!(r.headers().contains_key("retry-after"));
    let err: serde_json::Value = r.json().await.expect("json");
    assert_eq!(err["kind"], "overloaded");
    // The permit comes back when the stalled request goes away.
    drop(stalled);
    eventually("accepted again", Duration::from_secs(10), || async {
        (app.post(example("opened")).await.status() == 202).then_some(())
    })
    .await;
    wait_for_rows(&app.store, 1).await;
    app.stop().await;
}
