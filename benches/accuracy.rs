//! Delay accuracy: looplag's `tokio.eventloop.delay` on an idle runtime, and measured vs
//! injected stall durations, side by side with the seed-style sleep watchdog.
//!
//! - Idle delay: looplag's real histogram, read from an in-memory metric exporter through
//!   an SDK view with base-2 exponential aggregation (≈ 4 % bucket width at these values),
//!   vs the sleep watchdog's lateness (exact samples), each alone on the runtime.
//! - Stall durations: `std::thread::sleep(d)` inside a span, timed with `Instant` around
//!   the sleep (the truth); looplag's ended `StallReport::duration` and exported stall span
//!   duration vs that; the sleep watchdog's estimate is the largest lateness it saw during
//!   the stall. looplag runs here with a 1 ms sample interval and a 5 ms threshold so that
//!   10 ms stalls are detected at all.

#[path = "support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use looplag::{LoopLag, StallReport, StallState};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{
    Aggregation, InMemoryMetricExporter, Instrument, PeriodicReader, SdkMeterProvider, Stream,
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use support::*;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn runtime(looplag: Option<&LoopLag>, workers: usize) -> tokio::runtime::Runtime {
    let mut builder = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all();
    if let Some(looplag) = looplag {
        looplag.hook_runtime(&mut builder);
    }
    builder.build().expect("runtime")
}

fn flavor(workers: usize) -> String {
    if workers == 0 {
        "current-thread".to_string()
    } else {
        format!("multi-thread, {workers} workers")
    }
}

/// p50, p99 and count of the exported exponential histogram `tokio.eventloop.delay`.
fn delay_quantiles(
    provider: &SdkMeterProvider,
    exporter: &InMemoryMetricExporter,
) -> (f64, f64, u64) {
    provider.force_flush().expect("flush metrics");
    let exports = exporter.get_finished_metrics().expect("metrics");
    for scope in exports.last().expect("an export").scope_metrics() {
        for metric in scope.metrics() {
            if metric.name() != "tokio.eventloop.delay" {
                continue;
            }
            let AggregatedMetrics::F64(MetricData::ExponentialHistogram(histogram)) = metric.data()
            else {
                panic!("exponential histogram expected");
            };
            let point = histogram.data_points().next().expect("a data point");
            let base = 2f64.powf(2f64.powi(-i32::from(point.scale())));
            let offset = point.positive_bucket().offset();
            let counts: Vec<u64> = point.positive_bucket().counts().collect();
            let total: u64 = point.zero_count() + counts.iter().sum::<u64>();
            let at = |q: f64| {
                let rank = (q * total as f64).ceil().max(1.0) as u64;
                let mut seen = point.zero_count();
                if seen >= rank {
                    return 0.0;
                }
                for (i, count) in counts.iter().enumerate() {
                    seen += count;
                    if seen >= rank {
                        // Bucket (base^(index), base^(index+1)]: report its geometric middle.
                        let index = offset + i as i32;
                        return base.powf(index as f64 + 0.5);
                    }
                }
                f64::NAN
            };
            return (at(0.5), at(0.99), total);
        }
    }
    panic!("tokio.eventloop.delay not exported");
}

/// tokio's own floor: a plain thread that sleeps `gap`, then spawns a task into an idle,
/// unhooked runtime of the same flavor and times spawn → first poll (the probe looplag's
/// watchdog spawns, without looplag), for `period`. Returns the delays in seconds.
fn floor(workers: usize, gap: Duration, period: Duration) -> Vec<f64> {
    let rt = Arc::new(runtime(None, workers));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let driver = (workers == 0).then(|| {
        let rt = Arc::clone(&rt);
        std::thread::spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            })
        })
    });
    std::thread::sleep(Duration::from_millis(100));
    let base = Instant::now();
    let mut delays = Vec::new();
    while base.elapsed() < period {
        std::thread::sleep(gap);
        let polled = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let flag = Arc::clone(&polled);
        let spawned = base.elapsed().as_nanos() as u64;
        rt.spawn(async move {
            flag.store(
                base.elapsed().as_nanos() as u64,
                std::sync::atomic::Ordering::Release,
            );
        });
        let at = loop {
            let at = polled.load(std::sync::atomic::Ordering::Acquire);
            if at != 0 {
                break at;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        delays.push(at.saturating_sub(spawned) as f64 * 1e-9);
    }
    drop(stop);
    if let Some(driver) = driver {
        driver.join().expect("driver thread");
    }
    delays
}

fn idle_delay(period: Duration) {
    println!("### Idle delay\n");
    println!(
        "Idle runtime, {:.0} s per row, 10 ms interval for both. looplag: its exported \
         `tokio.eventloop.delay` (exponential histogram, value = bucket middle); seed: lateness \
         of `tokio::time::sleep(10 ms)`. tokio floor: the same probe spawned from a plain \
         thread into an idle unhooked runtime, without looplag, after the thread slept 10 ms \
         or 200 ms (looplag's watchdog, dozing on an idle runtime, probes every 200 ms).",
        period.as_secs_f64()
    );
    println!();
    println!("| runtime | looplag delay p50 | looplag delay p99 | samples | seed lateness p50 | seed lateness p99 | samples | tokio floor p50, 10 ms apart | tokio floor p50, 200 ms apart |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for workers in [0, 2] {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .with_view(|instrument: &Instrument| {
                (instrument.name() == "tokio.eventloop.delay").then(|| {
                    Stream::builder()
                        .with_aggregation(Aggregation::Base2ExponentialHistogram {
                            max_size: 160,
                            max_scale: 20,
                            record_min_max: true,
                        })
                        .build()
                        .expect("valid stream")
                })
            })
            .build();
        let looplag = LoopLag::builder()
            .runtime_name("idle")
            .meter(provider.meter("looplag"))
            .build()
            .expect("looplag");
        let rt = Arc::new(runtime(Some(&looplag), workers));
        // A current-thread runtime only runs while a thread drives it. That thread starts
        // the watchdog, as an application does before its `block_on` (the thread calling
        // `start` is registered as the runtime's driver).
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (guard_tx, guard_rx) = std::sync::mpsc::channel();
        let driver = (workers == 0).then(|| {
            let rt = Arc::clone(&rt);
            let looplag = looplag.clone();
            std::thread::spawn(move || {
                guard_tx
                    .send(looplag.start(rt.handle()).expect("start"))
                    .expect("send the guard");
                rt.block_on(async {
                    let _ = stopped.await;
                })
            })
        });
        // looplag alone.
        let guard = if workers == 0 {
            guard_rx.recv().expect("the driver's watchdog")
        } else {
            looplag.start(rt.handle()).expect("start")
        };
        pause(period);
        drop(guard);
        let (p50, p99, count) = delay_quantiles(&provider, &exporter);
        // The seed watchdog alone, on the same runtime.
        let seed = SleepWatchdog::default();
        let task = {
            let _enter = rt.enter();
            seed.spawn(Duration::from_millis(10))
        };
        pause(period);
        task.abort();
        drop(stop);
        if let Some(driver) = driver {
            driver.join().expect("driver thread");
        }
        let mut late: Vec<f64> = seed
            .take()
            .into_iter()
            .map(|(_, late)| late.as_secs_f64())
            .collect();
        let seed_count = late.len();
        let mut warm = floor(workers, Duration::from_millis(10), period / 2);
        let mut cold = floor(workers, Duration::from_millis(200), period);
        println!(
            "| {} | {:.1} µs | {:.1} µs | {count} | {:.1} µs | {:.1} µs | {seed_count} | {:.1} µs | {:.1} µs |",
            flavor(workers),
            p50 * 1e6,
            p99 * 1e6,
            quantile(&mut late, 0.5) * 1e6,
            quantile(&mut late, 0.99) * 1e6,
            quantile(&mut warm, 0.5) * 1e6,
            quantile(&mut cold, 0.5) * 1e6,
        );
    }
    println!();
}

fn main() {
    let period = pick(Duration::from_secs(10), Duration::from_secs(2));
    let reps = pick(5, 2);
    header("Delay accuracy: idle delay and stall durations, looplag vs the seed sleep watchdog");

    let spans = InMemorySpanExporter::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let reports: Arc<Mutex<Vec<StallReport>>> = Arc::default();
    // One global subscriber for the whole binary: the layer is shared by every instance.
    let layer_instance = LoopLag::builder().build().expect("looplag");
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(tracer_provider.tracer("bench")))
        .with(layer_instance.layer())
        .init();

    idle_delay(period);
    stall_durations(reps, &spans, &tracer_provider, &reports);
    footer();
}

struct Injected {
    nominal: Duration,
    start: Instant,
    actual: Duration,
}

fn stall_durations(
    reps: usize,
    spans: &InMemorySpanExporter,
    tracer_provider: &SdkTracerProvider,
    reports: &Arc<Mutex<Vec<StallReport>>>,
) {
    println!("### Stall duration, measured vs injected\n");
    println!(
        "`std::thread::sleep(d)` inside a span, {reps} times per size; error = measured − the \
         sleep's own duration (timed with `Instant` around it). looplag: 1 ms interval, 5 ms \
         threshold. seed: 10 ms sleep watchdog, its estimate = largest lateness seen during \
         the stall (current-thread only: on a multi-thread runtime it usually runs on another \
         worker and sees nothing)."
    );
    println!();
    println!("| runtime | injected | looplag detected | looplag error, median | looplag error, worst | stall span − report | seed detected (≥ 5 ms late) | seed estimate, median | seed error, worst |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let sizes = [10u64, 50, 200, 1000];
    for workers in [0usize, 2] {
        let sink = Arc::clone(reports);
        let looplag = LoopLag::builder()
            .runtime_name(format!("stalls-{workers}"))
            .sample_interval(Duration::from_millis(1))
            .stall_threshold(Duration::from_millis(5))
            .tracer(tracer_provider.tracer("looplag"))
            .on_stall(move |report| sink.lock().unwrap().push(report.clone()))
            .build()
            .expect("looplag");
        let rt = runtime(Some(&looplag), workers);
        let guard = looplag.start(rt.handle()).expect("start");
        let seed = SleepWatchdog::default();
        reports.lock().unwrap().clear();
        spans.reset();
        let injected: Vec<Injected> = rt.block_on(async {
            let _seed_task = seed.spawn(Duration::from_millis(10));
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut injected = Vec::new();
            for _ in 0..reps {
                for &size in &sizes {
                    let nominal = Duration::from_millis(size);
                    let (start, actual) = tokio::spawn(
                        async move {
                            let start = Instant::now();
                            std::thread::sleep(nominal);
                            (start, start.elapsed())
                        }
                        .instrument(tracing::info_span!("stall")),
                    )
                    .await
                    .expect("stall task");
                    injected.push(Injected {
                        nominal,
                        start,
                        actual,
                    });
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            }
            injected
        });
        drop(guard);
        tracer_provider.force_flush().expect("flush");
        let ended: Vec<StallReport> = reports
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.state == StallState::Ended)
            .cloned()
            .collect();
        let stall_spans: Vec<_> = spans
            .get_finished_spans()
            .expect("spans")
            .into_iter()
            .filter(|s| s.name == "tokio.eventloop.stall")
            .collect();
        let seed_samples = seed.take();
        for &size in &sizes {
            let mut errors = Vec::new();
            let mut span_minus_report: f64 = 0.0;
            let mut detected = 0;
            let mut seed_estimates = Vec::new();
            let mut seed_errors = Vec::new();
            let mut seed_detected = 0;
            let of_size: Vec<&Injected> = injected
                .iter()
                .filter(|i| i.nominal == Duration::from_millis(size))
                .collect();
            for inj in &of_size {
                let start_wall = std::time::SystemTime::now() - inj.start.elapsed();
                // The ended report whose start is within 2 ms of the injected start.
                let report = ended.iter().find(|r| {
                    let d = r
                        .started_at
                        .duration_since(start_wall)
                        .unwrap_or_else(|e| e.duration());
                    d < Duration::from_millis(2)
                });
                if let Some(report) = report {
                    detected += 1;
                    errors.push(ms(report.duration) - ms(inj.actual));
                    if let Some(span) = stall_spans
                        .iter()
                        .find(|s| Some(s.span_context.span_id()) == report.span_id)
                    {
                        let d = span
                            .end_time
                            .duration_since(span.start_time)
                            .unwrap_or_default();
                        span_minus_report =
                            span_minus_report.max((ms(d) - ms(report.duration)).abs());
                    }
                }
                let end = inj.start + inj.actual;
                let late = seed_samples
                    .iter()
                    .filter(|(woke, _)| {
                        *woke >= inj.start && *woke <= end + Duration::from_millis(20)
                    })
                    .map(|(_, late)| *late)
                    .max()
                    .unwrap_or_default();
                if late >= Duration::from_millis(5) {
                    seed_detected += 1;
                }
                seed_estimates.push(ms(late));
                seed_errors.push(ms(late) - ms(inj.actual));
            }
            let worst = |v: &[f64]| {
                v.iter()
                    .cloned()
                    .fold(0.0f64, |a, b| if b.abs() > a.abs() { b } else { a })
            };
            let (seed_cols, seed_worst) = if workers == 0 {
                (
                    format!("{seed_detected}/{}", of_size.len()),
                    format!("{:+.2} ms", worst(&seed_errors)),
                )
            } else {
                (
                    format!("{seed_detected}/{} (not its use)", of_size.len()),
                    "–".to_string(),
                )
            };
            println!(
                "| {} | {size} ms | {detected}/{} | {:+.3} ms | {:+.3} ms | {:.3} ms | {seed_cols} | {:.2} ms | {seed_worst} |",
                flavor(workers),
                of_size.len(),
                median(&mut errors.clone()),
                worst(&errors),
                span_minus_report,
                median(&mut seed_estimates),
            );
        }
        drop(rt);
    }
}
