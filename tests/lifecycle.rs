//! The lifecycle of an instance inside someone else's process: runtime shutdown during a
//! stall, dropping the watchdog (thread and memory released), starting twice, two runtimes
//! in one process, the layer without a watchdog and the watchdog without the layer.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use looplag::{LoopLag, StallReport, StallState};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use tracing::Instrument;

/// Tolerance on a stall measured at poll boundaries: the sleep's overshoot plus scheduling
/// noise on a loaded 2-core machine.
const TOLERANCE: Duration = Duration::from_millis(25);

/// Names (`comm`, at most 15 bytes) of this process's threads.
fn thread_names() -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let path = entry.expect("task entry").path().join("comm");
        if let Ok(name) = std::fs::read_to_string(path) {
            names.push(name.trim_end().to_string());
        }
    }
    names
}

fn looplag_threads() -> usize {
    thread_names()
        .iter()
        .filter(|name| name.starts_with("looplag-"))
        .count()
}

fn assert_in(duration: Duration, expected: Duration, what: &str) {
    assert!(
        duration >= expected && duration <= expected + TOLERANCE,
        "{what}: {duration:?}, expected {expected:?} (+{TOLERANCE:?})"
    );
}

fn first_report(reports: &Mutex<Vec<StallReport>>, state: StallState) -> Option<StallReport> {
    reports
        .lock()
        .unwrap()
        .iter()
        .find(|report| report.state == state)
        .cloned()
}

#[test]
fn runtime_shutdown_during_a_stall_still_ends_and_exports_it() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 2);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.spawn(
        async { std::thread::sleep(Duration::from_millis(800)) }
            .instrument(tracing::info_span!("culprit")),
    );
    assert!(
        wait_until(Duration::from_secs(2), || first_report(
            &h.reports,
            StallState::InProgress
        )
        .is_some()),
        "the stall is detected while it lasts"
    );
    // The runtime goes away while its worker is still blocked: shutdown_timeout returns
    // without waiting for it.
    runtime.shutdown_timeout(Duration::from_millis(10));
    assert!(
        wait_until(Duration::from_secs(3), || first_report(
            &h.reports,
            StallState::Ended
        )
        .is_some()),
        "the stall ends when the blocked poll returns, after the runtime shut down: {:#?}",
        h.reports()
    );
    drop(watchdog);
    assert_eq!(looplag_threads(), 0, "{:?}", thread_names());

    let ended = h.ended_reports();
    assert_eq!(ended.len(), 1, "{ended:#?}");
    assert_in(
        ended[0].duration,
        Duration::from_millis(800),
        "ended report",
    );
    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    assert_in(
        span_duration(&stalls[0]),
        Duration::from_millis(800),
        "stall span",
    );
    assert_eq!(stalls[0].parent_span_id, span_id(&h.span_named("culprit")));
    assert_eq!(h.counter("tokio.eventloop.stalls"), 1);
}

#[test]
fn a_stall_in_progress_when_the_watchdog_starts_is_detected() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 1);
    // Let the worker park once (it registers with looplag then).
    runtime.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
    let culprit = runtime.spawn(
        async { std::thread::sleep(Duration::from_millis(400)) }
            .instrument(tracing::info_span!("culprit")),
    );
    // The stall is well past the threshold before the watchdog exists.
    std::thread::sleep(Duration::from_millis(100));
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    assert!(
        wait_until(Duration::from_millis(250), || first_report(
            &h.reports,
            StallState::InProgress
        )
        .is_some()),
        "detected while it lasts: {:#?}",
        h.reports()
    );
    runtime.block_on(culprit).unwrap();
    assert!(wait_until(Duration::from_secs(2), || first_report(
        &h.reports,
        StallState::Ended
    )
    .is_some()));
    drop(watchdog);
    let ended = h.ended_reports();
    assert_eq!(ended.len(), 1, "{ended:#?}");
    assert_in(
        ended[0].duration,
        Duration::from_millis(400),
        "measured from the poll's start",
    );
    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1);
    assert_eq!(stalls[0].parent_span_id, span_id(&h.span_named("culprit")));
}

#[test]
fn dropping_the_watchdog_during_a_stall_ends_it_at_the_drop() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 2);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let culprit = runtime.spawn(
        async { std::thread::sleep(Duration::from_millis(1000)) }
            .instrument(tracing::info_span!("culprit")),
    );
    assert!(wait_until(Duration::from_secs(2), || first_report(
        &h.reports,
        StallState::InProgress
    )
    .is_some()));
    let started = first_report(&h.reports, StallState::InProgress)
        .unwrap()
        .started_at;
    drop(watchdog);
    let dropped_at = std::time::SystemTime::now();
    // The drop joined the watchdog thread, which closed the open stall first.
    let ended = h.ended_reports();
    assert_eq!(ended.len(), 1, "closed by the drop: {:#?}", h.reports());
    let at_drop = dropped_at.duration_since(started).unwrap();
    assert!(
        ended[0].duration <= at_drop && ended[0].duration < Duration::from_millis(1000),
        "the stall ends at the drop, before the poll returns: {:?} (drop after {at_drop:?})",
        ended[0].duration
    );
    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1, "the stall span is ended and exported");
    assert_eq!(looplag_threads(), 0, "{:?}", thread_names());

    // The blocked poll returns later; nobody is watching any more.
    let reports_at_drop = h.reports().len();
    runtime.block_on(culprit).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        h.reports().len(),
        reports_at_drop,
        "no report after the drop: {:#?}",
        h.reports()
    );
    assert_eq!(h.stall_spans().len(), 1);
}

#[test]
fn dropping_the_watchdog_ends_its_thread_and_releases_the_instance() {
    let h = harness(|b| b);
    // A second instance whose callback holds a sentinel: the sentinel lives exactly as long
    // as the instance's shared state (the callback is owned by it and by nothing else).
    let sentinel = Arc::new(());
    let alive = Arc::downgrade(&sentinel);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&reports);
    let looplag = LoopLag::builder()
        .runtime_name("lifecycle")
        .meter(opentelemetry::metrics::MeterProvider::meter(
            &h.meter_provider,
            "looplag",
        ))
        .tracer(h.tracer_provider.tracer("looplag"))
        .on_stall(move |report: &StallReport| {
            let _keep = &sentinel;
            sink.lock().unwrap().push(report.clone());
        })
        .build()
        .unwrap();
    let runtime = multi_thread(&looplag, 2);
    runtime.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
    let threads_before = thread_names().len();
    assert_eq!(looplag_threads(), 0);

    for round in 0..3 {
        let watchdog = looplag.start(runtime.handle()).expect("start");
        // The new thread names itself once it runs.
        assert!(
            wait_until(Duration::from_secs(1), || thread_names()
                .iter()
                .filter(|name| name.as_str() == "looplag-lifecyc")
                .count()
                == 1),
            "one watchdog thread, named after the runtime: {:?}",
            thread_names()
        );
        // Each round's watchdog works.
        runtime
            .block_on(
                runtime.spawn(
                    async { std::thread::sleep(Duration::from_millis(100)) }
                        .instrument(tracing::info_span!("culprit", round)),
                ),
            )
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(2), || {
                reports
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|r: &&StallReport| r.state == StallState::Ended)
                    .count()
                    == round + 1
            }),
            "round {round}: {:#?}",
            reports.lock().unwrap()
        );
        drop(watchdog);
        assert_eq!(looplag_threads(), 0, "{:?}", thread_names());
        assert_eq!(
            thread_names().len(),
            threads_before,
            "no thread left behind: {:?}",
            thread_names()
        );
    }

    // The last user handle goes, then the runtime: the running watchdog still holds the
    // instance (and a runtime handle, which holds the hooks).
    let watchdog = looplag.start(runtime.handle()).expect("start");
    drop(looplag);
    runtime.shutdown_timeout(Duration::from_secs(1));
    assert!(alive.upgrade().is_some(), "the running watchdog keeps it");
    drop(watchdog);
    assert!(
        alive.upgrade().is_none(),
        "dropping the watchdog released the instance (its Arc<Inner>) and the hooks"
    );
    assert_eq!(looplag_threads(), 0);
}

#[test]
fn start_races_from_four_threads_start_exactly_one_watchdog() {
    let h = harness(|b| b.runtime_name("racy"));
    let runtime = multi_thread(&h.looplag, 2);
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (looplag, handle, barrier) = (
                h.looplag.clone(),
                runtime.handle().clone(),
                Arc::clone(&barrier),
            );
            std::thread::spawn(move || {
                barrier.wait();
                looplag.start(&handle)
            })
        })
        .collect();
    let results: Vec<_> = threads
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .collect();
    let started: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(started.len(), 1, "{results:?}");
    for result in &results {
        if let Err(err) = result {
            assert!(
                matches!(err, looplag::Error::AlreadyStarted { runtime_name } if runtime_name == "racy"),
                "{err}"
            );
        }
    }
    assert!(
        wait_until(Duration::from_secs(1), || looplag_threads() == 1),
        "one watchdog thread: {:?}",
        thread_names()
    );
    drop(results);
    assert_eq!(looplag_threads(), 0);
    // And it can be started again.
    let again = h.looplag.start(runtime.handle()).expect("restart");
    drop(again);
}

/// Sum of counter `name` per `tokio.runtime.name`, in the latest export.
fn counter_by_runtime(h: &Harness, name: &str) -> HashMap<String, u64> {
    let mut by_runtime = HashMap::new();
    if let Some(export) = h.collect().last() {
        for scope in export.scope_metrics() {
            for metric in scope.metrics().filter(|m| m.name() == name) {
                if let AggregatedMetrics::U64(MetricData::Sum(sum)) = metric.data() {
                    for point in sum.data_points() {
                        *by_runtime
                            .entry(runtime_of(point.attributes()))
                            .or_default() += point.value();
                    }
                }
            }
        }
    }
    by_runtime
}

/// Sample count of histogram `name` per `tokio.runtime.name`, in the latest export.
fn histogram_counts_by_runtime(h: &Harness, name: &str) -> HashMap<String, u64> {
    let mut by_runtime = HashMap::new();
    if let Some(export) = h.collect().last() {
        for scope in export.scope_metrics() {
            for metric in scope.metrics().filter(|m| m.name() == name) {
                if let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = metric.data() {
                    for point in histogram.data_points() {
                        *by_runtime
                            .entry(runtime_of(point.attributes()))
                            .or_default() += point.count();
                    }
                }
            }
        }
    }
    by_runtime
}

fn runtime_of<'a>(mut attributes: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> String {
    attributes
        .find(|kv| kv.key.as_str() == "tokio.runtime.name")
        .map(|kv| kv.value.to_string())
        .unwrap_or_default()
}

fn traffic(
    runtime: &tokio::runtime::Runtime,
    name: &'static str,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|_| {
            let stop = Arc::clone(stop);
            runtime.spawn(
                async move {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                .instrument(tracing::info_span!("traffic", runtime = name)),
            )
        })
        .collect()
}

#[test]
fn two_runtimes_each_report_under_their_own_name() {
    let h = harness(|b| b.runtime_name("alpha"));
    let beta_reports = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&beta_reports);
    let beta = LoopLag::builder()
        .runtime_name("beta")
        .meter(opentelemetry::metrics::MeterProvider::meter(
            &h.meter_provider,
            "looplag",
        ))
        .tracer(h.tracer_provider.tracer("looplag"))
        .on_stall(move |report: &StallReport| sink.lock().unwrap().push(report.clone()))
        .build()
        .unwrap();
    let alpha_rt = multi_thread(&h.looplag, 2);
    let beta_rt = multi_thread(&beta, 2);
    let alpha_watchdog = h.looplag.start(alpha_rt.handle()).expect("start alpha");
    let beta_watchdog = beta.start(beta_rt.handle()).expect("start beta");
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = traffic(&alpha_rt, "alpha", &stop);
    tasks.extend(traffic(&beta_rt, "beta", &stop));
    std::thread::sleep(Duration::from_millis(100));

    run_in_span(&alpha_rt, || tracing::info_span!("culprit_alpha"), async {
        std::thread::sleep(Duration::from_millis(200))
    });
    h.wait_ended(1, Duration::from_secs(2));
    run_in_span(&beta_rt, || tracing::info_span!("culprit_beta"), async {
        std::thread::sleep(Duration::from_millis(300))
    });
    assert!(wait_until(Duration::from_secs(2), || first_report(
        &beta_reports,
        StallState::Ended
    )
    .is_some()));
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        // Each traffic task ends on its own runtime; both runtimes are multi-thread, so
        // blocking on a join handle from here is fine.
        alpha_rt.block_on(task).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    drop(alpha_watchdog);
    drop(beta_watchdog);

    // Callbacks: each instance saw its own stall only.
    let alpha_reports = h.reports();
    let beta_reports = beta_reports.lock().unwrap().clone();
    assert!(alpha_reports.iter().all(|r| r.runtime_name == "alpha"));
    assert!(beta_reports.iter().all(|r| r.runtime_name == "beta"));
    let alpha_ended: Vec<_> = alpha_reports
        .iter()
        .filter(|r| r.state == StallState::Ended)
        .collect();
    let beta_ended: Vec<_> = beta_reports
        .iter()
        .filter(|r| r.state == StallState::Ended)
        .collect();
    assert_eq!(alpha_ended.len(), 1, "{alpha_reports:#?}");
    assert_eq!(beta_ended.len(), 1, "{beta_reports:#?}");
    assert_in(alpha_ended[0].duration, Duration::from_millis(200), "alpha");
    assert_in(beta_ended[0].duration, Duration::from_millis(300), "beta");
    assert_eq!(alpha_ended[0].span_name, Some("culprit_alpha"));
    assert_eq!(beta_ended[0].span_name, Some("culprit_beta"));

    // Spans: each stall span carries its runtime's name and sits under its own culprit.
    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 2, "{stalls:#?}");
    for (runtime, culprit, expected) in [
        ("alpha", "culprit_alpha", Duration::from_millis(200)),
        ("beta", "culprit_beta", Duration::from_millis(300)),
    ] {
        let parent = span_id(&h.span_named(culprit));
        let stall = stalls
            .iter()
            .find(|s| s.parent_span_id == parent)
            .unwrap_or_else(|| panic!("a stall under {culprit}: {stalls:#?}"));
        assert_eq!(
            attr(stall, "tokio.runtime.name"),
            Some(Value::from(runtime))
        );
        assert_in(span_duration(stall), expected, runtime);
    }

    // Victims: a stall marks only requests of its own runtime.
    let spans = h.finished_spans();
    for stall in &stalls {
        let runtime = attr(stall, "tokio.runtime.name").unwrap().to_string();
        for victim in spans.iter().filter(|s| {
            s.links
                .iter()
                .any(|link| link.span_context == stall.span_context)
        }) {
            let victim_runtime = victim
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == "runtime")
                .map(|kv| kv.value.to_string());
            assert_eq!(
                victim_runtime.as_deref(),
                Some(runtime.as_str()),
                "a {runtime} stall marked {victim:#?}"
            );
        }
    }

    // Metrics: one stall each, under the right name; both probes sampled.
    let stalls_by_runtime = counter_by_runtime(&h, "tokio.eventloop.stalls");
    assert_eq!(
        stalls_by_runtime.get("alpha"),
        Some(&1),
        "{stalls_by_runtime:?}"
    );
    assert_eq!(
        stalls_by_runtime.get("beta"),
        Some(&1),
        "{stalls_by_runtime:?}"
    );
    assert_eq!(stalls_by_runtime.len(), 2, "{stalls_by_runtime:?}");
    let durations = histogram_counts_by_runtime(&h, "tokio.eventloop.stall.duration");
    assert_eq!(durations.get("alpha"), Some(&1), "{durations:?}");
    assert_eq!(durations.get("beta"), Some(&1), "{durations:?}");
    let delays = histogram_counts_by_runtime(&h, "tokio.eventloop.delay");
    assert!(delays.get("alpha").is_some_and(|n| *n > 10), "{delays:?}");
    assert!(delays.get("beta").is_some_and(|n| *n > 10), "{delays:?}");
}

#[test]
fn layer_without_a_started_watchdog_is_a_noop() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 2);
    let current = current_thread(&h.looplag);
    // Stalls far over the threshold, in spans, on hooked runtimes, on a blocking thread
    // and on a plain thread: with no watchdog, nothing is detected and nothing breaks.
    runtime
        .block_on(
            runtime.spawn(
                async {
                    std::thread::sleep(Duration::from_millis(150));
                    tokio::task::spawn_blocking(|| {
                        let _span = tracing::info_span!("blocking").entered();
                        std::thread::sleep(Duration::from_millis(20));
                    })
                    .await
                    .unwrap();
                }
                .instrument(tracing::info_span!("culprit_multi")),
            ),
        )
        .unwrap();
    current.block_on(
        async { std::thread::sleep(Duration::from_millis(150)) }
            .instrument(tracing::info_span!("culprit_current")),
    );
    std::thread::spawn(|| {
        let _span = tracing::info_span!("plain_thread").entered();
        std::thread::sleep(Duration::from_millis(20));
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));

    assert!(h.reports().is_empty(), "{:#?}", h.reports());
    assert!(h.stall_spans().is_empty());
    assert_eq!(h.counter("tokio.eventloop.stalls"), 0);
    assert_eq!(looplag_threads(), 0);
    // The application's own spans are unaffected.
    for name in [
        "culprit_multi",
        "culprit_current",
        "blocking",
        "plain_thread",
    ] {
        h.span_named(name);
    }
}

#[test]
fn watchdog_without_the_layer_exports_root_stall_spans_without_victims() {
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let spans = InMemorySpanExporter::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let metrics = InMemoryMetricExporter::default();
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(metrics.clone()).build())
        .build();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&reports);
    let looplag = LoopLag::builder()
        .meter(opentelemetry::metrics::MeterProvider::meter(
            &meter_provider,
            "looplag",
        ))
        .tracer(tracer_provider.tracer("looplag"))
        .on_stall(move |report: &StallReport| sink.lock().unwrap().push(report.clone()))
        .build()
        .unwrap();
    // tracing-opentelemetry only: looplag's layer is not installed.
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(tracer_provider.tracer("test")))
        .init();

    let runtime = multi_thread(&looplag, 2);
    let watchdog = looplag.start(runtime.handle()).expect("start");
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&runtime, "main", &stop);
    std::thread::sleep(Duration::from_millis(100));
    let blocked = Instant::now();
    runtime
        .block_on(
            runtime.spawn(
                async { std::thread::sleep(Duration::from_millis(300)) }
                    .instrument(tracing::info_span!("culprit")),
            ),
        )
        .unwrap();
    let blocked = blocked.elapsed();
    let ended = |reports: &Mutex<Vec<StallReport>>| {
        reports
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.state == StallState::Ended)
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(2), || ended(&reports) >= 1),
        "the stall is still detected (poll hooks under tokio_unstable, tokio's worker \
         metrics on stable)"
    );
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        runtime.block_on(task).unwrap();
    }
    drop(watchdog);
    tracer_provider.force_flush().unwrap();
    let finished = spans.get_finished_spans().unwrap();

    let reports = reports.lock().unwrap().clone();
    let ended: Vec<_> = reports
        .iter()
        .filter(|r| r.state == StallState::Ended)
        .collect();
    assert_eq!(ended.len(), 1, "{reports:#?}");
    assert_eq!(ended[0].span_name, None, "no layer, no span name");
    assert_eq!(ended[0].victims, 0);
    // Exact under tokio_unstable; estimated from worker metrics (within a sample interval
    // or two) on stable.
    assert!(
        ended[0].duration >= Duration::from_millis(250)
            && ended[0].duration <= blocked + Duration::from_millis(60),
        "{:?} for a 300 ms block ({blocked:?} seen by the test)",
        ended[0].duration
    );

    let stalls: Vec<_> = finished
        .iter()
        .filter(|s| s.name == "tokio.eventloop.stall")
        .collect();
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    let stall = stalls[0];
    let culprit = finished.iter().find(|s| s.name == "culprit").unwrap();
    assert_eq!(stall.parent_span_id, SpanId::INVALID, "a root span");
    assert_ne!(
        stall.span_context.trace_id(),
        culprit.span_context.trace_id()
    );
    assert_eq!(
        attr(stall, "tokio.eventloop.stall.victims"),
        Some(Value::I64(0))
    );
    for span in finished.iter().filter(|s| s.name == "traffic") {
        assert!(
            span.events
                .iter()
                .all(|event| event.name != "tokio.eventloop.stall")
                && span.links.is_empty(),
            "no victim events without the layer: {span:#?}"
        );
    }
}
