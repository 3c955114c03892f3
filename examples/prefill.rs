//! Fills `email_callback` with realistic rows, straight into the table (no API, no queue), so
//! that the ingest rate can be measured on a table that already holds millions of events.
//! Each row is what the worker would store for an event of the template, with a fresh random
//! messageId: the same columns, sizes and index keys as real traffic.
//!
//! `cargo run --release --example prefill -- --database-url sqlite://F.db --template T.json --rows 1000000`
//!
//! Each transaction's rows are sorted by message id, so that one transaction touches the index
//! pages in order: the table ends up the same, sooner.

mod support;

use std::path::PathBuf;
use std::time::Instant;

use chrono::{Duration, Utc};
use clap::Parser;
use mailhook::infobip::{self, NewCallback};
use serde_json::value::RawValue;

#[derive(Parser)]
struct Args {
    /// `sqlite://...` or `postgres://...`; migrated if needed.
    #[arg(long)]
    database_url: String,
    /// Body template with `@ID@` placeholders (its events are cycled through).
    #[arg(long)]
    template: PathBuf,
    /// Rows to add.
    #[arg(long)]
    rows: u64,
    /// Rows per transaction.
    #[arg(long, default_value_t = 20_000)]
    batch: usize,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let template = support::Template::load(&args.template)?;
    let store = mailhook::store::connect(&args.database_url, 1).await?;
    store.migrate().await?;
    let mut rng = rand::thread_rng();
    let start = Utc::now();
    let t0 = Instant::now();
    let (mut added, mut next_report) = (0u64, args.rows / 10);
    while added < args.rows {
        let want = usize::try_from(args.rows - added)
            .unwrap_or(usize::MAX)
            .min(args.batch.max(1));
        let mut rows: Vec<NewCallback> = Vec::with_capacity(want + template.events());
        while rows.len() < want {
            let body = template.fill(&mut rng);
            let raw: &RawValue = serde_json::from_str(&body)?;
            // Received over the past weeks, a second apart, as a long-running table would be.
            let received =
                start - Duration::seconds(i64::try_from(added).unwrap_or(0) + rows.len() as i64);
            rows.extend(infobip::normalize(raw, received)?);
        }
        rows.truncate(want);
        rows.sort_unstable_by(|a, b| a.id_externo.cmp(&b.id_externo));
        store.insert_batch(&rows).await?;
        added += rows.len() as u64;
        if added >= next_report {
            eprintln!(
                "prefill: {added} rows, {:.0} rows/s",
                added as f64 / t0.elapsed().as_secs_f64()
            );
            next_report += (args.rows / 10).max(1);
        }
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "{{\"rows\":{added},\"seconds\":{s:.1},\"rows_per_s\":{:.0},\"table_rows\":{}}}",
        added as f64 / s,
        store.count().await?
    );
    Ok(())
}
