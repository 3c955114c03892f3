//! The benchmark ceiling: a bare axum server whose one handler, `POST /email`, reads the whole
//! body and answers 202. Same runtime, same HTTP stack as mailhook, none of its work.
//!
//! `cargo run --release --example bare_axum -- 127.0.0.1:5999` (or `BARE_AXUM_BIND=...`).

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;

async fn email(body: Bytes) -> StatusCode {
    std::hint::black_box(body);
    StatusCode::ACCEPTED
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let bind = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("BARE_AXUM_BIND").ok())
        .unwrap_or_else(|| "127.0.0.1:5999".to_owned());
    let app = Router::new()
        .route("/email", post(email))
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024 * 1024));
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    eprintln!("bare_axum listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
