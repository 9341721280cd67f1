//! Server overhead: an axum server with tower-http's `TraceLayer` and `tracing-opentelemetry`
//! (batch span processor into an in-process counting exporter), loaded on loopback by a
//! hyper client at fixed concurrency, with looplag (layer + hooked runtime + watchdog) and
//! without, alternated in one run.
//!
//! Every run is a child process of this binary (a fresh global subscriber each time); the
//! parent runs the variants in an order that rotates from round to round, so slow drift on
//! a shared machine falls evenly on all, and reports medians and the median of per-round
//! ratios. Besides requests/s and p99, it reports the process's CPU time per request,
//! which a busy neighbour on a shared machine disturbs less than throughput.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
};
use support::*;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Connections the load generator keeps open, each sending requests one after another.
const CONCURRENCY: usize = 32;

/// A span exporter that only counts: the cost of the OpenTelemetry pipeline up to the wire.
#[derive(Debug, Clone, Default)]
struct CountingExporter(Arc<AtomicU64>);

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

struct RunResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    spans_per_request: f64,
    cpu_us_per_request: f64,
    watchdog_us_per_request: f64,
}

/// What the server runs with.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// tracing-opentelemetry only.
    Without,
    /// looplag's layer added, runtime not hooked, no watchdog: the layer's own cost.
    LayerOnly,
    /// looplag as documented: layer, hooked runtime, watchdog.
    Looplag,
}

impl Variant {
    fn arg(self) -> &'static str {
        match self {
            Variant::Without => "without",
            Variant::LayerOnly => "layer-only",
            Variant::Looplag => "looplag",
        }
    }
    fn parse(arg: &str) -> Self {
        match arg {
            "layer-only" => Variant::LayerOnly,
            "looplag" | "count" => Variant::Looplag,
            _ => Variant::Without,
        }
    }
}

/// CPU time of this process's thread named `name` (from its schedstat, ns precision), in µs.
fn thread_cpu_us(name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            let ns: f64 = stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            return ns / 1e3;
        }
    }
    0.0
}

/// CPU time of the whole process (user + system), in µs.
fn process_cpu_us() -> f64 {
    // SAFETY: `getrusage` fills the struct we pass; a zeroed `rusage` is a valid value.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--paired-child") {
        let batch: usize = args[i + 1].parse().expect("batch size");
        let pairs: usize = args[i + 2].parse().expect("pair count");
        paired_child(batch, pairs);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let variant = Variant::parse(&args[i + 1]);
        let requests: usize = args[i + 2].parse().expect("request count");
        let counter = (args[i + 1] == "count").then(SpanCounter::default);
        child(variant, requests, counter);
        return;
    }
    let rounds = pick(10, 2);
    let exe = std::env::current_exe().expect("own path");
    let counts = {
        let out = Command::new(&exe)
            .args(["--child", "count", "5000"])
            .output()
            .expect("run counting child");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("COUNT ").map(str::to_string))
            .unwrap_or_default()
    };
    let requests = pick(50_000, 8_000);
    header("Server overhead: axum + TraceLayer + tracing-opentelemetry, with vs without looplag");
    println!(
        "{rounds} rounds; each round runs every variant once, each in a fresh process, in an \
         order that rotates from round to round; {requests} requests per run after 2000 warm-up \
         requests, {CONCURRENCY} keep-alive connections. Server: multi-thread runtime with 2 \
         workers; client: current-thread runtime on its own thread in the same process; spans \
         go through a batch span processor (its own thread) into a counting exporter. CPU per \
         request is the whole process's user + system time (server, client and exporter) over \
         the measured requests. Variants: without = tracing-opentelemetry only; layer only = \
         plus looplag's layer, runtime not hooked, no watchdog; looplag = layer + hooked \
         runtime + watchdog (10 ms), as documented."
    );
    println!();
    let c: Vec<f64> = counts
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if let [roots, children, outermost, nested, moved, ..] = c[..] {
        println!(
            "What looplag's hooks see per request (counted by an extra layer in a separate \
             run): {roots:.2} root spans and {children:.2} child spans created and closed; \
             {outermost:.2} span enter+exit pairs at a worker's base depth (poll boundaries) \
             and {nested:.2} nested. {:.1} % of the root spans closed on another thread than \
             the one that created them.",
            if roots > 0.0 {
                moved / roots * 100.0
            } else {
                0.0
            }
        );
        println!();
    }
    let run = |variant: Variant| -> RunResult {
        let out = Command::new(&exe)
            .args(["--child", variant.arg(), &requests.to_string()])
            .output()
            .expect("run child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("RESULT"))
            .unwrap_or_else(|| {
                panic!(
                    "child failed: {stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        RunResult {
            rps: v[0],
            p50_us: v[1],
            p99_us: v[2],
            spans_per_request: v[3],
            cpu_us_per_request: v[4],
            watchdog_us_per_request: v[5],
        }
    };
    let variants = [Variant::Without, Variant::LayerOnly, Variant::Looplag];
    println!("| round | without: req/s | looplag: req/s | ratio | without: p99 (µs) | looplag: p99 (µs) | ratio | CPU µs/req: without | layer only | looplag |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(), Vec::new(), Vec::new()];
    let mut ratios: [Vec<f64>; 5] = Default::default();
    for round in 0..rounds {
        let mut this: Vec<Option<RunResult>> = vec![None, None, None];
        for k in 0..variants.len() {
            let i = (round + k) % variants.len();
            this[i] = Some(run(variants[i]));
        }
        let [without, layer, with] = [0, 1, 2].map(|i| this[i].take().expect("ran"));
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.0} | {:.0} | {:.3} | {:.2} | {:.2} | {:.2} |",
            round + 1,
            without.rps,
            with.rps,
            with.rps / without.rps,
            without.p99_us,
            with.p99_us,
            with.p99_us / without.p99_us,
            without.cpu_us_per_request,
            layer.cpu_us_per_request,
            with.cpu_us_per_request,
        );
        ratios[0].push(with.rps / without.rps);
        ratios[1].push(with.p99_us / without.p99_us);
        ratios[2].push(with.cpu_us_per_request / without.cpu_us_per_request);
        ratios[3].push(layer.cpu_us_per_request / without.cpu_us_per_request);
        ratios[4].push(layer.rps / without.rps);
        results[0].push(without);
        results[1].push(layer);
        results[2].push(with);
    }
    let med = |runs: &[RunResult], f: fn(&RunResult) -> f64| {
        median(&mut runs.iter().map(f).collect::<Vec<_>>())
    };
    let range = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.3} … {hi:.3}")
    };
    println!();
    println!("| | without looplag | looplag layer only | looplag | looplag / without: median of per-round ratios | range of per-round ratios |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| requests/s (median) | {:.0} | {:.0} | {:.0} | {:.3} | {} |",
        med(&results[0], |r| r.rps),
        med(&results[1], |r| r.rps),
        med(&results[2], |r| r.rps),
        median(&mut ratios[0].clone()),
        range(&ratios[0]),
    );
    println!(
        "| p50 latency, µs (median) | {:.0} | {:.0} | {:.0} | | |",
        med(&results[0], |r| r.p50_us),
        med(&results[1], |r| r.p50_us),
        med(&results[2], |r| r.p50_us),
    );
    println!(
        "| p99 latency, µs (median) | {:.0} | {:.0} | {:.0} | {:.3} | {} |",
        med(&results[0], |r| r.p99_us),
        med(&results[1], |r| r.p99_us),
        med(&results[2], |r| r.p99_us),
        median(&mut ratios[1].clone()),
        range(&ratios[1]),
    );
    println!(
        "| process CPU per request, µs (median) | {:.2} | {:.2} | {:.2} | {:.3} (layer only: {:.3}) | {} |",
        med(&results[0], |r| r.cpu_us_per_request),
        med(&results[1], |r| r.cpu_us_per_request),
        med(&results[2], |r| r.cpu_us_per_request),
        median(&mut ratios[2].clone()),
        median(&mut ratios[3].clone()),
        range(&ratios[2]),
    );
    println!(
        "| looplag's watchdog thread CPU per request, ns (median) | | | {:.0} | {:.4} of the process's CPU | |",
        med(&results[2], |r| r.watchdog_us_per_request) * 1e3,
        med(&results[2], |r| r.watchdog_us_per_request) / med(&results[0], |r| r.cpu_us_per_request),
    );
    println!(
        "| spans exported per request | {:.2} | {:.2} | {:.2} | | |",
        med(&results[0], |r| r.spans_per_request),
        med(&results[1], |r| r.spans_per_request),
        med(&results[2], |r| r.spans_per_request),
    );
    println!();
    paired(&exe);
    footer();
}

/// The paired A/B: one process, looplag switched on and off between batches of requests.
fn paired(exe: &std::path::Path) {
    let batch = pick(5_000, 2_000);
    let pairs = pick(60, 10);
    println!(
        "**Paired, in one process.** Separate processes differ by more than 1 % from one \
         another on this VM, so the same comparison is also made inside one process: \
         {pairs} pairs of {batch}-request batches, looplag off then on, or on then off \
         (alternating), with 100 ms idle before each batch. Off: looplag's layer behind a \
         switch that returns at once, no watchdog (the runtime keeps looplag's park hooks, \
         2 ns per park). On: the layer runs and the watchdog ticks every 10 ms (started \
         and stopped while the server is idle, outside the measured batches). Server CPU \
         is the CPU time of every thread but the client's (the client runs on the main \
         thread), so the ratio is against the server's own cost."
    );
    println!();
    let out = Command::new(exe)
        .args(["--paired-child", &batch.to_string(), &pairs.to_string()])
        .output()
        .expect("run paired child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut cpu = Vec::new();
    let mut rps = Vec::new();
    let mut cpu_off = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with("PAIR")) {
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [off_cpu, off_rps, on_cpu, on_rps] = v[..] {
            cpu.push(on_cpu / off_cpu);
            rps.push(on_rps / off_rps);
            cpu_off.push(off_cpu);
        }
    }
    if cpu.is_empty() {
        println!(
            "paired run failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    // Standard error of the mean, and a 95 % interval (normal approximation).
    let interval = |v: &[f64]| {
        let m = mean(v);
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() as f64 - 1.0).max(1.0);
        let se = (var / v.len() as f64).sqrt();
        (m, m - 1.96 * se, m + 1.96 * se)
    };
    let (cpu_mean, cpu_lo, cpu_hi) = interval(&cpu);
    let (rps_mean, rps_lo, rps_hi) = interval(&rps);
    println!(
        "| paired, {} pairs | off | on / off: median | mean, 95 % interval | range |",
        cpu.len()
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| server CPU per request | {:.2} µs | {:.4} | {:.4} ({:.4} … {:.4}) | {:.3} … {:.3} |",
        median(&mut cpu_off.clone()),
        median(&mut cpu.clone()),
        cpu_mean,
        cpu_lo,
        cpu_hi,
        cpu.iter().cloned().fold(f64::INFINITY, f64::min),
        cpu.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    );
    println!(
        "| requests/s | | {:.4} | {:.4} ({:.4} … {:.4}) | {:.3} … {:.3} |",
        median(&mut rps.clone()),
        rps_mean,
        rps_lo,
        rps_hi,
        rps.iter().cloned().fold(f64::INFINITY, f64::min),
        rps.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    );
}

/// A layer that forwards to `inner` only while `on` is set.
struct Switch<L> {
    inner: L,
    on: Arc<std::sync::atomic::AtomicBool>,
}

impl<L, S> tracing_subscriber::Layer<S> for Switch<L>
where
    L: tracing_subscriber::Layer<S>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber);
    }
    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber);
    }
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if self.on.load(Ordering::Relaxed) {
            self.inner.on_new_span(attrs, id, ctx);
        }
    }
    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if self.on.load(Ordering::Relaxed) {
            self.inner.on_enter(id, ctx);
        }
    }
    fn on_exit(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if self.on.load(Ordering::Relaxed) {
            self.inner.on_exit(id, ctx);
        }
    }
    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if self.on.load(Ordering::Relaxed) {
            self.inner.on_close(id, ctx);
        }
    }
}

/// CPU time of every thread of this process but the calling one, in µs.
fn other_threads_cpu_us() -> f64 {
    // SAFETY: `clock_gettime` writes the timespec we pass.
    let own = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
    };
    process_cpu_us() - own
}

/// The spans' way out: a batch span processor (its own thread) into a counting exporter.
fn span_pipeline() -> (CountingExporter, SdkTracerProvider) {
    let exported = CountingExporter::default();
    let processor = BatchSpanProcessor::builder(exported.clone())
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(1 << 16)
                .with_max_export_batch_size(512)
                .with_scheduled_delay(Duration::from_millis(100))
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .build();
    (exported, provider)
}

/// Starts the axum server (one route, tower-http's `TraceLayer`) on `runtime`, on loopback.
fn serve(runtime: &tokio::runtime::Runtime) -> SocketAddr {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route("/hello", axum::routing::get(hello))
        .layer(tower_http::trace::TraceLayer::new_for_http());
    runtime.spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The paired child: prints `PAIR off-cpu-µs/req off-rps on-cpu-µs/req on-rps` per pair.
fn paired_child(batch: usize, pairs: usize) {
    let (_exported, provider) = span_pipeline();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("server"));
    let looplag = looplag::LoopLag::builder()
        .tracer(provider.tracer("looplag"))
        .build()
        .expect("looplag");
    let on = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // looplag's layer first, as its documentation says.
    tracing_subscriber::registry()
        .with(Switch {
            inner: looplag.layer(),
            on: Arc::clone(&on),
        })
        .with(otel)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    looplag.hook_runtime(&mut builder);
    let server_runtime = builder.build().expect("runtime");
    let addr = serve(&server_runtime);
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    client.block_on(load(addr, 4000));

    // One batch with looplag on or off; returns (server CPU µs per request, requests/s).
    let measure = |enabled: bool| -> (f64, f64) {
        // Switch only while the server is idle: no span is entered on a worker, so the
        // layer sees every enter with its exit.
        std::thread::sleep(Duration::from_millis(50));
        on.store(enabled, Ordering::SeqCst);
        let watchdog = enabled.then(|| looplag.start(server_runtime.handle()).expect("start"));
        std::thread::sleep(Duration::from_millis(50));
        let cpu = other_threads_cpu_us();
        let started = Instant::now();
        client.block_on(load(addr, batch));
        let elapsed = started.elapsed();
        let cpu = other_threads_cpu_us() - cpu;
        std::thread::sleep(Duration::from_millis(20));
        drop(watchdog);
        (cpu / batch as f64, batch as f64 / elapsed.as_secs_f64())
    };
    for pair in 0..pairs {
        let (off, on) = if pair % 2 == 0 {
            let off = measure(false);
            (off, measure(true))
        } else {
            let on = measure(true);
            (measure(false), on)
        };
        println!("PAIR {:.4} {:.1} {:.4} {:.1}", off.0, off.1, on.0, on.1);
    }
    on.store(false, Ordering::SeqCst);
    let _ = provider.force_flush();
}

/// One run: server + load generator in this process; prints
/// `RESULT rps p50 p99 spans/req cpu-µs/req`.
fn child(variant: Variant, requests: usize, counter: Option<SpanCounter>) {
    let (exported, provider) = span_pipeline();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("server"));

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    let (server_runtime, _watchdog) = if variant == Variant::Looplag {
        let looplag = looplag::LoopLag::builder()
            .tracer(provider.tracer("looplag"))
            .build()
            .expect("looplag");
        tracing_subscriber::registry()
            .with(otel)
            .with(looplag.layer())
            .with(counter.clone())
            .init();
        looplag.hook_runtime(&mut builder);
        let runtime = builder.build().expect("runtime");
        let watchdog = looplag.start(runtime.handle()).expect("start");
        (runtime, Some(watchdog))
    } else if variant == Variant::LayerOnly {
        let looplag = looplag::LoopLag::builder()
            .tracer(provider.tracer("looplag"))
            .build()
            .expect("looplag");
        tracing_subscriber::registry()
            .with(otel)
            .with(looplag.layer())
            .init();
        (builder.build().expect("runtime"), None)
    } else {
        tracing_subscriber::registry().with(otel).init();
        (builder.build().expect("runtime"), None)
    };

    let addr = serve(&server_runtime);

    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    client.block_on(load(addr, 2000));
    let before = exported.0.load(Ordering::Relaxed);
    let _ = provider.force_flush();
    let flushed_before = exported.0.load(Ordering::Relaxed).max(before);
    if let Some(counter) = &counter {
        counter.reset();
    }
    let cpu_before = process_cpu_us();
    let watchdog_before = thread_cpu_us("looplag-main");
    let started = Instant::now();
    let mut latencies = client.block_on(load(addr, requests));
    let elapsed = started.elapsed();
    let cpu_per_request = (process_cpu_us() - cpu_before) / requests as f64;
    let watchdog_per_request = (thread_cpu_us("looplag-main") - watchdog_before) / requests as f64;
    let _ = provider.force_flush();
    let spans = exported.0.load(Ordering::Relaxed) - flushed_before;
    if let Some(counter) = &counter {
        let per = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / requests as f64;
        println!(
            "COUNT {} {} {} {} {}",
            per(&counter.0.roots),
            per(&counter.0.children),
            per(&counter.0.outermost),
            per(&counter.0.nested),
            per(&counter.0.moved)
        );
    }
    let rps = requests as f64 / elapsed.as_secs_f64();
    let p50 = quantile(&mut latencies, 0.50);
    let p99 = quantile(&mut latencies, 0.99);
    println!(
        "RESULT {rps:.1} {p50:.1} {p99:.1} {:.3} {cpu_per_request:.3} {watchdog_per_request:.4}",
        spans as f64 / requests as f64
    );
}

/// Counts, on the server's worker threads, what looplag's hooks see: root and child spans
/// created, and span enters at a thread's base depth (poll boundaries) or nested.
#[derive(Clone, Default)]
struct SpanCounter(Arc<SpanCounts>);

#[derive(Default)]
struct SpanCounts {
    roots: AtomicU64,
    children: AtomicU64,
    outermost: AtomicU64,
    nested: AtomicU64,
    /// Root spans closed on another thread than the one that created them.
    moved: AtomicU64,
}

/// The thread that created a root span (a counting-run extension).
struct CreatedOn(std::thread::ThreadId);

thread_local! {
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl SpanCounter {
    fn reset(&self) {
        for c in [
            &self.0.roots,
            &self.0.children,
            &self.0.outermost,
            &self.0.nested,
            &self.0.moved,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// A worker thread of the server's multi-thread runtime (the client runs on this process's
/// main thread, in a current-thread runtime).
fn on_server_worker() -> bool {
    tokio::runtime::worker_index().is_some()
        && tokio::runtime::Handle::try_current().is_ok_and(|handle| {
            matches!(
                handle.runtime_flavor(),
                tokio::runtime::RuntimeFlavor::MultiThread
            )
        })
}

impl<S> tracing_subscriber::Layer<S> for SpanCounter
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        _attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if !on_server_worker() {
            return;
        }
        let Some(span) = ctx.span(id) else {
            return;
        };
        let counter = if span.parent().is_none() {
            span.extensions_mut()
                .insert(CreatedOn(std::thread::current().id()));
            &self.0.roots
        } else {
            &self.0.children
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let moved = ctx.span(&id).is_some_and(|span| {
            span.extensions()
                .get::<CreatedOn>()
                .is_some_and(|created| created.0 != std::thread::current().id())
        });
        if moved {
            self.0.moved.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_enter(&self, _id: &tracing::span::Id, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        if !on_server_worker() {
            return;
        }
        let depth = DEPTH.with(|d| d.replace(d.get() + 1));
        let counter = if depth == 0 {
            &self.0.outermost
        } else {
            &self.0.nested
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn on_exit(&self, _id: &tracing::span::Id, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        if on_server_worker() {
            DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
}

async fn hello() -> &'static str {
    // A typical handler: some work inside its own span.
    async { std::hint::black_box("hello") }
        .instrument(tracing::info_span!("handler"))
        .await
}

/// Sends `requests` GETs over `CONCURRENCY` keep-alive connections; returns each request's
/// latency in µs.
async fn load(addr: SocketAddr, requests: usize) -> Vec<f64> {
    let per_connection = requests / CONCURRENCY;
    let extra = requests % CONCURRENCY;
    let mut connections = Vec::new();
    for i in 0..CONCURRENCY {
        let count = per_connection + usize::from(i < extra);
        connections.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(connection);
            let mut latencies = Vec::with_capacity(count);
            for _ in 0..count {
                let request = hyper::Request::get("/hello")
                    .header("host", "127.0.0.1")
                    .body(Empty::<&'static [u8]>::new())
                    .expect("request");
                let sent = Instant::now();
                let response = sender.send_request(request).await.expect("response");
                assert!(response.status().is_success());
                response.into_body().collect().await.expect("body");
                latencies.push(sent.elapsed().as_secs_f64() * 1e6);
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(requests);
    for connection in connections {
        all.extend(connection.await.expect("connection task"));
    }
    all
}
