//! Detection: recall, false positives and detection latency for single-worker stalls,
//! looplag side by side with the seed sleep watchdog, tokio-metrics' `TaskMonitor` slow
//! polls and tokio-blocked, all watching the same injected stalls at once.
//!
//! Per runtime (current-thread, multi-thread with 2 and 4 workers): steady short-poll
//! traffic (a request task in its own span every 2 ms, each yielding three times); a
//! healthy period with no stall (every detection there is a false positive); then stalls
//! of 200 ms (`std::thread::sleep` in a spawned task, so on one worker), 300 ms apart,
//! inside a span and, for looplag's stable-build fallback, outside any span. Every
//! detector uses a 50 ms threshold. A detection is matched to a stall when it happens
//! between the stall's start and 100 ms after its end; any other detection is a false
//! positive. Detection latency is the time from the stall's start to the detection.
//!
//! tokio-blocked needs tokio's task spans: `--cfg tokio_unstable` and tokio's `tracing`
//! feature (`scripts/bench.sh` runs this binary with `--features tokio/tracing` in its
//! unstable pass); otherwise its column says why it was skipped.

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use looplag::{LoopLag, StallState};
use support::*;
use tracing::Instrument;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

const THRESHOLD: Duration = Duration::from_millis(50);
const STALL: Duration = Duration::from_millis(200);
const GAP: Duration = Duration::from_millis(300);
const MATCH_SLACK: Duration = Duration::from_millis(100);

/// Records the time of every tokio-blocked warning, and whether tokio's task spans exist.
#[derive(Clone, Default)]
struct BlockedEvents {
    at: Arc<Mutex<Vec<Instant>>>,
    task_spans_seen: Arc<AtomicBool>,
}

impl<S: tracing::Subscriber> Layer<S> for BlockedEvents {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: Context<'_, S>,
    ) {
        if attrs.metadata().name() == "runtime.spawn" {
            self.task_spans_seen.store(true, Ordering::Relaxed);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() == "tokio_blocked::task_poll_blocked" {
            self.at.lock().unwrap().push(Instant::now());
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    InSpan,
    NoSpan,
}

struct Window {
    start: Instant,
    end: Instant,
    kind: Kind,
}

#[derive(Default)]
struct Score {
    detected: usize,
    stalls: usize,
    false_positives: usize,
    latencies_ms: Vec<f64>,
}

impl Score {
    fn recall(&self) -> String {
        format!("{}/{}", self.detected, self.stalls)
    }
    fn latency(&mut self) -> String {
        if self.latencies_ms.is_empty() {
            return "–".to_string();
        }
        let max = self.latencies_ms.iter().cloned().fold(0.0, f64::max);
        format!("{:.1} / {:.1}", median(&mut self.latencies_ms), max)
    }
}

/// Matches detection times to stall windows of `kind`: one hit per window at most;
/// detections outside every window (of any kind) are false positives.
fn score(windows: &[Window], kind: Kind, detections: &[Instant]) -> Score {
    let mut score = Score {
        stalls: windows.iter().filter(|w| w.kind == kind).count(),
        ..Score::default()
    };
    let mut hit = vec![false; windows.len()];
    for &at in detections {
        let inside = windows
            .iter()
            .position(|w| at >= w.start && at <= w.end + MATCH_SLACK);
        match inside {
            Some(i) => {
                if windows[i].kind == kind && !hit[i] {
                    hit[i] = true;
                    score.detected += 1;
                    score
                        .latencies_ms
                        .push(ms(at.saturating_duration_since(windows[i].start)));
                }
            }
            None => score.false_positives += 1,
        }
    }
    score
}

struct Detections {
    looplag: Vec<Instant>,
    seed: Vec<Instant>,
    task_monitor: Vec<Instant>,
    blocked: Vec<Instant>,
}

fn run(
    workers: usize,
    healthy: Duration,
    stalls_in_span: usize,
    stalls_no_span: usize,
    blocked: &BlockedEvents,
) -> (Vec<Window>, Detections, Duration) {
    let looplag_hits: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let sink = Arc::clone(&looplag_hits);
    let looplag = LoopLag::builder()
        .runtime_name(format!("detect-{workers}"))
        .stall_threshold(THRESHOLD)
        .on_stall(move |report| {
            if report.state == StallState::InProgress && report.report_number == 1 {
                sink.lock().unwrap().push(Instant::now());
            }
        })
        .build()
        .expect("looplag");
    let mut builder = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all();
    looplag.hook_runtime(&mut builder);
    let rt = builder.build().expect("runtime");
    let watchdog = looplag.start(rt.handle()).expect("start");

    let mut monitor_builder = tokio_metrics::TaskMonitor::builder();
    monitor_builder.with_slow_poll_threshold(THRESHOLD);
    let monitor = monitor_builder.build();
    // TaskMonitor counts a slow poll when the poll returns; sample it every millisecond on
    // a plain thread to time that.
    let monitor_hits: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = {
        let monitor = monitor.clone();
        let hits = Arc::clone(&monitor_hits);
        let stop = Arc::clone(&stop_sampler);
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let slow = monitor.cumulative().total_slow_poll_count;
                for _ in last..slow {
                    hits.lock().unwrap().push(Instant::now());
                }
                last = slow;
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    blocked.at.lock().unwrap().clear();

    let seed = SleepWatchdog::default();
    let requests = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let windows = rt.block_on(async {
        let seed_task = seed.spawn(Duration::from_millis(10));
        let traffic = {
            let monitor = monitor.clone();
            let requests = Arc::clone(&requests);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                loop {
                    tick.tick().await;
                    let n = requests.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(tokio_metrics::TaskMonitor::instrument(
                        &monitor,
                        async {
                            for _ in 0..3 {
                                std::hint::black_box(0u64);
                                tokio::task::yield_now().await;
                            }
                        }
                        .instrument(tracing::info_span!("request", n)),
                    ));
                }
            })
        };
        tokio::time::sleep(healthy).await;
        let mut windows = Vec::new();
        let kinds = std::iter::repeat_n(Kind::InSpan, stalls_in_span)
            .chain(std::iter::repeat_n(Kind::NoSpan, stalls_no_span));
        for kind in kinds {
            let stall = async {
                let start = Instant::now();
                std::thread::sleep(STALL);
                (start, Instant::now())
            };
            let task = match kind {
                Kind::InSpan => tokio::spawn(tokio_metrics::TaskMonitor::instrument(
                    &monitor,
                    stall.instrument(tracing::info_span!("blocking_request")),
                )),
                Kind::NoSpan => {
                    tokio::spawn(tokio_metrics::TaskMonitor::instrument(&monitor, stall))
                }
            };
            let (start, end) = task.await.expect("stall task");
            windows.push(Window { start, end, kind });
            tokio::time::sleep(GAP).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        traffic.abort();
        seed_task.abort();
        windows
    });
    if workers == 0 {
        // `block_on` has returned and the runtime lives on, undriven: tokio's metrics stay as
        // frozen as during a stall outside any span. Anything reported now is a false
        // positive.
        std::thread::sleep(UNDRIVEN);
    }
    let elapsed = started.elapsed();
    stop_sampler.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    drop(watchdog);
    drop(rt);
    let threshold = THRESHOLD;
    let detections = Detections {
        looplag: looplag_hits.lock().unwrap().clone(),
        seed: seed
            .take()
            .into_iter()
            .filter(|(_, late)| *late >= threshold)
            .map(|(at, _)| at)
            .collect(),
        task_monitor: monitor_hits.lock().unwrap().clone(),
        blocked: blocked.at.lock().unwrap().clone(),
    };
    let _ = requests;
    (windows, detections, elapsed)
}

/// How long the current-thread runtime stays undriven after the stalls.
const UNDRIVEN: Duration = Duration::from_secs(1);

fn main() {
    let healthy = pick(Duration::from_secs(5), Duration::from_secs(2));
    let stalls_in_span = pick(20, 4);
    let stalls_no_span = pick(10, 2);
    header("Detection: recall, false positives and latency for single-worker stalls");
    println!(
        "Per runtime: {:.0} s healthy traffic (a request task in a span every 2 ms, 3 yields \
         each), then {stalls_in_span} stalls of 200 ms in a span and {stalls_no_span} outside \
         any span, 300 ms apart, traffic running throughout; on the current-thread runtime, \
         then {:.0} s with `block_on` returned and the runtime alive (nobody drives it: a \
         stall reported then is a false positive). Threshold 50 ms for every \
         detector; looplag and the seed watchdog sample every 10 ms; TaskMonitor's count is \
         read every 1 ms. Latency = detection − stall start, median / max, ms.",
        healthy.as_secs_f64(),
        UNDRIVEN.as_secs_f64()
    );
    println!();

    let blocked = BlockedEvents::default();
    let tokio_blocked = tokio_blocked::TokioBlockedLayer::new()
        .with_warn_busy_single_poll(Some(THRESHOLD))
        .with_warn_busy_total(None);
    let layer_instance = LoopLag::builder().build().expect("looplag");
    tracing_subscriber::registry()
        .with(layer_instance.layer())
        .with(tokio_blocked)
        .with(blocked.clone())
        .init();

    println!("| runtime | stalls | detector | recall | false positives | latency median / max (ms) | when |");
    println!("|---|---|---|---:|---:|---:|---|");
    for workers in [0usize, 2, 4] {
        let (windows, detections, _elapsed) =
            run(workers, healthy, stalls_in_span, stalls_no_span, &blocked);
        let runtime = if workers == 0 {
            "current-thread".to_string()
        } else {
            format!("multi-thread ({workers})")
        };
        let blocked_available = blocked.task_spans_seen.load(Ordering::Relaxed);
        for (kind, label) in [
            (Kind::InSpan, "in a span"),
            (Kind::NoSpan, "outside any span"),
        ] {
            let count = windows.iter().filter(|w| w.kind == kind).count();
            if count == 0 {
                continue;
            }
            let rows: [(&str, &[Instant], &str); 4] = [
                ("looplag", &detections.looplag, "while blocked"),
                ("seed sleep watchdog", &detections.seed, "after the stall"),
                (
                    "tokio-metrics TaskMonitor",
                    &detections.task_monitor,
                    "after the poll",
                ),
                ("tokio-blocked", &detections.blocked, "after the poll"),
            ];
            for (name, times, when) in rows {
                if name == "tokio-blocked" && !blocked_available {
                    let why = if cfg!(tokio_unstable) {
                        "skipped: tokio built without its `tracing` feature (run with `--features tokio/tracing`)"
                    } else {
                        "skipped: needs `--cfg tokio_unstable` (see the unstable run)"
                    };
                    println!("| {runtime} | {label} | {name} | {why} | | | |");
                    continue;
                }
                let mut s = score(&windows, kind, times);
                let latency = s.latency();
                println!(
                    "| {runtime} | {count} × 200 ms {label} | {name} | {} | {} | {} | {when} |",
                    s.recall(),
                    s.false_positives,
                    latency,
                );
            }
        }
    }
    println!();
    println!(
        "False positives count every detection outside all stall windows, over the healthy \
         period and the gaps; for the rows \"outside any span\" they are the same detections \
         as in the rows above (one run per runtime)."
    );
    footer();
}
