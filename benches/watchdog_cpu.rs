//! Watchdog cost: CPU time of an idle application (a hooked two-worker runtime with
//! nothing to do) over a fixed period, with looplag's watchdog at a 10 ms sample interval,
//! with the seed-style sleep watchdog at 10 ms, and with neither; alternated.
//!
//! Per variant: the watchdog thread's own CPU time (from `/proc/self/task/<tid>/schedstat`,
//! in ns) and how often it went to sleep (`voluntary_ctxt_switches` in its `status`), and
//! the whole process's CPU time (`getrusage`), which also counts the workers waking up to
//! run the delay probe. looplag's watchdog dozes while the runtime idles (`src/doze.rs`),
//! so it wakes far less often than every 10 ms here.

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

/// CPU time of the whole process (user + system).
fn process_cpu() -> Duration {
    // SAFETY: `getrusage` fills the struct we pass; a zeroed `rusage` is a valid value.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The thread of this process named `name`, as its `/proc/self/task` id.
fn thread_named(name: &str) -> Option<String> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .find_map(|entry| {
            let entry = entry.ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == name).then(|| entry.file_name().to_string_lossy().into_owned())
        })
}

/// How many times thread `tid` of this process went to sleep (voluntary context switches).
fn thread_sleeps(tid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time of thread `tid` of this process, in ns precision.
fn thread_cpu(tid: &str) -> Duration {
    let stat =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap_or_default();
    let ns = stat
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Neither,
    Looplag,
    Seed,
    Bare,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Neither => "no watchdog (hooked runtime, idle)",
            Variant::Looplag => "looplag watchdog, 10 ms",
            Variant::Seed => "seed sleep watchdog, 10 ms",
            Variant::Bare => "floor: a bare thread waking every 10 ms, doing nothing",
        }
    }
}

fn main() {
    let period = pick(Duration::from_secs(10), Duration::from_secs(2));
    let rounds = pick(3, 1);
    header("Watchdog cost: CPU time of an idle app");
    println!(
        "{rounds} round(s) × {:.0} s per variant, variants alternated; idle multi-thread runtime \
         with 2 workers, hooked by looplag in every variant.",
        period.as_secs_f64()
    );
    println!();

    let looplag = looplag::LoopLag::builder()
        .runtime_name("idle")
        .sample_interval(Duration::from_millis(10))
        .build()
        .expect("looplag");
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    looplag.hook_runtime(&mut builder);
    let runtime = builder.build().expect("runtime");

    let variants = [
        Variant::Neither,
        Variant::Looplag,
        Variant::Seed,
        Variant::Bare,
    ];
    let mut process: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut watchdog_thread: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut ticks: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut wakes: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        for k in 0..variants.len() {
            let index = if round % 2 == 0 {
                k
            } else {
                variants.len() - 1 - k
            };
            let variant = variants[index];
            let guard = (variant == Variant::Looplag)
                .then(|| looplag.start(runtime.handle()).expect("start"));
            let seed = (variant == Variant::Seed).then(|| {
                let _enter = runtime.enter();
                SleepWatchdog::default().spawn(Duration::from_millis(10))
            });
            let bare_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let bare = (variant == Variant::Bare).then(|| {
                let stop = std::sync::Arc::clone(&bare_stop);
                std::thread::Builder::new()
                    .name("bare-10ms".into())
                    .spawn(move || {
                        let mut next = Instant::now() + Duration::from_millis(10);
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let now = Instant::now();
                            if now < next {
                                std::thread::park_timeout(next - now);
                                continue;
                            }
                            next += Duration::from_millis(10);
                        }
                    })
                    .expect("thread")
            });
            // Let the variant settle before measuring.
            pause(Duration::from_millis(200));
            let tid = match variant {
                Variant::Looplag => thread_named("looplag-idle"),
                Variant::Bare => thread_named("bare-10ms"),
                _ => None,
            };
            let thread_before = tid.as_deref().map(thread_cpu);
            let sleeps_before = tid.as_deref().map(thread_sleeps);
            let before = process_cpu();
            let started = Instant::now();
            pause(period);
            let wall = started.elapsed();
            let used = process_cpu().saturating_sub(before);
            process[index].push(used.as_secs_f64() / wall.as_secs_f64() * 100.0);
            if let (Some(tid), Some(thread_before)) = (tid.as_deref(), thread_before) {
                let thread_used = thread_cpu(tid).saturating_sub(thread_before);
                watchdog_thread[index].push(thread_used.as_secs_f64() / wall.as_secs_f64() * 100.0);
                ticks[index].push(thread_used.as_secs_f64() * 1e6 / (wall.as_secs_f64() / 0.010));
                let slept = thread_sleeps(tid).saturating_sub(sleeps_before.unwrap_or(0));
                wakes[index].push(slept as f64 / wall.as_secs_f64());
            }
            if let Some(bare) = bare {
                bare_stop.store(true, std::sync::atomic::Ordering::Relaxed);
                bare.thread().unpark();
                let _ = bare.join();
            }
            if let Some(seed) = seed {
                seed.abort();
            }
            drop(guard);
        }
    }
    let baseline = median(&mut process[0].clone());
    println!("| variant | process CPU, % of one core | added over no watchdog | watchdog thread CPU, % of one core | watchdog CPU per 10 ms | watchdog wake-ups per second |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (index, variant) in variants.iter().enumerate() {
        let p = median(&mut process[index]);
        let (thread, tick, woke) = if !watchdog_thread[index].is_empty() {
            (
                format!("{:.3}", median(&mut watchdog_thread[index])),
                format!("{:.1} µs", median(&mut ticks[index])),
                format!("{:.0}", median(&mut wakes[index])),
            )
        } else {
            ("–".to_string(), "–".to_string(), "–".to_string())
        };
        println!(
            "| {} | {p:.3} | {:+.3} | {thread} | {tick} | {woke} |",
            variant.name(),
            p - baseline
        );
    }
    footer();
}
