//! Watchdog CPU per second against the number of open idle request spans, on a busy
//! hooked two-worker runtime (so the watchdog never dozes). Ad-hoc measurement for issue 14:
//! `cargo run --release --example watchdog_open_requests`.

use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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

fn thread_named(name: &str) -> Option<String> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .find_map(|entry| {
            let entry = entry.ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == name).then(|| entry.file_name().to_string_lossy().into_owned())
        })
}

fn main() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let looplag = looplag::LoopLag::builder()
        .runtime_name("busy")
        .sample_interval(Duration::from_millis(10))
        .tracer(provider.tracer("looplag"))
        .build()
        .expect("looplag");
    tracing_subscriber::registry()
        .with(looplag.layer())
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("app")))
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    looplag.hook_runtime(&mut builder);
    let runtime = builder.build().expect("runtime");
    let watchdog = looplag.start(runtime.handle()).expect("start");
    // Busy: four requests polling every millisecond.
    for i in 0..4 {
        runtime.spawn(
            async {
                loop {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            .instrument(tracing::info_span!("active", i)),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let tid = thread_named("looplag-busy").expect("watchdog thread");
    let seconds = std::env::var("SECONDS_PER_STEP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5u64);
    println!("| open idle request spans | watchdog CPU (ms per s) |");
    println!("|---:|---:|");
    for open in [0usize, 10_000, 100_000] {
        let idle: Vec<_> = (0..open)
            .map(|i| {
                runtime.spawn(
                    async { tokio::time::sleep(Duration::from_secs(3600)).await }
                        .instrument(tracing::info_span!("request", i)),
                )
            })
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        let cpu0 = thread_cpu(&tid);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(seconds));
        let cpu = thread_cpu(&tid) - cpu0;
        let per_second = cpu.as_secs_f64() * 1e3 / t0.elapsed().as_secs_f64();
        println!("| {open} | {per_second:.3} |");
        for task in idle {
            task.abort();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(watchdog);
}
