//! Floor of the accept path's durable write: append request bodies to a file, one `write` and
//! one `fdatasync` per group, as a group commit would, and nothing else (no SQLite, no HTTP).
//! Prints one JSON line: CPU microseconds and bytes written per body, and the latency of each
//! group's `fdatasync` (what a request waits for at least, on this disk).
//!
//! `cargo run --release --example bare_append -- --template T.json --count 20000 --group 64 --out F`
//!
//! The bodies are those `bench/run.sh` posts (a template with fresh random messageIds); they are
//! made before the clock starts, so only the write and the flush are counted.

mod support;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Body template with `@ID@` placeholders.
    #[arg(long)]
    template: PathBuf,
    /// Bodies to append.
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// Bodies per write + fdatasync (a group commit's size; wrk's connections bound it).
    #[arg(long, default_value_t = 64)]
    group: usize,
    /// The file to append to (created; removed at the end unless --keep).
    #[arg(long)]
    out: PathBuf,
    /// Keep the file.
    #[arg(long)]
    keep: bool,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let template = support::Template::load(&args.template)?;
    let mut rng = rand::thread_rng();
    // Distinct bodies, reused in turn: the same sizes as the real load without holding
    // `count` bodies in memory.
    let pool: Vec<String> = (0..1024).map(|_| template.fill(&mut rng)).collect();
    let group = args.group.max(1);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&args.out)?;

    let mut buf: Vec<u8> = Vec::new();
    let mut sync_us: Vec<f64> = Vec::with_capacity(args.count / group + 1);
    let (cpu0, wb0, t0) = (support::cpu_ns(), support::write_bytes(), Instant::now());
    let mut written = 0usize;
    while written < args.count {
        let n = group.min(args.count - written);
        buf.clear();
        for k in 0..n {
            // A length prefix frames each record, as any log needs to find them again.
            let body = pool[(written + k) % pool.len()].as_bytes();
            buf.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
            buf.extend_from_slice(body);
        }
        file.write_all(&buf)?;
        let s = Instant::now();
        file.sync_data()?;
        sync_us.push(s.elapsed().as_secs_f64() * 1e6);
        written += n;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu_us = (support::cpu_ns() - cpu0) as f64 / 1e3;
    let wb = support::write_bytes() - wb0;
    let size = file.metadata()?.len();
    drop(file);
    if !args.keep {
        std::fs::remove_file(&args.out)?;
    }
    sync_us.sort_by(f64::total_cmp);
    let per = |x: f64| x / args.count as f64;
    println!(
        "{{\"bodies\":{},\"group\":{},\"body_bytes\":{},\"wall_s\":{:.3},\"bodies_per_s\":{:.0},\
         \"cpu_us_per_body\":{:.2},\"write_bytes_per_body\":{:.0},\"file_bytes_per_body\":{:.0},\
         \"fsyncs\":{},\"fsync_p50_us\":{:.0},\"fsync_p99_us\":{:.0},\"fsync_max_us\":{:.0}}}",
        args.count,
        group,
        pool[0].len(),
        wall,
        args.count as f64 / wall,
        per(cpu_us),
        per(wb as f64),
        per(size as f64),
        sync_us.len(),
        support::quantile(&sync_us, 0.5),
        support::quantile(&sync_us, 0.99),
        sync_us.last().copied().unwrap_or(0.0)
    );
    Ok(())
}
