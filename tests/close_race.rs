//! Spans closing while the watchdog looks them up must not make it panic.
//!
//! When a stall ends, the watchdog asks tracing-opentelemetry for the context of every
//! request span that waited (the victims) while the worker, unblocked, is closing the ones
//! that have finished. tracing-opentelemetry panics when asked about a span the registry has
//! just removed; looplag's close gate (`src/close_gate.rs`) prevents that. This test makes
//! the race as likely as possible: a current-thread runtime (every in-flight request is a
//! victim) with hundreds of short-lived request spans, and hundreds of short stalls, each
//! ending right as a batch of requests finishes.
//!
//! looplag's layer sits before (inside) tracing-opentelemetry's, the order the docs ask for:
//! its `on_close` then runs first, so a lookup never overlaps tracing-opentelemetry's own
//! `on_close` (whose debug assertion, in debug builds, panics if another thread still holds
//! the span's data then).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use looplag::{LoopLag, StallReport, StallState};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

static WATCHDOG_PANICS: AtomicU64 = AtomicU64::new(0);

#[test]
fn victims_closing_while_a_stall_ends_never_panic_the_watchdog() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current()
            .name()
            .is_some_and(|name| name.starts_with("looplag-"))
        {
            WATCHDOG_PANICS.fetch_add(1, Ordering::Relaxed);
        }
        default(info);
    }));
    let spans = InMemorySpanExporter::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&reports);
    let looplag = LoopLag::builder()
        .sample_interval(Duration::from_millis(1))
        .stall_threshold(Duration::from_millis(1))
        .max_stall_logs_per_second(0)
        .tracer(tracer_provider.tracer("looplag"))
        .on_stall(move |report: &StallReport| {
            if report.state == StallState::Ended {
                sink.lock().unwrap().push(report.victims);
            }
        })
        .build()
        .unwrap();
    tracing_subscriber::registry()
        .with(looplag.layer())
        .with(tracing_opentelemetry::layer().with_tracer(tracer_provider.tracer("test")))
        .init();
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    looplag.hook_runtime(&mut builder);
    let runtime = builder.build().unwrap();
    let watchdog = looplag.start(runtime.handle()).expect("start");

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rounds = 0u64;
    runtime.block_on(async {
        // The thread registers with looplag at its first park.
        tokio::time::sleep(Duration::from_millis(5)).await;
        while Instant::now() < deadline {
            rounds += 1;
            let requests: Vec<_> = (0..200)
                .map(|i| {
                    tokio::spawn(
                        async { tokio::task::yield_now().await }
                            .instrument(tracing::info_span!("request", i)),
                    )
                })
                .collect();
            // Every request is polled once (they become victims of this worker), then the
            // culprit blocks; the stall ends as the requests complete and close.
            tokio::spawn(
                async { std::thread::sleep(Duration::from_millis(3)) }
                    .instrument(tracing::info_span!("culprit")),
            )
            .await
            .unwrap();
            for request in requests {
                request.await.unwrap();
            }
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    drop(watchdog);

    let ended = reports.lock().unwrap().clone();
    println!(
        "{rounds} rounds, {} stalls ended, {} victims marked, {} spans exported",
        ended.len(),
        ended.iter().sum::<usize>(),
        spans.get_finished_spans().unwrap().len()
    );
    assert_eq!(
        WATCHDOG_PANICS.load(Ordering::Relaxed),
        0,
        "the watchdog panicked"
    );
    assert!(
        ended.len() as u64 >= rounds / 2,
        "most of the {rounds} stalls were seen: {}",
        ended.len()
    );
}
