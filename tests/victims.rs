//! Victims are the requests that were ready to run during a stall and could not: not every
//! request open on the stalled worker.
//!
//! Each test: request spans idle through one stall (a 1.5 s timer), others active (a 5 ms
//! timer loop, or woken right before the stall), and the set marked must be the set held up.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use looplag::LoopLag;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Value;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

const STALL: Duration = Duration::from_millis(200);
const IDLE: usize = 200;
const ACTIVE: usize = 3;
/// A request whose wake-up was this late was held up by the 200 ms stall.
const HELD_UP: Duration = Duration::from_millis(100);

fn victim_event(span: &SpanData) -> Option<&opentelemetry::trace::Event> {
    let events: Vec<_> = span
        .events
        .iter()
        .filter(|event| event.name == "tokio.eventloop.stall")
        .collect();
    assert!(events.len() <= 1, "one event per stall: {span:#?}");
    events.first().copied()
}

fn event_attr(event: &opentelemetry::trace::Event, key: &str) -> Option<Value> {
    event
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn wait_of(event: &opentelemetry::trace::Event) -> Duration {
    match event_attr(event, "tokio.eventloop.stall.wait") {
        Some(Value::F64(seconds)) => Duration::from_secs_f64(seconds),
        other => panic!("the wait is an f64: {other:?}"),
    }
}

/// The `i` field of the marked spans named `name`.
fn marked(spans: &[SpanData], name: &str) -> BTreeSet<i64> {
    spans
        .iter()
        .filter(|span| span.name == name && victim_event(span).is_some())
        .map(|span| match attr(span, "i") {
            Some(Value::I64(i)) => i,
            Some(other) => other
                .as_str()
                .parse()
                .unwrap_or_else(|_| panic!("span {name} has its index: {other:?}")),
            None => panic!("span {name} has its index: {span:#?}"),
        })
        .collect()
}

/// A 200 ms stall in a `culprit` task span.
async fn culprit() {
    tokio::spawn(async { std::thread::sleep(STALL) }.instrument(tracing::info_span!("culprit")))
        .await
        .unwrap();
}

/// Idle requests (1.5 s timers) and active ones (5 ms timer loops) around `stall`; returns
/// each active request's longest wait between polls.
async fn idle_and_active(stall: impl std::future::Future<Output = ()>) -> Vec<Duration> {
    let idle: Vec<_> = (0..IDLE as i64)
        .map(|i| {
            tokio::spawn(
                async { tokio::time::sleep(Duration::from_millis(1500)).await }
                    .instrument(tracing::info_span!("idle", i)),
            )
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let active: Vec<_> = (0..ACTIVE as i64)
        .map(|i| {
            let stop = Arc::clone(&stop);
            tokio::spawn(
                async move {
                    let mut longest = Duration::ZERO;
                    while !stop.load(Ordering::Relaxed) {
                        let asleep = Instant::now();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        longest = longest.max(asleep.elapsed());
                    }
                    longest
                }
                .instrument(tracing::info_span!("active", i)),
            )
        })
        .collect();
    // Every request polled, and the watchdog ticked, before the stall.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stall.await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let mut longest = Vec::new();
    for task in active {
        longest.push(task.await.unwrap());
    }
    for task in idle {
        task.await.unwrap();
    }
    longest
}

fn one_ended_stall(h: &Harness) -> SpanData {
    assert!(
        wait_until(Duration::from_secs(10), || h.ended_reports().len() == 1),
        "one ended stall: {:#?}",
        h.reports()
    );
    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    stalls[0].clone()
}

/// Current-thread: every active request waits on the stall (one thread), no idle one does.
#[test]
fn current_thread_marks_the_active_requests_and_no_idle_one() {
    let h = harness(|b| b);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let longest = runtime.block_on(idle_and_active(culprit()));
    let stall = one_ended_stall(&h);
    drop(watchdog);
    for (i, longest) in longest.iter().enumerate() {
        assert!(*longest >= HELD_UP, "active {i} was held up: {longest:?}");
    }

    let spans = h.finished_spans();
    assert_eq!(marked(&spans, "idle"), BTreeSet::new(), "no idle request");
    assert_eq!(marked(&spans, "active"), (0..ACTIVE as i64).collect());
    assert_eq!(
        attr(&stall, "tokio.eventloop.stall.victims"),
        Some(Value::I64(ACTIVE as i64))
    );
    let duration = span_duration(&stall);
    for span in spans.iter().filter(|span| span.name == "active") {
        let event = victim_event(span).expect("marked");
        let wait = wait_of(event);
        // Its 5 ms timer fired early in the stall: held up for about the stall's length;
        // the wait is measured from the stall's start, so it is at least the stall.
        assert!(
            wait >= duration && wait <= duration + Duration::from_millis(50),
            "waited about the stall: {wait:?}, stall {duration:?}"
        );
        assert_eq!(
            event_attr(event, "tokio.eventloop.stall.wait.exact"),
            Some(Value::Bool(false))
        );
    }
}

/// Multi-thread, 2 workers: the other worker runs what the driver wakes during the stall
/// and steals from the stalled worker's queue, so only what stayed queued behind the stall
/// waited on it. Besides the idle and active requests, three `pinged` requests are woken by
/// the culprit right before it blocks, onto the stalled worker (the last one in its LIFO
/// slot, which no other worker steals: it waits). The requests marked must be exactly those
/// whose own clocks say they were held up, and there is at least one.
#[test]
fn multi_thread_marks_exactly_the_requests_held_up() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 2);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let (longest, pinged_waits) = runtime.block_on(async {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..3)
            .map(|_| tokio::sync::oneshot::channel::<Instant>())
            .unzip();
        let pinged: Vec<_> = receivers
            .into_iter()
            .zip(0i64..)
            .map(|(receiver, i)| {
                tokio::spawn(
                    async move {
                        let sent = receiver.await.expect("pinged");
                        let waited = sent.elapsed();
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        waited
                    }
                    .instrument(tracing::info_span!("pinged", i)),
                )
            })
            .collect();
        let pinger = async move {
            tokio::spawn(
                async move {
                    for sender in senders {
                        let _ = sender.send(Instant::now());
                    }
                    std::thread::sleep(STALL);
                }
                .instrument(tracing::info_span!("pinger")),
            )
            .await
            .unwrap();
        };
        let longest = idle_and_active(pinger).await;
        let mut waits = Vec::new();
        for task in pinged {
            waits.push(task.await.unwrap());
        }
        (longest, waits)
    });
    one_ended_stall(&h);
    drop(watchdog);

    let spans = h.finished_spans();
    assert_eq!(marked(&spans, "idle"), BTreeSet::new(), "no idle request");
    let held = |waits: &[Duration]| -> BTreeSet<i64> {
        (0..waits.len() as i64)
            .filter(|&i| waits[i as usize] >= HELD_UP)
            .collect()
    };
    let held_active = held(&longest);
    let held_pinged = held(&pinged_waits);
    println!("active longest waits {longest:?}, pinged waits {pinged_waits:?}");
    assert_eq!(marked(&spans, "active"), held_active, "{longest:?}");
    assert_eq!(marked(&spans, "pinged"), held_pinged, "{pinged_waits:?}");
    assert!(
        !held_pinged.is_empty(),
        "the request in the stalled worker's LIFO slot waited: {pinged_waits:?}"
    );
    for span in spans
        .iter()
        .filter(|s| s.name == "pinged" || s.name == "active")
    {
        if let Some(event) = victim_event(span) {
            assert!(wait_of(event) >= HELD_UP, "{span:#?}");
        }
    }
}

/// An idle request whose timer fires in the middle of the stall waited on it: marked, with a
/// wait from the stall's start (an upper bound: it was ready only from the middle).
#[test]
fn an_idle_request_whose_timer_fires_mid_stall_is_marked() {
    let h = harness(|b| b);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.block_on(async {
        let started = Instant::now();
        // The stall runs from about 50 ms to 250 ms: this timer fires at 150 ms.
        let mid = tokio::spawn(
            async { tokio::time::sleep(Duration::from_millis(150)).await }
                .instrument(tracing::info_span!("mid", i = 0)),
        );
        let late = tokio::spawn(
            async { tokio::time::sleep(Duration::from_millis(600)).await }
                .instrument(tracing::info_span!("late", i = 0)),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(started.elapsed() < Duration::from_millis(120), "on time");
        culprit().await;
        mid.await.unwrap();
        late.await.unwrap();
    });
    let stall = one_ended_stall(&h);
    drop(watchdog);
    let spans = h.finished_spans();
    assert_eq!(marked(&spans, "mid"), BTreeSet::from([0]));
    assert_eq!(marked(&spans, "late"), BTreeSet::new());
    let mid = h.span_named("mid");
    let event = victim_event(&mid).expect("marked");
    let duration = span_duration(&stall);
    let wait = wait_of(event);
    assert!(
        wait >= duration && wait <= duration + Duration::from_millis(50),
        "the wait is bounded by the stall's start: {wait:?}, stall {duration:?}"
    );
    assert_eq!(
        event_attr(event, "tokio.eventloop.stall.wait.exact"),
        Some(Value::Bool(false))
    );
}

/// Captures looplag's WARN messages.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "looplag"
            || *event.metadata().level() != tracing::Level::WARN
        {
            return;
        }
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        self.0.lock().unwrap().push(message.0);
    }
}

/// A harness with the layers in the given order, tracing-opentelemetry's layer filtered at
/// `otel_level`, and looplag's WARNs captured.
fn custom_harness(otel_first: bool, otel_level: LevelFilter) -> (Harness, Warnings) {
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
        .tracer(tracer_provider.tracer("looplag"))
        .on_stall(move |report| sink.lock().unwrap().push(report.clone()))
        .build()
        .expect("looplag");
    // A macro: the layer's type depends on the subscriber it is added to.
    macro_rules! otel {
        () => {
            tracing_opentelemetry::layer()
                .with_tracer(tracer_provider.tracer("test"))
                .with_filter(otel_level)
        };
    }
    let warnings = Warnings::default();
    if otel_first {
        tracing_subscriber::registry()
            .with(otel!())
            .with(looplag.layer())
            .with(warnings.clone())
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(looplag.layer())
            .with(otel!())
            .with(warnings.clone())
            .try_init()
    }
    .expect("one global subscriber per test process: run the tests with cargo nextest");
    let harness = Harness {
        spans,
        metrics,
        tracer_provider,
        meter_provider,
        looplag,
        reports,
    };
    (harness, warnings)
}

/// A stall in a span tracing-opentelemetry's layer filters out (a DEBUG span under an
/// `info` per-layer filter, as tower-http's `TraceLayer` spans are): the stall span is still
/// exported, names the span, and looplag says once why it has no parent.
#[test]
fn a_stall_in_a_span_without_opentelemetry_context_is_exported_with_its_name_and_a_warning() {
    let (h, warnings) = custom_harness(false, LevelFilter::INFO);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.block_on(async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..2 {
            tokio::spawn(
                async { std::thread::sleep(STALL) }.instrument(tracing::debug_span!("handler")),
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(
        wait_until(Duration::from_secs(10), || h.ended_reports().len() == 2),
        "{:#?}",
        h.reports()
    );
    drop(watchdog);
    let stalls = h.stall_spans();
    assert_eq!(
        stalls.len(),
        2,
        "both stall spans are exported: {stalls:#?}"
    );
    for stall in &stalls {
        assert_eq!(
            stall.parent_span_id,
            opentelemetry::trace::SpanId::INVALID,
            "no parent to attach to"
        );
        assert_eq!(
            attr(stall, "tokio.eventloop.stall.span.name"),
            Some(Value::from("handler"))
        );
    }
    let warned: Vec<String> = warnings
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|message| message.contains("no OpenTelemetry context"))
        .cloned()
        .collect();
    assert_eq!(warned.len(), 1, "warned once: {warned:#?}");
    assert!(
        warned[0].contains("`handler`")
            && warned[0].contains("filter")
            && warned[0].contains("TraceLayer"),
        "names the span and the likely fix: {}",
        warned[0]
    );
}

/// Both layer orders: requests whose timers fire during the stall, one finishing the instant
/// the stall ends and one sleeping on, are marked; an idle one is not; nothing panics.
fn victims_in_layer_order(otel_first: bool) {
    let (h, _warnings) = custom_harness(otel_first, LevelFilter::TRACE);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.block_on(async {
        let finishes = tokio::spawn(
            async { tokio::time::sleep(Duration::from_millis(100)).await }
                .instrument(tracing::info_span!("finishes", i = 0)),
        );
        let sleeps_on = tokio::spawn(
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            .instrument(tracing::info_span!("sleeps_on", i = 0)),
        );
        let idle = tokio::spawn(
            async { tokio::time::sleep(Duration::from_millis(800)).await }
                .instrument(tracing::info_span!("idle", i = 0)),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        culprit().await;
        finishes.await.unwrap();
        sleeps_on.await.unwrap();
        idle.await.unwrap();
    });
    let stall = one_ended_stall(&h);
    drop(watchdog);
    let spans = h.finished_spans();
    assert_eq!(marked(&spans, "finishes"), BTreeSet::from([0]));
    assert_eq!(marked(&spans, "sleeps_on"), BTreeSet::from([0]));
    assert_eq!(marked(&spans, "idle"), BTreeSet::new());
    assert_eq!(
        attr(&stall, "tokio.eventloop.stall.victims"),
        Some(Value::I64(2))
    );
    let culprit = h.span_named("culprit");
    assert_eq!(stall.parent_span_id, span_id(&culprit));
    assert!(victim_event(&culprit).is_none(), "not its own victim");
}

#[test]
fn victims_are_marked_with_looplag_before_opentelemetry() {
    victims_in_layer_order(false);
}

#[test]
fn victims_are_marked_with_opentelemetry_before_looplag() {
    victims_in_layer_order(true);
}
