//! Shared pieces of the benchmark binaries: the `--quick` switch, statistics, the machine
//! header every table is printed under, and the seed-style sleep watchdog looplag is
//! compared with.
//!
//! Each benchmark is a plain binary (`harness = false`) that prints Markdown tables; run
//! them all with `./scripts/bench.sh` (see BENCHMARKS.md).
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `--quick` (or `LOOPLAG_BENCH_QUICK=1`): fewer rounds and shorter periods, for a smoke run.
pub fn quick() -> bool {
    std::env::args().any(|arg| arg == "--quick")
        || std::env::var("LOOPLAG_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// `full` normally, `quick` under `--quick`.
pub fn pick<T>(full: T, quick_value: T) -> T {
    if quick() {
        quick_value
    } else {
        full
    }
}

/// The build configuration, for table headers.
pub fn build_cfg() -> &'static str {
    if cfg!(tokio_unstable) {
        "--cfg tokio_unstable"
    } else {
        "stable"
    }
}

/// Prints the header of a benchmark's output: what, where, and how loaded the machine was.
pub fn header(title: &str) {
    println!("\n## {title}\n");
    println!(
        "build: {}, release profile{}; {}; load average before: {}",
        build_cfg(),
        if quick() { ", --quick" } else { "" },
        machine(),
        loadavg()
    );
    println!();
}

/// Prints the load average after the benchmark, to bracket the run.
pub fn footer() {
    println!("\nload average after: {}", loadavg());
}

/// CPU model and count.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpus} × {model}")
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The `q` quantile (0..=1) of `values` (sorted in place), nearest rank.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = (q * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

/// The median (the mean of the two middle values for an even count).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The seed-style watchdog: a task that sleeps `interval` on the runtime's timer and
/// records how late it woke up. This is what most services start with; it measures timer
/// lateness, quantised by tokio's 1 ms timer wheel, and only sees stalls of the worker it
/// happens to run on.
#[derive(Clone, Default)]
pub struct SleepWatchdog {
    /// `(woke_at, lateness)` for every wake-up.
    pub samples: Arc<Mutex<Vec<(Instant, Duration)>>>,
}

impl SleepWatchdog {
    /// Spawns the watchdog task on the current runtime; it runs until the runtime shuts
    /// down or the returned handle is aborted.
    pub fn spawn(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let samples = Arc::clone(&self.samples);
        tokio::spawn(async move {
            loop {
                let asked = Instant::now();
                tokio::time::sleep(interval).await;
                let woke = Instant::now();
                let late = woke
                    .saturating_duration_since(asked)
                    .saturating_sub(interval);
                samples.lock().unwrap().push((woke, late));
            }
        })
    }

    pub fn take(&self) -> Vec<(Instant, Duration)> {
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

/// Sleeps on the calling (non-runtime) thread, for phases of a benchmark.
pub fn pause(d: Duration) {
    std::thread::sleep(d);
}
