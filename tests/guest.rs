//! looplag as a guest in someone else's service: it switches on no callsite the user's
//! filters had off, its first report never waits for the stack, and a user whose filters
//! hide looplag's WARN lines is told so.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{harness, harness_with, multi_thread, run_in_span, span_id, wait_until};
use looplag::{StackCapture, StallReport, StallState};
use tracing::Level;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

/// Evaluations of the field of the DEBUG event in the stalled task: a field is evaluated
/// only when the event's callsite is enabled.
static DEBUG_FIELD_EVALUATED: AtomicUsize = AtomicUsize::new(0);

fn debug_field() -> usize {
    DEBUG_FIELD_EVALUATED.fetch_add(1, Ordering::SeqCst)
}

/// The user's layers have per-layer INFO filters: with looplag's layer in the stack, a
/// DEBUG event callsite stays off (its fields are never evaluated), and a stall is still
/// detected, under its request span.
#[test]
fn a_debug_event_behind_an_info_filter_stays_off_and_the_stall_is_still_reported() {
    let h = harness_with(
        |b| b,
        |looplag, tracer| {
            tracing_subscriber::registry()
                .with(looplag.layer())
                .with(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(LevelFilter::INFO),
                )
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_test_writer()
                        .with_filter(LevelFilter::INFO),
                )
                .try_init()
                .expect("one global subscriber per test process: run with cargo nextest");
        },
    );
    assert!(!tracing::enabled!(Level::DEBUG), "DEBUG stays off");
    assert!(
        tracing::enabled!(Level::INFO),
        "INFO is on: the filters work"
    );

    let runtime = multi_thread(&h.looplag, 2);
    let report = h.stall_in_span(
        &runtime,
        || tracing::info_span!("request"),
        async {
            tracing::debug!(field = debug_field(), "not wanted by any layer");
            assert!(
                !tracing::enabled!(Level::DEBUG),
                "DEBUG stays off in a task"
            );
            std::thread::sleep(Duration::from_millis(200));
        },
        Duration::from_secs(10),
    );
    assert_eq!(DEBUG_FIELD_EVALUATED.load(Ordering::SeqCst), 0);
    assert_eq!(report.span_name, Some("request"), "{report:#?}");
    assert!(report.exact, "{report:#?}");
    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    assert_eq!(
        stalls[0].parent_span_id,
        span_id(&h.span_named("request")),
        "the stall span is a child of the request span"
    );
}

/// A layer with no filter and no code: what tracing-subscriber does with an unfiltered layer.
struct Bare;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Bare {}

/// The control for the test above: an unfiltered layer, with the default interest, switches
/// the DEBUG callsite on; looplag's layer, in either place, does not. And looplag's layer
/// never switches off what another layer wants: next to an unfiltered log layer, DEBUG
/// events stay on.
#[test]
fn looplag_switches_no_event_on_or_off() {
    let looplag = looplag::LoopLag::builder().build().expect("looplag");
    macro_rules! info_log {
        () => {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(LevelFilter::INFO)
        };
    }
    let bare = tracing_subscriber::registry().with(Bare).with(info_log!());
    tracing::subscriber::with_default(bare, || {
        assert!(
            tracing::enabled!(Level::DEBUG),
            "an unfiltered layer wants everything"
        );
    });
    let first = tracing_subscriber::registry()
        .with(looplag.layer())
        .with(info_log!());
    tracing::subscriber::with_default(first, || {
        assert!(!tracing::enabled!(Level::DEBUG));
        assert!(tracing::enabled!(Level::INFO));
    });
    let last = tracing_subscriber::registry()
        .with(info_log!())
        .with(looplag.layer());
    tracing::subscriber::with_default(last, || {
        assert!(!tracing::enabled!(Level::DEBUG));
        assert!(tracing::enabled!(Level::INFO));
    });
    for looplag_first in [true, false] {
        macro_rules! log {
            () => {
                tracing_subscriber::fmt::layer().with_test_writer()
            };
        }
        let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = if looplag_first {
            Box::new(
                tracing_subscriber::registry()
                    .with(looplag.layer())
                    .with(log!()),
            )
        } else {
            Box::new(
                tracing_subscriber::registry()
                    .with(log!())
                    .with(looplag.layer()),
            )
        };
        tracing::subscriber::with_default(subscriber, || {
            assert!(
                tracing::enabled!(Level::TRACE),
                "an unfiltered log layer still gets every event (looplag first: {looplag_first})"
            );
        });
    }
}

/// The common harness, with tracing-opentelemetry's layer filtered at `otel_level`.
fn span_level_harness(
    configure: impl FnOnce(looplag::Builder) -> looplag::Builder,
    otel_level: LevelFilter,
) -> common::Harness {
    harness_with(configure, move |looplag, tracer| {
        tracing_subscriber::registry()
            .with(looplag.layer())
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(otel_level),
            )
            .try_init()
            .expect("one global subscriber per test process: run with cargo nextest");
    })
}

/// A 150 ms stall in a DEBUG span `debug_inner` inside an INFO span `request`.
fn stall_in_a_debug_span_in_a_request(h: &common::Harness) -> looplag::StallReport {
    let runtime = multi_thread(&h.looplag, 2);
    h.stall_in_span(
        &runtime,
        || tracing::info_span!("request"),
        async {
            let _inner = tracing::debug_span!("debug_inner").entered();
            std::thread::sleep(Duration::from_millis(150));
        },
        Duration::from_secs(10),
    )
}

/// With `span_level(INFO)` and no other layer wanting DEBUG spans, the DEBUG span does not
/// exist: the stall in it is reported under the enclosing INFO request span.
#[test]
fn a_span_below_span_level_that_no_layer_wants_is_not_created() {
    let h = span_level_harness(|b| b.span_level(Level::INFO), LevelFilter::INFO);
    assert_eq!(h.looplag.span_level(), Level::INFO);
    let report = stall_in_a_debug_span_in_a_request(&h);
    assert_eq!(report.span_name, Some("request"), "{report:#?}");
}

/// With `span_level(INFO)`, a DEBUG span that another layer wants exists, and looplag sees
/// it like any other: the stall is reported under it.
#[test]
fn a_span_below_span_level_that_another_layer_wants_is_seen() {
    let h = span_level_harness(|b| b.span_level(Level::INFO), LevelFilter::TRACE);
    let report = stall_in_a_debug_span_in_a_request(&h);
    assert_eq!(report.span_name, Some("debug_inner"), "{report:#?}");
}

/// The default span level (DEBUG) makes DEBUG spans exist though no other layer wants them:
/// the same stall is reported under the innermost span.
#[test]
fn the_default_span_level_creates_debug_spans() {
    let h = span_level_harness(|b| b, LevelFilter::INFO);
    assert_eq!(h.looplag.span_level(), looplag::DEFAULT_SPAN_LEVEL);
    assert_eq!(looplag::DEFAULT_SPAN_LEVEL, Level::DEBUG);
    let report = stall_in_a_debug_span_in_a_request(&h);
    assert_eq!(report.span_name, Some("debug_inner"), "{report:#?}");
}

/// `span_level` from the builder, from `LOOPLAG_SPAN_LEVEL`, and a bad variable.
#[test]
fn span_level_comes_from_the_builder_or_the_environment() {
    let built = looplag::LoopLag::builder()
        .span_level(Level::WARN)
        .build()
        .expect("valid");
    assert_eq!(built.span_level(), Level::WARN);
    std::env::set_var("LOOPLAG_SPAN_LEVEL", "trace");
    let from_env = looplag::LoopLag::builder()
        .from_env()
        .build()
        .expect("valid");
    assert_eq!(from_env.span_level(), Level::TRACE);
    let explicit_wins = looplag::LoopLag::builder()
        .span_level(Level::ERROR)
        .from_env()
        .build()
        .expect("valid");
    assert_eq!(explicit_wins.span_level(), Level::ERROR);
    std::env::set_var("LOOPLAG_SPAN_LEVEL", "INFO");
    let err = looplag::LoopLag::builder()
        .from_env()
        .build()
        .expect_err("upper case is not accepted");
    let message = err.to_string();
    assert!(
        message.contains("LOOPLAG_SPAN_LEVEL") && message.contains("\"INFO\""),
        "{message}"
    );
    std::env::remove_var("LOOPLAG_SPAN_LEVEL");
}

/// How late the first report may arrive after the threshold, beyond one sample interval:
/// the watchdog thread's wake-up and the report on a loaded 2-core machine. The capture
/// timeout (100 ms) is well beyond it: a first report that waited for the stack arrives at
/// least 150 ms into the stall.
const FIRST_REPORT_TOLERANCE: Duration = Duration::from_millis(35);

/// Blocks the stack signal on the calling thread: looplag's capture can never interrupt it.
fn block_stack_signal() {
    // SAFETY: `sigset_t` is plain data initialised by `sigemptyset`; `pthread_sigmask` only
    // changes the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, looplag::DEFAULT_STACK_SIGNAL);
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            0
        );
    }
}

/// A worker that blocks the stack signal: the first report (with the stack pending) arrives
/// within one sample interval of the threshold, not after the capture timeout; the end
/// report says why there is no stack.
#[test]
fn the_first_report_does_not_wait_for_a_thread_that_cannot_take_the_stack_signal() {
    let arrivals: Arc<Mutex<Vec<(SystemTime, StallReport)>>> = Arc::default();
    let sink = Arc::clone(&arrivals);
    let h = harness(move |b| {
        b.on_stall(move |report| {
            sink.lock()
                .unwrap()
                .push((SystemTime::now(), report.clone()))
        })
    });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(1)
        .on_thread_start(block_stack_signal)
        .enable_all();
    h.looplag.hook_runtime(&mut builder);
    let runtime = builder.build().expect("runtime");
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    run_in_span(&runtime, || tracing::info_span!("request"), async {
        std::thread::sleep(Duration::from_millis(400))
    });
    let ended = || {
        arrivals
            .lock()
            .unwrap()
            .iter()
            .any(|(_, report)| report.state == StallState::Ended)
    };
    assert!(wait_until(Duration::from_secs(10), ended), "the stall ends");
    drop(watchdog);
    let arrivals = arrivals.lock().unwrap().clone();
    let (arrived, first) = &arrivals[0];
    assert_eq!(first.state, StallState::InProgress, "{arrivals:#?}");
    assert_eq!(first.report_number, 1);
    assert_eq!(first.span_name, Some("request"));
    assert_eq!(
        first.stack,
        StackCapture::Symbolizing,
        "pending, not waited for"
    );
    let latency = arrived.duration_since(first.started_at).unwrap_or_default();
    let bound = h.looplag.stall_threshold() + h.looplag.sample_interval() + FIRST_REPORT_TOLERANCE;
    assert!(
        latency <= bound,
        "first report {latency:?} into the stall, bound {bound:?}: {arrivals:#?}"
    );
    let (_, last) = arrivals.last().expect("reports");
    assert_eq!(last.state, StallState::Ended);
    match &last.stack {
        StackCapture::Failed(why) => assert!(why.contains("timeout"), "{why}"),
        other => panic!("the signal is blocked, no stack: {other:?}"),
    }
}

/// The variable that makes a run of this test binary the fixture of the silenced-WARN test.
const FIXTURE: &str = "LOOPLAG_GUEST_FIXTURE";
const NOTICE: &str = "looplag: a stall was detected but looplag's WARN log lines";

/// A server whose global filter (an `EnvFilter` applied to the whole subscriber, as
/// `tracing_subscriber::fmt::try_init()` installs one) drops looplag's WARN lines: the user
/// is told once on stderr, the `on_stall` callback still gets every report. With the filter
/// at WARN, no note and the stall lines. The server runs as a subprocess (this test binary,
/// re-run on this one test) so that its stderr can be read.
#[test]
fn a_silenced_warn_is_told_once_on_stderr() {
    if let Ok(filter) = std::env::var(FIXTURE) {
        silenced_fixture(&filter);
        return;
    }
    let run = |filter: &str| {
        let output = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "a_silenced_warn_is_told_once_on_stderr",
                "--nocapture",
            ])
            .env(FIXTURE, filter)
            .env_remove("RUST_LOG")
            .output()
            .expect("run the fixture");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "fixture with {filter}: {stdout}\n{stderr}"
        );
        let reports: usize = stdout
            .lines()
            .find_map(|line| line.strip_prefix("FIXTURE reports="))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("the fixture's report count: {stdout}"));
        (reports, stderr)
    };

    let (reports, stderr) = run("error");
    assert!(reports >= 4, "two stalls, two reports each at least");
    assert_eq!(stderr.matches(NOTICE).count(), 1, "told once: {stderr}");
    // The third stall's span has no OpenTelemetry context: told once, on stderr too.
    assert_eq!(
        stderr.matches("which has no OpenTelemetry context").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("looplag=warn"), "{stderr}");
    assert!(!stderr.contains("stall in progress"), "{stderr}");

    let (reports, stderr) = run("warn");
    assert!(reports >= 4);
    assert_eq!(stderr.matches(NOTICE).count(), 0, "{stderr}");
    // Here as looplag's WARN line (the fmt layer prints it), not a second time.
    assert_eq!(
        stderr.matches("which has no OpenTelemetry context").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("stall in progress"), "{stderr}");
}

/// The fixture: a global `EnvFilter` of `filter`, two stalls in a request span, a third in a
/// span tracing-opentelemetry's layer filters out (target `no_otel`), the report count on
/// stdout.
fn silenced_fixture(filter: &str) {
    let filter = filter.to_string();
    let h = harness_with(
        |b| b,
        |looplag, tracer| {
            tracing_subscriber::registry()
                .with(tracing_subscriber::EnvFilter::new(filter))
                .with(looplag.layer())
                .with(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(
                            tracing_subscriber::filter::Targets::new()
                                .with_default(tracing::Level::TRACE)
                                .with_target(
                                    "no_otel",
                                    tracing_subscriber::filter::LevelFilter::OFF,
                                ),
                        ),
                )
                .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
                .try_init()
                .expect("one global subscriber");
        },
    );
    let runtime = multi_thread(&h.looplag, 2);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    for _ in 0..2 {
        run_in_span(&runtime, || tracing::error_span!("request"), async {
            std::thread::sleep(Duration::from_millis(150))
        });
    }
    run_in_span(
        &runtime,
        || tracing::error_span!(target: "no_otel", "hidden"),
        async { std::thread::sleep(Duration::from_millis(150)) },
    );
    h.wait_ended(3, Duration::from_secs(10));
    drop(watchdog);
    println!("FIXTURE reports={}", h.reports().len());
}
