//! Shared by the benchmark examples (`bare_append`, `bare_insert`, `prefill`): payload templates
//! with Infobip-style message ids, and the process's own CPU time and disk writes, read from
//! `/proc` so that every figure is this process's alone, whatever else the machine is running.

#![allow(dead_code)] // each example uses a different part of it
use std::path::Path;

use rand::Rng;

/// Lowercase letters and digits: the alphabet of Infobip's `messageId`.
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A fresh 20-character message id, as Infobip makes them.
pub fn infobip_id(rng: &mut impl Rng) -> String {
    (0..20)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
}

/// A body template: the text between the `@ID@` placeholders that `bench/run.sh` writes.
pub struct Template {
    parts: Vec<String>,
}

impl Template {
    /// Reads a template file (JSON with `@ID@` where each messageId goes).
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Ok(Template {
            parts: text.split("@ID@").map(str::to_owned).collect(),
        })
    }

    /// Events per body: one per placeholder.
    pub fn events(&self) -> usize {
        self.parts.len().saturating_sub(1)
    }

    /// The body with a fresh random id in every placeholder.
    pub fn fill(&self, rng: &mut impl Rng) -> String {
        let mut out = String::with_capacity(
            self.parts.iter().map(String::len).sum::<usize>() + 20 * self.events(),
        );
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                out.push_str(&infobip_id(rng));
            }
            out.push_str(part);
        }
        out
    }
}

/// CPU time of every thread of this process so far, in nanoseconds
/// (`CLOCK_PROCESS_CPUTIME_ID`): exact at the moment of the call, where `/proc/self/stat` counts
/// 10 ms ticks and `schedstat` lags until the next scheduler tick; it includes the background
/// threads sqlx runs SQLite on.
pub fn cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// `write_bytes` of `/proc/self/io`: bytes this process caused to be written to storage.
pub fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The value at quantile `q` (0..=1) of `sorted`, or 0 when it is empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
