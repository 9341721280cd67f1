//! Collector faults: the demo's application and OTLP pipeline (gRPC, exporters on their own
//! runtime) keep working when the collector is absent, black-holes the connection, or is
//! stopped and restarted mid-run.
//!
//! Each test drives the demo's server (a hooked current-thread runtime) with two clients on
//! threads and runtimes of their own: a probe sending `/fast` one request at a time, every
//! 5 ms, whose latency is measured, and an injector sending `/block?ms=120` (a 120 ms stall,
//! threshold 50 ms) every 600 ms. A probe whose request was in flight at any moment of a
//! stall request is marked "overlapped" and left out of the latency comparison: the stall
//! itself delays it, identically with or without a collector. What the comparison can catch is
//! latency the *faulty collector* adds: export work or waits on the application's runtime.
//!
//! Measured and asserted, against a phase with a healthy `rotel` in the same process:
//! - latency of the non-overlapped probes, with tolerances for a shared 2-core machine:
//!   p50 within 2× + 2 ms, p99 within 3× + 50 ms and the mean within 2× + 5 ms of the healthy
//!   phase's (the mean catches rare long waits that percentiles miss: an export blocking the
//!   app runtime for its 1 s timeout a few times would add several ms to it); every probe
//!   answered, and at least a third of the healthy phase's probe rate;
//! - the watchdog keeps detecting the injected stalls (`on_stall` first reports);
//! - live heap bytes (a counting global allocator: the whole process, looplag, the OTel SDK,
//!   the exporters, the app) stay bounded through the fault: the mean over the last quarter
//!   of the 8 s fault phase is within [`MAX_HEAP_GROWTH`] of the mean over its second
//!   quarter;
//! - shutting the telemetry pipeline down while the collector is faulty returns within
//!   [`MAX_SHUTDOWN`] (export timeout 1 s; the SDK itself gives up waiting for a hung export
//!   after 5 s per provider, which this bound catches).
//!
//! After the restart, a stall injected after rotel came back (its `/block` request carries
//! `phase=after`) arrives as a stall span, and the metrics arrive again, with the stalls
//! counted during the outage.

mod common;
mod support;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use looplag::{StallState, Watchdog};
use support::rotel::{self, Collector, Dump};
use support::telemetry::{OtlpTarget, Protocol, Settings, Telemetry};
use support::{app, Server};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;

// ---- live heap bytes of the whole process ------------------------------------------------

#[path = "counting_alloc/mod.rs"]
mod counting_alloc;

#[global_allocator]
static ALLOCATOR: counting_alloc::Counting = counting_alloc::Counting;

use counting_alloc::live_bytes;

// ---- settings and tolerances -----------------------------------------------------------

/// The OTLP exporters' timeout (retries included) in these tests.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(1);
/// Each injected stall: `/block?ms=120`, against looplag's default 50 ms threshold (a
/// margin that a loaded machine's scheduling does not eat).
const STALL_MS: u64 = 120;
const STALL_EVERY: Duration = Duration::from_millis(600);
const PROBE_EVERY: Duration = Duration::from_millis(5);
/// How long the collector gets to show what was sent (export + a loaded machine).
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(20);
const HEALTHY_PHASE: Duration = Duration::from_secs(4);
const FAULT_PHASE: Duration = Duration::from_secs(8);

/// Live heap growth allowed between the second and the last quarter of the fault phase
/// (means over 2 s each, which smooths the sawtooth of the span queue). What legitimately
/// moves it: the batch span processor's queue (bounded at 2048 spans, emptied every 200 ms,
/// or every export timeout while black-holed: a few hundred KiB up and down), the demo's
/// table of recent request lines (bounded at 4096 entries, still filling during these tests,
/// about 15 KiB a second), buffers of tokio, hyper and h2. Measured: +55 to +85 KiB; over a
/// 40 s fault the heap levels off after about 20 s. Anything that kept the spans of failed
/// exports (about 120 request spans a second, over 1 KiB each, plus the stall spans with
/// their stacks) would grow past this within the 4 s between the two quarters: a leak of
/// 1 KiB per request measured +545 KiB.
const MAX_HEAP_GROWTH: isize = 256 * 1024;

/// Shutting the pipeline down while the collector is faulty: the batch span processor may be
/// in an export (≤ the export timeout), then exports what is left (≤ the timeout); the
/// periodic metric reader likewise (4 export timeouts in all), plus 1.5 s for the rest and a
/// loaded machine. A hung export would instead make a provider's shutdown give up only after
/// the SDK's own 5 s, and the other provider needs at least its final export on top.
const MAX_SHUTDOWN: Duration = Duration::from_millis(4 * 1000 + 1500);

// ---- the application and its telemetry --------------------------------------------------

/// Counts of `on_stall` reports.
#[derive(Default)]
struct Stalls {
    /// First reports (`report_number == 1`): one per detected stall.
    detected: AtomicU64,
    /// Ended reports.
    ended: AtomicU64,
}

/// The demo's pipeline exporting over gRPC to `endpoint`, looplag, the global subscriber, and
/// the demo's server on a hooked current-thread runtime.
struct App {
    telemetry: Telemetry,
    stalls: Arc<Stalls>,
    watchdog: Watchdog,
    server: Server,
}

impl App {
    fn start(service: &str, endpoint: String) -> App {
        let settings = Settings {
            export_timeout: Some(EXPORT_TIMEOUT),
            ..support::otlp_settings(
                service,
                OtlpTarget::at(Protocol::Grpc, endpoint),
                Duration::from_millis(500),
            )
        };
        let stalls = Arc::new(Stalls::default());
        let counts = Arc::clone(&stalls);
        // The SDK's export errors (printed with the test's output); looplag's own WARN lines
        // for every stall are left out (the tests count stalls with `on_stall`).
        let log = Targets::new()
            .with_default(LevelFilter::WARN)
            .with_target("looplag", LevelFilter::OFF);
        let (telemetry, looplag) = support::otlp_pipeline(&settings, log, move |report| {
            if report.report_number == 1 {
                counts.detected.fetch_add(1, Ordering::Relaxed);
            }
            if report.state == StallState::Ended {
                counts.ended.fetch_add(1, Ordering::Relaxed);
            }
        });
        let runtime = common::current_thread(&looplag);
        let watchdog = looplag.start(runtime.handle()).expect("start looplag");
        let server = Server::start(runtime, app::AppState::default());
        App {
            telemetry,
            stalls,
            watchdog,
            server,
        }
    }

    fn detected(&self) -> u64 {
        self.stalls.detected.load(Ordering::Relaxed)
    }

    fn ended(&self) -> u64 {
        self.stalls.ended.load(Ordering::Relaxed)
    }

    /// Waits (at most 20 s) for the first stall to end: its report waits for the stack's
    /// symbols, and the first symbolization of a debug build loads its debug info (seconds,
    /// and memory that must not land in a measured phase).
    fn wait_first_ended_stall(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ended() == 0 {
            assert!(
                Instant::now() < deadline,
                "no stall ended within 20 s (detected: {})",
                self.detected()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops serving, stops the watchdog, and shuts the telemetry pipeline down; returns how
    /// long the shutdown took.
    fn finish(self) -> Duration {
        let runtime = self.server.stop();
        drop(self.watchdog);
        let started = Instant::now();
        self.telemetry.shutdown();
        let took = started.elapsed();
        drop(runtime);
        took
    }
}

// ---- load: probes and injected stalls ----------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Probe {
    phase: &'static str,
    latency: Duration,
    ok: bool,
    /// A stall request was in flight at some moment of this probe.
    overlapped: bool,
}

#[derive(Clone, Copy, Debug)]
struct HeapSample {
    phase: &'static str,
    at: Duration,
    bytes: isize,
}

/// What a [`Load`] recorded.
struct Recorded {
    probes: Vec<Probe>,
    heap: Vec<HeapSample>,
    /// Stall requests completed, by the phase they were sent in.
    injected: HashMap<&'static str, u64>,
}

impl Recorded {
    fn injected(&self, phase: &str) -> u64 {
        self.injected.get(phase).copied().unwrap_or(0)
    }
}

/// The probe, the stall injector and a heap sampler, each on its own thread.
struct Load {
    phase: Arc<Mutex<&'static str>>,
    stop: Arc<AtomicBool>,
    probes: Arc<Mutex<Vec<Probe>>>,
    heap: Arc<Mutex<Vec<HeapSample>>>,
    injected: Arc<Mutex<HashMap<&'static str, u64>>>,
    threads: Vec<JoinHandle<()>>,
}

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("HTTP client")
}

impl Load {
    fn start(server: SocketAddr, phase: &'static str) -> Load {
        let load = Load {
            phase: Arc::new(Mutex::new(phase)),
            stop: Arc::new(AtomicBool::new(false)),
            // Allocated up front: their growth would count as heap growth.
            probes: Arc::new(Mutex::new(Vec::with_capacity(20_000))),
            heap: Arc::new(Mutex::new(Vec::with_capacity(2_000))),
            injected: Arc::default(),
            threads: Vec::new(),
        };
        // Odd while a stall request is in flight; bumped at its start and at its end.
        let stall_generation = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();

        let (phase, stop, probes, generation) = (
            Arc::clone(&load.phase),
            Arc::clone(&load.stop),
            Arc::clone(&load.probes),
            Arc::clone(&stall_generation),
        );
        threads.push(spawn("probe", move || {
            client_runtime().block_on(async move {
                let client = client();
                let url = format!("http://{server}/fast");
                while !stop.load(Ordering::Relaxed) {
                    let phase = *lock(&phase);
                    let before = generation.load(Ordering::SeqCst);
                    let started = Instant::now();
                    let ok = match client.get(&url).send().await {
                        Ok(response) => {
                            response.status().is_success() && response.text().await.is_ok()
                        }
                        Err(_) => false,
                    };
                    let latency = started.elapsed();
                    let after = generation.load(Ordering::SeqCst);
                    lock(&probes).push(Probe {
                        phase,
                        latency,
                        ok,
                        overlapped: before % 2 == 1 || after != before,
                    });
                    tokio::time::sleep(PROBE_EVERY).await;
                }
            });
        }));

        let (phase, stop, injected, generation) = (
            Arc::clone(&load.phase),
            Arc::clone(&load.stop),
            Arc::clone(&load.injected),
            Arc::clone(&stall_generation),
        );
        threads.push(spawn("stall-injector", move || {
            client_runtime().block_on(async move {
                let client = client();
                while !stop.load(Ordering::Relaxed) {
                    let phase = *lock(&phase);
                    let url = format!("http://{server}/block?ms={STALL_MS}&phase={phase}");
                    generation.fetch_add(1, Ordering::SeqCst);
                    let ok = match client.get(&url).send().await {
                        Ok(response) => response.status().is_success(),
                        Err(_) => false,
                    };
                    generation.fetch_add(1, Ordering::SeqCst);
                    assert!(ok, "the stall request {url} was answered");
                    *lock(&injected).entry(phase).or_default() += 1;
                    tokio::time::sleep(STALL_EVERY).await;
                }
            });
        }));

        let (phase, stop, heap) = (
            Arc::clone(&load.phase),
            Arc::clone(&load.stop),
            Arc::clone(&load.heap),
        );
        threads.push(spawn("heap-sampler", move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let sample = HeapSample {
                    phase: *lock(&phase),
                    at: started.elapsed(),
                    bytes: live_bytes(),
                };
                lock(&heap).push(sample);
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
        Load { threads, ..load }
    }

    fn set_phase(&self, phase: &'static str) {
        *lock(&self.phase) = phase;
    }

    /// Stops the clients and the sampler; returns what they recorded.
    fn stop(mut self) -> Recorded {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            thread.join().expect("a load thread panicked");
        }
        Recorded {
            probes: lock(&self.probes).clone(),
            heap: lock(&self.heap).clone(),
            injected: lock(&self.injected).clone(),
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn a load thread")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

// ---- statistics and checks ---------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Latency {
    clean: usize,
    failed: usize,
    /// Non-overlapped probes per second of the phase.
    rate: f64,
    p50: Duration,
    p99: Duration,
    mean: Duration,
    /// p99 of every probe of the phase, overlapped ones included (printed only).
    p99_all: Duration,
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

fn latency(probes: &[Probe], phase: &str, length: Duration) -> Latency {
    let of_phase: Vec<&Probe> = probes.iter().filter(|p| p.phase == phase).collect();
    let mut clean: Vec<Duration> = of_phase
        .iter()
        .filter(|p| p.ok && !p.overlapped)
        .map(|p| p.latency)
        .collect();
    clean.sort();
    let mut all: Vec<Duration> = of_phase.iter().map(|p| p.latency).collect();
    all.sort();
    Latency {
        clean: clean.len(),
        failed: of_phase.iter().filter(|p| !p.ok).count(),
        rate: clean.len() as f64 / length.as_secs_f64(),
        p50: percentile(&clean, 0.5),
        p99: percentile(&clean, 0.99),
        mean: clean.iter().sum::<Duration>() / u32::try_from(clean.len().max(1)).unwrap_or(1),
        p99_all: percentile(&all, 0.99),
    }
}

/// Asserts that the probes of `fault` fared as well as those of `healthy`, within the
/// tolerances stated at the top of this file.
fn check_latency(probes: &[Probe], healthy: (&str, Duration), fault: (&str, Duration)) {
    let base = latency(probes, healthy.0, healthy.1);
    let hurt = latency(probes, fault.0, fault.1);
    for (phase, stats) in [(healthy.0, &base), (fault.0, &hurt)] {
        println!(
            "probe latency during {phase}: p50 {:?}, p99 {:?}, mean {:?} ({} probes outside \
             stalls, {:.0}/s); p99 of all probes {:?}",
            stats.p50, stats.p99, stats.mean, stats.clean, stats.rate, stats.p99_all
        );
    }
    for (phase, stats) in [(healthy.0, &base), (fault.0, &hurt)] {
        assert_eq!(stats.failed, 0, "every probe answered in phase {phase}");
        assert!(
            stats.clean >= 100,
            "at least 100 probes outside stalls in phase {phase}: {stats:?}"
        );
    }
    let p50_bound = base.p50 * 2 + Duration::from_millis(2);
    assert!(
        hurt.p50 <= p50_bound,
        "probe p50 during {} ({:?}) within 2× + 2 ms of {} ({:?})",
        fault.0,
        hurt.p50,
        healthy.0,
        base.p50
    );
    let p99_bound = base.p99 * 3 + Duration::from_millis(50);
    assert!(
        hurt.p99 <= p99_bound,
        "probe p99 during {} ({:?}) within 3× + 50 ms of {} ({:?})",
        fault.0,
        hurt.p99,
        healthy.0,
        base.p99
    );
    let mean_bound = base.mean * 2 + Duration::from_millis(5);
    assert!(
        hurt.mean <= mean_bound,
        "mean probe latency during {} ({:?}) within 2× + 5 ms of {} ({:?})",
        fault.0,
        hurt.mean,
        healthy.0,
        base.mean
    );
    assert!(
        hurt.rate >= base.rate / 3.0,
        "the app keeps serving: {:.0} probes/s during {} against {:.0} during {}",
        hurt.rate,
        fault.0,
        base.rate,
        healthy.0
    );
}

/// Mean live heap bytes over the samples of `phase` taken within `window` (offsets from
/// the phase's first sample).
fn mean_heap(samples: &[&HeapSample], window: std::ops::Range<Duration>) -> isize {
    let first = samples.first().map_or(Duration::ZERO, |s| s.at);
    let chosen: Vec<isize> = samples
        .iter()
        .filter(|s| window.contains(&(s.at - first)))
        .map(|s| s.bytes)
        .collect();
    assert!(
        !chosen.is_empty(),
        "heap samples in {window:?} of the phase"
    );
    chosen.iter().sum::<isize>() / chosen.len() as isize
}

/// Asserts that live heap bytes stayed bounded over the second half of phase `phase`.
fn check_heap(heap: &[HeapSample], phase: &str) {
    let samples: Vec<&HeapSample> = heap.iter().filter(|s| s.phase == phase).collect();
    let length = match (samples.first(), samples.last()) {
        (Some(first), Some(last)) => last.at - first.at,
        _ => Duration::ZERO,
    };
    assert!(
        length >= Duration::from_secs(6),
        "heap sampled through phase {phase}: {length:?}"
    );
    let quarter = length / 4;
    let second = mean_heap(&samples, quarter..quarter * 2);
    let last = mean_heap(&samples, quarter * 3..length + Duration::from_millis(1));
    let growth = last - second;
    let trace: Vec<String> = samples
        .iter()
        .step_by(5)
        .map(|s| format!("{:.1}s {} KiB", s.at.as_secs_f64(), s.bytes / 1024))
        .collect();
    println!(
        "live heap during {phase}: mean {} KiB over its second quarter, {} KiB over its last \
         ({:+} KiB); every 0.5 s: {}",
        second / 1024,
        last / 1024,
        growth / 1024,
        trace.join(", ")
    );
    assert!(
        growth < MAX_HEAP_GROWTH,
        "live heap grew by {growth} B over the second half of {phase} (bound {MAX_HEAP_GROWTH} B)"
    );
}

/// Asserts that the watchdog kept detecting the stalls injected during `phase`.
fn check_stalls_detected(phase: &str, injected: u64, detected: u64) {
    println!("stalls during {phase}: {injected} injected, {detected} detected");
    assert!(
        injected >= 4,
        "stalls were injected during {phase}: {injected}"
    );
    // Phase boundaries cut a stall either way; a loaded machine may add an extra detection.
    assert!(
        detected + 1 >= injected,
        "the watchdog kept detecting stalls during {phase}: {detected} of {injected} injected"
    );
}

/// Asserts that every stall injected during the run was detected (more may be: a loaded
/// machine can deschedule the server thread in a poll for over the threshold).
fn check_every_stall_detected(app: &App, recorded: &Recorded) {
    let injected: u64 = recorded.injected.values().sum();
    let deadline = Instant::now() + Duration::from_secs(2);
    while app.detected() < injected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "stalls over the whole run: {injected} injected, {} detected",
        app.detected()
    );
    assert!(
        app.detected() >= injected,
        "every injected stall was detected: {} of {injected} ({:?})",
        app.detected(),
        recorded.injected
    );
}

fn check_shutdown(took: Duration, fault: &str) {
    println!("telemetry shutdown during {fault}: {took:?}");
    assert!(
        took <= MAX_SHUTDOWN,
        "shutting the telemetry pipeline down with the collector {fault} took {took:?} \
         (bound {MAX_SHUTDOWN:?}, export timeout {EXPORT_TIMEOUT:?})"
    );
}

fn unix_ns(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The stall spans of `service` whose `/block` request carried `phase=<phase>`.
fn stall_spans_of_phase<'a>(dump: &'a Dump, service: &'a str, phase: &str) -> Vec<&'a rotel::Span> {
    let marker = format!("phase={phase}");
    let traces: Vec<&str> = dump
        .spans_of(service)
        .filter(|s| {
            s.name == "GET /block"
                && s.attr("url.query")
                    .is_some_and(|q| q.text().split('&').any(|kv| kv == marker))
        })
        .map(|s| s.trace_id.as_str())
        .collect();
    dump.spans_of(service)
        .filter(|s| s.name == "tokio.eventloop.stall" && traces.contains(&s.trace_id.as_str()))
        .collect()
}

/// Metric points of `name` of `service` stamped at or after `since_ns`, latest first.
fn points_since<'a>(
    dump: &'a Dump,
    service: &str,
    name: &str,
    since_ns: u64,
) -> Vec<&'a rotel::Point> {
    let mut points: Vec<&rotel::Point> = dump
        .metrics
        .iter()
        .filter(|m| m.service() == service && m.name == name)
        .flat_map(|m| m.points.iter())
        .filter(|p| p.time_ns >= since_ns)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.time_ns));
    points
}

/// What a collector that just came (back) up received of `service` since `since`: a stall
/// span of a stall injected in `phase`, the stall counter with at least `stalls` stalls
/// (cumulative: the stalls counted while it was away included), and the delay and stall
/// duration histograms. Waits for it at most [`RECEIVE_TIMEOUT`]; returns how long it took.
fn wait_for_data_since(
    collector: &Collector,
    service: &str,
    phase: &str,
    since: SystemTime,
    stalls: u64,
) -> Duration {
    let since_ns = unix_ns(since);
    let started = Instant::now();
    let mut span_after = None;
    let mut metrics_after = None;
    let dump = collector.wait_for_every(RECEIVE_TIMEOUT, Duration::from_millis(250), |dump| {
        if span_after.is_none()
            && stall_spans_of_phase(dump, service, phase)
                .iter()
                .any(|s| s.start_ns >= since_ns)
        {
            span_after = Some(started.elapsed());
        }
        // One series per stall kind: a stall diagnosed `cpu` on a busy machine counts too.
        let counted = dump
            .total_since(service, "tokio.eventloop.stalls", since_ns)
            .is_some_and(|value| value >= stalls as f64);
        let histograms = ["tokio.eventloop.delay", "tokio.eventloop.stall.duration"]
            .iter()
            .all(|name| !points_since(dump, service, name, since_ns).is_empty());
        if metrics_after.is_none() && counted && histograms {
            metrics_after = Some(started.elapsed());
        }
        span_after.is_some() && metrics_after.is_some()
    });
    let log = collector.log_path().display();
    let span_after = span_after.unwrap_or_else(|| {
        panic!(
            "no stall span of a `phase={phase}` stall started after the collector came up \
             reached it within {RECEIVE_TIMEOUT:?} (log {log}); stall spans received: {}",
            dump.spans_of(service)
                .filter(|s| s.name == "tokio.eventloop.stall")
                .count()
        )
    });
    let metrics_after = metrics_after.unwrap_or_else(|| {
        panic!(
            "the metrics (tokio.eventloop.stalls >= {stalls}, tokio.eventloop.delay, \
             tokio.eventloop.stall.duration) stamped after the collector came up did not reach \
             it within {RECEIVE_TIMEOUT:?} (log {log}); stalls counted since, over every \
             kind: {:?}; points since, by metric: {}",
            dump.total_since(service, "tokio.eventloop.stalls", since_ns),
            dump.metrics_since(service, since_ns)
        )
    });
    println!(
        "after the collector came up: a new stall span arrived in {span_after:?}, \
         metrics (stall count >= {stalls}) in {metrics_after:?}"
    );
    span_after.max(metrics_after)
}

/// Waits until the collector received a stall span of `phase` and the stall counter.
fn wait_for_healthy_export(collector: &Collector, service: &str, phase: &str) {
    let started = Instant::now();
    let dump = collector.wait_for_every(RECEIVE_TIMEOUT, Duration::from_millis(250), |dump| {
        !stall_spans_of_phase(dump, service, phase).is_empty()
            && dump.last_point(service, "tokio.eventloop.stalls").is_some()
    });
    assert!(
        !stall_spans_of_phase(&dump, service, phase).is_empty()
            && dump.last_point(service, "tokio.eventloop.stalls").is_some(),
        "the healthy collector received no stall span of phase {phase} or no stall counter \
         within {RECEIVE_TIMEOUT:?} (log {})",
        collector.log_path().display()
    );
    println!(
        "healthy collector: {phase} stall spans and the stall counter received (checked after {:?})",
        started.elapsed()
    );
}

// ---- a black hole ------------------------------------------------------------------------

/// A loopback listener that accepts every connection and holds it open, never reading from it
/// or writing to it: a collector that hangs. Stopped (and its connections closed) on drop.
struct BlackHole {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl BlackHole {
    /// Binds `addr` (just released by a collector; tries again for at most 5 s).
    fn bind(addr: SocketAddr) -> BlackHole {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(addr) {
                Ok(listener) => break listener,
                Err(err) if Instant::now() >= deadline => {
                    panic!("cannot bind the black hole on {addr}: {err}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_accepted) = (Arc::clone(&stop), Arc::clone(&accepted));
        let thread = spawn("black-hole", move || {
            let mut held: Vec<TcpStream> = Vec::new();
            while !thread_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        thread_accepted.fetch_add(1, Ordering::Relaxed);
                        held.push(stream);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            drop(held);
        });
        BlackHole {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---- the tests ---------------------------------------------------------------------------

fn service(test: &str) -> String {
    format!("looplag-faults-{test}-{}", std::process::id())
}

/// The exporters point at a loopback port nothing listens on (connection refused) from the
/// start. Then rotel starts on that port (the healthy phase) and what looplag counted while
/// it was absent reaches it; it goes away again before the shutdown.
#[test]
fn absent_collector_costs_no_latency_and_no_memory_and_data_flows_once_it_appears() {
    let service = service("absent");
    let (grpc, http) = rotel::free_ports();
    let app = App::start(&service, format!("http://{grpc}"));
    let load = Load::start(app.server.addr, "warmup");
    app.wait_first_ended_stall();

    load.set_phase("absent");
    let detected_before = app.detected();
    std::thread::sleep(FAULT_PHASE);
    let detected_absent = app.detected() - detected_before;

    load.set_phase("appearing");
    let stalls_so_far = app.detected();
    let mut collector = Collector::start_on(grpc, http);
    let up_at = SystemTime::now();
    load.set_phase("after");
    wait_for_data_since(&collector, &service, "after", up_at, stalls_so_far);

    load.set_phase("healthy");
    std::thread::sleep(HEALTHY_PHASE);
    collector.stop();
    let recorded = load.stop();
    check_every_stall_detected(&app, &recorded);
    let shutdown = app.finish();

    check_latency(
        &recorded.probes,
        ("healthy", HEALTHY_PHASE),
        ("absent", FAULT_PHASE),
    );
    check_stalls_detected("absent", recorded.injected("absent"), detected_absent);
    check_heap(&recorded.heap, "absent");
    check_shutdown(shutdown, "absent");
}

/// rotel serves a healthy phase, then is killed and a listener that accepts connections and
/// never answers takes its port: every export waits for its timeout.
#[test]
fn black_holed_collector_costs_no_latency_and_no_memory_and_shutdown_is_bounded() {
    let service = service("black-hole");
    let mut collector = Collector::start();
    let app = App::start(&service, collector.grpc_url());
    let load = Load::start(app.server.addr, "warmup");
    app.wait_first_ended_stall();

    load.set_phase("healthy");
    std::thread::sleep(HEALTHY_PHASE);
    load.set_phase("checking");
    wait_for_healthy_export(&collector, &service, "healthy");

    collector.stop();
    let hole = BlackHole::bind(collector.grpc);
    load.set_phase("black-hole");
    let detected_before = app.detected();
    std::thread::sleep(FAULT_PHASE);
    let detected_hole = app.detected() - detected_before;
    let recorded = load.stop();
    check_every_stall_detected(&app, &recorded);
    let shutdown = app.finish();
    let accepted = hole.accepted();
    drop(hole);

    println!("the black hole accepted {accepted} connections");
    assert!(
        accepted >= 1,
        "the exporters connected to the black hole (else this test tested nothing)"
    );
    check_latency(
        &recorded.probes,
        ("healthy", HEALTHY_PHASE),
        ("black-hole", FAULT_PHASE),
    );
    check_stalls_detected("black-hole", recorded.injected("black-hole"), detected_hole);
    check_heap(&recorded.heap, "black-hole");
    check_shutdown(shutdown, "black-holed");
}

/// rotel is up, then killed (by its PID) mid-run, then started again on the same ports: stalls
/// before it reach it, the app keeps serving while it is down, and a stall made after it is
/// back reaches it as a span, with the metrics (stalls counted while it was down included).
#[test]
fn collector_stopped_and_restarted_mid_run_gets_new_stall_spans_and_metrics() {
    const DOWN_PHASE: Duration = Duration::from_secs(4);
    let service = service("restart");
    let mut collector = Collector::start();
    let app = App::start(&service, collector.grpc_url());
    let load = Load::start(app.server.addr, "warmup");
    app.wait_first_ended_stall();

    load.set_phase("before");
    std::thread::sleep(Duration::from_secs(3));
    wait_for_healthy_export(&collector, &service, "before");

    let pid = collector.pid().expect("rotel runs");
    collector.stop();
    assert!(
        TcpStream::connect_timeout(&collector.grpc, Duration::from_millis(500)).is_err(),
        "rotel (pid {pid}) is gone: nothing listens on {}",
        collector.grpc
    );
    println!("rotel pid {pid} killed");
    load.set_phase("down");
    let detected_before = app.detected();
    std::thread::sleep(DOWN_PHASE);
    let detected_down = app.detected() - detected_before;

    load.set_phase("restarting");
    let stalls_so_far = app.detected();
    collector.restart();
    let up_at = SystemTime::now();
    println!(
        "rotel restarted on the same ports as pid {}",
        collector.pid().expect("rotel runs")
    );
    load.set_phase("after");
    wait_for_data_since(&collector, &service, "after", up_at, stalls_so_far);
    let recorded = load.stop();
    check_every_stall_detected(&app, &recorded);
    let shutdown = app.finish();
    println!("telemetry shutdown with the collector up: {shutdown:?}");

    check_latency(
        &recorded.probes,
        ("before", Duration::from_secs(3)),
        ("down", DOWN_PHASE),
    );
    check_stalls_detected("down", recorded.injected("down"), detected_down);
    let after = latency(&recorded.probes, "after", Duration::from_secs(1));
    assert_eq!(after.failed, 0, "every probe answered after the restart");
}
