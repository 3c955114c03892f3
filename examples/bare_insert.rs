//! Floor of the worker's insert: the rows of `count` callbacks, normalized before the clock
//! starts, inserted into a fresh `email_callback` (mailhook's own migrations) with mailhook's
//! own pragmas (WAL, `synchronous=FULL`), one transaction per batch, then one checkpoint so the
//! bytes that reach the table file are counted too. No queue, no fetch, no ack, no parsing.
//! Prints one JSON line: CPU microseconds and bytes written per event, and the wall time of the
//! inserts and the checkpoint (row making excluded); and, on the way, the CPU of the pure steps
//! on either side of the queue: the API's check (strict JSON read, Infobip shape, Celery
//! envelope) per body, and the worker's parse (envelope decode, normalization) per event.
//!
//! `cargo run --release --example bare_insert -- --template T.json --count 20000 --batch 256 --db F`
//!
//! `--via prepared` (the floor): one prepared single-row INSERT, reused for every row, through
//! rusqlite, synchronously, on the same bundled SQLite (rusqlite and sqlx share libsqlite3-sys),
//! with the pragmas read back from a connection opened with mailhook's own options. sqlx is not
//! used for the floor: it runs each statement on a worker thread and hands every call across
//! threads, which costs more per row than SQLite's insert itself (measured: 43 against 22 us).
//! `--via store`: mailhook's `Store::insert_batch` (multi-row INSERTs built per batch, through
//! sqlx), to separate the cost of that SQL from the rest of the worker.

mod support;

use std::path::PathBuf;

use chrono::{SecondsFormat, Utc};
use clap::{Parser, ValueEnum};
use mailhook::infobip::{self, NewCallback};
use mailhook::queue::{celery, TaskMessage};
use mailhook::store::{SqliteStore, Store};
use sqlx::{Connection, SqliteConnection};

/// Pragmas that decide what an insert costs; their values are read from mailhook's connection.
const PRAGMAS: [&str; 5] = [
    "synchronous",
    "temp_store",
    "cache_size",
    "wal_autocheckpoint",
    "busy_timeout",
];

#[derive(Clone, Copy, ValueEnum)]
enum Via {
    Prepared,
    Store,
}

#[derive(Parser)]
struct Args {
    /// Body template with `@ID@` placeholders.
    #[arg(long)]
    template: PathBuf,
    /// Callbacks (bodies) to insert.
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// Callbacks per transaction (the worker fetches up to 256 messages per batch).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// The SQLite file (must not exist; removed at the end unless --keep).
    #[arg(long)]
    db: PathBuf,
    #[arg(long, value_enum, default_value = "prepared")]
    via: Via,
    /// Keep the database.
    #[arg(long)]
    keep: bool,
}

const INSERT: &str = "INSERT INTO email_callback (status, email, data_recebimento, id_externo, \
    qj_contact_id, event_at, status_name, error_name, error_permanent, bulk_id, event_id, url, \
    country, city, callback_data, raw, dedupe_key) VALUES \
    (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
    ON CONFLICT (id_externo, dedupe_key) DO NOTHING";

/// CPU nanoseconds of the pure steps around the insert, summed over the run.
#[derive(Default)]
struct PureCpu {
    /// The API's check: strict JSON read, Infobip shape, Celery envelope.
    validate: u64,
    /// The worker's parse: envelope decode and normalization into rows.
    normalize: u64,
}

/// The rows of `n` fresh callbacks, timing the API's and the worker's pure steps on the way
/// (the bodies are made first, so making them is not counted).
fn rows(
    template: &support::Template,
    n: usize,
    cpu: &mut PureCpu,
) -> Result<Vec<NewCallback>, String> {
    let mut rng = rand::thread_rng();
    let bodies: Vec<String> = (0..n).map(|_| template.fill(&mut rng)).collect();
    let c0 = support::cpu_ns();
    let mut messages = Vec::with_capacity(n);
    for body in &bodies {
        let payload = mailhook::json::read_json(body.as_bytes()).map_err(|e| e.to_string())?;
        let callback = infobip::parse(payload).map_err(|e| e.to_string())?;
        std::hint::black_box(callback.events.len());
        messages.push(TaskMessage::for_payload(
            "mailhook.process_email_callback",
            body.as_bytes(),
            Utc::now(),
        ));
    }
    let c1 = support::cpu_ns();
    let mut out = Vec::with_capacity(n * template.events());
    for m in &messages {
        let args = celery::decode_body(&m.body).map_err(|e| e.to_string())?;
        let received = args.received_at.unwrap_or_else(Utc::now);
        out.extend(infobip::normalize(args.payload, received).map_err(|e| e.to_string())?);
    }
    cpu.validate += c1 - c0;
    cpu.normalize += support::cpu_ns() - c1;
    Ok(out)
}

/// Opens the floor's connection with the same settings as `mailhook`'s (`conn`'s), read back.
async fn floor_connection(
    db: &std::path::Path,
    conn: &mut SqliteConnection,
) -> Result<rusqlite::Connection, Box<dyn std::error::Error>> {
    let floor = rusqlite::Connection::open(db)?;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await?;
    floor.query_row(&format!("PRAGMA journal_mode = {mode}"), [], |_| Ok(()))?;
    for p in PRAGMAS {
        let v: i64 = sqlx::query_scalar(&format!("PRAGMA {p}"))
            .fetch_one(&mut *conn)
            .await?;
        // Some pragmas answer with a row when set, some do not.
        floor.execute_batch(&format!("PRAGMA {p} = {v}"))?;
    }
    Ok(floor)
}

fn insert_prepared(conn: &mut rusqlite::Connection, rows: &[NewCallback]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(INSERT)?;
        for r in rows {
            // As sqlx encodes a `DateTime<Utc>` for SQLite, so the rows are the same bytes.
            let time = |t: &chrono::DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, false);
            stmt.execute(rusqlite::params![
                r.status,
                r.email,
                time(&r.data_recebimento),
                r.id_externo,
                r.qj_contact_id,
                r.event_at.as_ref().map(time),
                r.status_name,
                r.error_name,
                r.error_permanent,
                r.bulk_id,
                r.event_id,
                r.url,
                r.country,
                r.city,
                r.callback_data,
                r.raw,
                r.dedupe_key,
            ])?;
        }
    }
    tx.commit()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.db.exists() {
        return Err(format!("{} exists; give a fresh path", args.db.display()).into());
    }
    let template = support::Template::load(&args.template)?;
    let url = format!("sqlite://{}", args.db.display());
    let store = SqliteStore::connect(&url, 1).await?;
    store.migrate().await?;
    let mut conn =
        SqliteConnection::connect_with(&mailhook::sqlite::connect_options(&url)?).await?;
    let mut floor = floor_connection(&args.db, &mut conn).await?;

    let (mut cpu, mut wall, wb0) = (0u64, 0f64, support::write_bytes());
    let mut done = 0;
    let mut pure = PureCpu::default();
    while done < args.count {
        let n = args.batch.max(1).min(args.count - done);
        let batch = rows(&template, n, &mut pure)?;
        let (c0, t0) = (support::cpu_ns(), std::time::Instant::now());
        match args.via {
            Via::Prepared => insert_prepared(&mut floor, &batch)?,
            Via::Store => {
                store.insert_batch(&batch).await?;
            }
        }
        cpu += support::cpu_ns() - c0;
        wall += t0.elapsed().as_secs_f64();
        done += n;
    }
    let (c0, t0) = (support::cpu_ns(), std::time::Instant::now());
    floor.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    cpu += support::cpu_ns() - c0;
    wall += t0.elapsed().as_secs_f64();
    let wb = support::write_bytes() - wb0;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM email_callback")
        .fetch_one(&mut conn)
        .await?;
    let size = std::fs::metadata(&args.db)?.len();
    drop((conn, floor, store));
    if !args.keep {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", args.db.display()));
        }
    }
    let events = stored.max(1) as f64;
    println!(
        "{{\"via\":\"{}\",\"callbacks\":{},\"events\":{},\"batch\":{},\"wall_s\":{:.3},\
         \"cpu_us_per_event\":{:.2},\"write_bytes_per_event\":{:.0},\"db_bytes_per_event\":{:.0},\
         \"validate_us_per_body\":{:.2},\"normalize_us_per_event\":{:.2}}}",
        match args.via {
            Via::Prepared => "prepared",
            Via::Store => "store",
        },
        args.count,
        stored,
        args.batch,
        wall,
        cpu as f64 / 1e3 / events,
        wb as f64 / events,
        size as f64 / events,
        pure.validate as f64 / 1e3 / args.count as f64,
        pure.normalize as f64 / 1e3 / events
    );
    Ok(())
}
