//! End to end through a real collector: the demo's application and OTLP pipeline export to a
//! `rotel` process on loopback, over gRPC and over HTTP, and the tests read what rotel
//! received from its detailed debug log.
//!
//! rotel is installed by `scripts/test.sh` (`scripts/rotel.sh install`); a test that cannot
//! start it fails.

mod common;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::current_thread;
use looplag::{LoopLag, StallReport, StallState};
use support::rotel::{self, Collector, Dump, Span};
use support::telemetry::{OtlpTarget, Protocol, Telemetry};
use support::{app, Server};
use tracing::level_filters::LevelFilter;
use tracing::Instrument as _;
use tracing_subscriber::filter::Targets;

/// How long the collector gets to show what was sent (export + a loaded machine).
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Measured stall durations may exceed the injected block by the sleep's overshoot and
/// scheduling noise on a loaded 2-core machine; never by more than this.
const TOLERANCE: Duration = Duration::from_millis(200);

struct App {
    telemetry: Telemetry,
    looplag: LoopLag,
    reports: mpsc::Receiver<StallReport>,
}

/// The demo's pipeline, exporting to `target`, with looplag and the global subscriber.
fn app(service: &str, target: OtlpTarget, metric_interval: Duration) -> App {
    let (sender, reports) = mpsc::channel();
    let (telemetry, looplag) = support::otlp_pipeline(
        &support::otlp_settings(service, target, metric_interval),
        Targets::new().with_default(LevelFilter::WARN),
        move |report| {
            let _ = sender.send(report.clone());
        },
    );
    App {
        telemetry,
        looplag,
        reports,
    }
}

/// Waits for the first ended stall report (which waits for the stack's symbols: the first
/// symbolization of a debug build loads its debug info, seconds on a loaded machine).
fn ended_report(reports: &mpsc::Receiver<StallReport>) -> StallReport {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match reports.recv_timeout(left) {
            Ok(report) if report.state == StallState::Ended => return report,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    panic!("no ended stall report within 20 s");
}

/// `/block?ms=300` while three `/fast?ms=100` requests are in flight (their waits end
/// during the stall, so they are held up by it), on a current-thread runtime, exported to the collector with `protocol`; checks what the collector received.
fn block_while_fast_requests_wait(protocol: Protocol) {
    let collector = Collector::start();
    let url = match protocol {
        Protocol::Grpc => collector.grpc_url(),
        Protocol::HttpProtobuf => collector.http_url(),
    };
    let service = format!("looplag-e2e-{protocol:?}-{}", std::process::id());
    let app = app(
        &service,
        OtlpTarget::at(protocol, url),
        Duration::from_millis(500),
    );
    let runtime = current_thread(&app.looplag);
    let watchdog = app.looplag.start(runtime.handle()).expect("start looplag");
    let state = app::AppState::default();
    let server = Server::start(runtime, state.clone());

    // Three /fast requests waiting 100 ms each, then /block?ms=300 while they wait.
    let replies = support::concurrent_gets(
        server.addr,
        &["/fast?ms=100", "/fast?ms=100", "/fast?ms=100"],
        support::received(&state, 3),
        "/block?ms=300",
    );
    for reply in &replies {
        assert!(
            matches!(reply, Ok((200, _))),
            "every request succeeds: {replies:?}"
        );
    }
    let report = ended_report(&app.reports);
    let runtime = server.stop();
    drop(watchdog);
    app.telemetry.flush();

    let received = collector.wait_for(RECEIVE_TIMEOUT, |dump| {
        let spans: Vec<_> = dump.spans_of(&service).collect();
        spans.iter().any(|s| s.name == "tokio.eventloop.stall")
            && spans.iter().filter(|s| s.name == "GET /fast").count() == 3
            && spans.iter().any(|s| s.name == "GET /block")
            && dump
                .last_point(&service, "tokio.eventloop.stall.duration")
                .is_some_and(|(_, point)| point.count == Some(1))
    });
    check_block_scenario(&received, &service, &report, &collector);
    app.telemetry.shutdown();
    drop(runtime);
}

fn check_block_scenario(dump: &Dump, service: &str, report: &StallReport, collector: &Collector) {
    let log = collector.log_path().display();
    let spans: Vec<&Span> = dump.spans_of(service).collect();
    let stalls: Vec<&&Span> = spans
        .iter()
        .filter(|s| s.name == "tokio.eventloop.stall")
        .collect();
    assert_eq!(
        stalls.len(),
        1,
        "one stall span reached the collector ({log}): {spans:#?}"
    );
    let stall = stalls[0];

    // The stall span is a child of the /block request span, in its trace.
    let block: Vec<&&Span> = spans.iter().filter(|s| s.name == "GET /block").collect();
    assert_eq!(block.len(), 1, "one /block request span ({log})");
    let block = block[0];
    assert_eq!(
        stall.parent_id, block.span_id,
        "stall span's parent is the /block span"
    );
    assert_eq!(stall.trace_id, block.trace_id);
    assert_eq!(block.kind, "SPAN_KIND_SERVER");
    assert_eq!(block.attr("http.route").map(|a| a.text()), Some("/block"));
    assert_eq!(stall.kind, "SPAN_KIND_INTERNAL");
    assert_eq!(stall.scope, "looplag");
    assert_eq!(
        stall.attr("tokio.runtime.name").map(|a| a.text()),
        Some("main")
    );
    assert!(
        stall.attr("thread.id").and_then(|a| a.int()).is_some(),
        "thread.id is an Int: {stall:#?}"
    );
    let culprit = if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        check_diagnosis(stall, "app::block");
        Some(check_culprit(stall, report))
    } else {
        None
    };
    let duration = stall.duration();
    assert!(
        duration >= Duration::from_millis(300)
            && duration <= Duration::from_millis(300) + TOLERANCE,
        "the stall span lasts the 300 ms block (+{TOLERANCE:?}): {duration:?}"
    );
    assert_eq!(
        Some(stall.trace_id.as_str()),
        report.trace_id.map(|id| id.to_string()).as_deref(),
        "the report names the exported stall span's trace"
    );
    assert_eq!(
        stall
            .attr("tokio.eventloop.stall.victims")
            .and_then(|a| a.int()),
        Some(3),
        "three waiting requests marked"
    );

    // Each in-flight /fast request carries the victim event and a link to the stall span.
    let fast: Vec<&&Span> = spans.iter().filter(|s| s.name == "GET /fast").collect();
    assert_eq!(fast.len(), 3, "three /fast request spans ({log})");
    for victim in fast {
        let events: Vec<_> = victim
            .events
            .iter()
            .filter(|e| e.name == "tokio.eventloop.stall")
            .collect();
        assert_eq!(
            events.len(),
            1,
            "a /fast span carries one victim event: {victim:#?}"
        );
        let event = events[0];
        let get = |key: &str| rotel::attr(&event.attributes, key);
        assert_eq!(
            get("tokio.eventloop.stall.trace_id").map(|a| a.text()),
            Some(stall.trace_id.as_str())
        );
        assert_eq!(
            get("tokio.eventloop.stall.span_id").map(|a| a.text()),
            Some(stall.span_id.as_str())
        );
        let seconds = get("tokio.eventloop.stall.duration")
            .and_then(|a| a.double())
            .expect("the victim event's duration is a Double");
        assert!(
            (seconds - duration.as_secs_f64()).abs() < 1e-3,
            "victim event duration {seconds} s = stall span duration {duration:?}"
        );
        let wait = get("tokio.eventloop.stall.wait")
            .and_then(|a| a.double())
            .expect("the victim event's wait is a Double");
        assert!(
            wait >= seconds - 1e-3 && wait <= seconds + 0.2,
            "held up about the stall's length: {wait} s, stall {seconds} s"
        );
        assert!(
            victim
                .links
                .iter()
                .any(|l| l.trace_id == stall.trace_id && l.span_id == stall.span_id),
            "a /fast span links to the stall span: {victim:#?}"
        );
        assert_ne!(victim.trace_id, stall.trace_id, "victims are other traces");
    }
    assert!(
        !block
            .events
            .iter()
            .any(|e| e.name == "tokio.eventloop.stall"),
        "the culprit is not its own victim"
    );

    // Metrics.
    let (metric, stalls) = dump
        .last_point(service, "tokio.eventloop.stalls")
        .expect("tokio.eventloop.stalls reached the collector");
    assert_eq!(
        (metric.data_type.as_str(), metric.unit.as_str()),
        ("Sum", "{stall}")
    );
    assert_eq!(metric.monotonic, Some(true));
    assert_eq!(stalls.value, Some(1.0), "one stall counted");
    assert_eq!(
        rotel::attr(&stalls.attributes, "tokio.runtime.name").map(|a| a.text()),
        Some("main")
    );

    let (metric, stall_hist) = dump
        .last_point(service, "tokio.eventloop.stall.duration")
        .expect("tokio.eventloop.stall.duration reached the collector");
    assert_eq!(
        (metric.data_type.as_str(), metric.unit.as_str()),
        ("Histogram", "s")
    );
    assert_eq!(stall_hist.count, Some(1));
    if let Some(culprit) = &culprit {
        assert_eq!(
            rotel::attr(&stall_hist.attributes, "code.function.name").map(|a| a.text()),
            Some(culprit.as_str()),
            "the duration histogram carries the culprit's function: {stall_hist:#?}"
        );
    }
    let max = stall_hist.max.expect("Max");
    assert!(
        (max - duration.as_secs_f64()).abs() < 1e-3,
        "stall duration histogram max {max} s = the stall span's {duration:?}"
    );

    let (metric, delay) = dump
        .last_point(service, "tokio.eventloop.delay")
        .expect("tokio.eventloop.delay reached the collector");
    assert_eq!(
        (metric.data_type.as_str(), metric.unit.as_str()),
        ("Histogram", "s")
    );
    assert_eq!(
        delay.bounds.len(),
        16,
        "the default bucket boundaries: {delay:?}"
    );
    assert_eq!(delay.buckets.len(), 17);
    // One sample per 10 ms sample interval over the point's window (back-filled during the
    // stall). A loaded machine delays the watchdog's ticks, so accept down to a quarter.
    let count = delay.count.expect("Count");
    let ticks = (delay.time_ns.saturating_sub(delay.start_ns) / 10_000_000).max(1);
    assert!(
        count >= ticks / 4 && count <= ticks * 2,
        "about one sample per 10 ms over {ticks} intervals: {delay:?}"
    );
    let max = delay.max.expect("Max");
    assert!(
        (0.2..=0.3 + TOLERANCE.as_secs_f64()).contains(&max),
        "the probe that waited through the 300 ms stall saw most of it: max {max} s"
    );
    assert!(
        delay.count_at_least(0.025) >= 10,
        "samples missed during the stall are back-filled (about 30 of 25 ms or more): {delay:?}"
    );
    assert!(
        delay.min.expect("Min") < 0.025,
        "outside the stall the runtime answers quickly: {delay:?}"
    );
}

/// The stall diagnosis (Linux) crossed the collector intact: the kind, the system call, and
/// the multi-line `code.stacktrace`, whose frames include `culprit`.
/// The culprit frame on the exported stall span: the `/block` handler's own code (an
/// `async fn`, named without its `{{closure}}`), with file and line, as in the report.
/// Returns its `code.function.name`.
fn check_culprit(stall: &Span, report: &StallReport) -> String {
    let function = stall
        .attr("code.function.name")
        .map(|a| a.text().to_owned())
        .unwrap_or_else(|| panic!("code.function.name on the stall span: {stall:#?}"));
    assert!(
        function.ends_with("::app::block"),
        "the culprit is the /block handler: {function}"
    );
    let frame = report
        .culprit
        .frame()
        .expect("the report names the culprit");
    assert_eq!(frame.function, function);
    assert_eq!(
        stall.attr("code.file.path").map(|a| a.text()),
        frame.file.as_deref()
    );
    assert!(
        frame
            .file
            .as_deref()
            .is_some_and(|f| f.ends_with("demo/app.rs")),
        "{frame:?}"
    );
    assert_eq!(
        stall.attr("code.line.number").and_then(|a| a.int()),
        frame.line.map(i64::from)
    );
    function
}

fn check_diagnosis(stall: &Span, culprit: &str) {
    assert_eq!(
        stall.attr("tokio.eventloop.stall.kind").map(|a| a.text()),
        Some("blocked"),
        "a sleeping thread is blocked: {stall:#?}"
    );
    assert_eq!(
        stall
            .attr("tokio.eventloop.stall.syscall")
            .map(|a| a.text()),
        Some("clock_nanosleep")
    );
    let stack = stall
        .attr("code.stacktrace")
        .map(|a| a.text())
        .unwrap_or_else(|| panic!("code.stacktrace on the stall span: {stall:#?}"));
    let frames: Vec<&str> = stack.lines().collect();
    assert!(
        frames.len() >= 5 && frames[0].trim_start().starts_with("0: "),
        "the whole stack, one frame per line: {stack}"
    );
    assert!(
        frames
            .iter()
            .any(|frame| frame.contains("std::thread") && frame.contains("sleep")),
        "the stack shows std::thread::sleep: {stack}"
    );
    assert!(
        frames.iter().any(|frame| frame.contains(culprit)),
        "the stack names {culprit}: {stack}"
    );
}

#[test]
fn grpc_export_reaches_the_collector_with_stall_span_victims_and_histograms() {
    block_while_fast_requests_wait(Protocol::Grpc);
}

#[test]
fn http_export_reaches_the_collector_with_stall_span_victims_and_histograms() {
    block_while_fast_requests_wait(Protocol::HttpProtobuf);
}

/// A 3 s stall on a current-thread runtime: the stall counter reaches the collector while
/// the runtime is still blocked (the exporters run on their own runtime and threads), and
/// the stall's span and duration arrive once it ends.
#[test]
fn three_second_stall_reaches_the_collector_while_it_is_still_going_on() {
    const STALL: Duration = Duration::from_secs(3);
    let collector = Collector::start();
    let service = format!("looplag-e2e-in-progress-{}", std::process::id());
    let app = app(
        &service,
        OtlpTarget::at(Protocol::Grpc, collector.grpc_url()),
        Duration::from_millis(200),
    );
    let runtime = current_thread(&app.looplag);
    let watchdog = app.looplag.start(runtime.handle()).expect("start looplag");

    // Set by the blocking job itself: when it starts blocking, and when it stops.
    let block_started: Arc<OnceLock<Instant>> = Arc::default();
    let returned = Arc::new(AtomicBool::new(false));
    let blocked = {
        let (block_started, returned) = (Arc::clone(&block_started), Arc::clone(&returned));
        std::thread::spawn(move || {
            let blocked_for = runtime.block_on(async {
                // A running application: the runtime has been idle (parked) before the job.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let job = async move {
                    let started = *block_started.get_or_init(Instant::now);
                    std::thread::sleep(STALL);
                    returned.store(true, Ordering::SeqCst);
                    started.elapsed()
                };
                tokio::spawn(job.instrument(tracing::info_span!("slow_job")))
                    .await
                    .expect("the blocking task completes")
            });
            (runtime, blocked_for)
        })
    };

    // While the runtime is blocked: the counter says one stall, no stall has ended.
    let mut seen_after = None;
    let mut during = Dump::default();
    let deadline = Instant::now() + STALL + Duration::from_secs(5);
    while !returned.load(Ordering::SeqCst) && Instant::now() < deadline {
        let dump = collector.received();
        let counted = dump
            .last_point(&service, "tokio.eventloop.stalls")
            .is_some_and(|(_, point)| point.value == Some(1.0));
        // Read `returned` after the log: the count was in the log while the job still blocked.
        if counted && !returned.load(Ordering::SeqCst) {
            seen_after = block_started.get().map(Instant::elapsed);
            during = dump;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen_after = seen_after.unwrap_or_else(|| {
        panic!(
            "tokio.eventloop.stalls did not reach the collector while the runtime was blocked \
             (log {})",
            collector.log_path().display()
        )
    });
    assert!(
        seen_after < Duration::from_millis(2500),
        "the stall was counted at the collector {seen_after:?} into a 3 s stall"
    );
    assert!(
        !during
            .spans_of(&service)
            .any(|span| span.name == "tokio.eventloop.stall"),
        "the stall span is exported when the stall ends, not before"
    );
    assert!(
        during
            .last_point(&service, "tokio.eventloop.stall.duration")
            .is_none_or(|(_, point)| point.count == Some(0)),
        "no stall has ended yet"
    );

    let (runtime, blocked_for) = blocked.join().expect("the blocked thread");
    assert!(blocked_for >= STALL, "blocked for {blocked_for:?}");
    let report = ended_report(&app.reports);
    drop(watchdog);
    app.telemetry.flush();
    let after = collector.wait_for(RECEIVE_TIMEOUT, |dump| {
        dump.spans_of(&service)
            .any(|span| span.name == "tokio.eventloop.stall")
            && dump
                .last_point(&service, "tokio.eventloop.stall.duration")
                .is_some_and(|(_, point)| point.count == Some(1))
    });
    let stall = after
        .spans_of(&service)
        .find(|span| span.name == "tokio.eventloop.stall")
        .unwrap_or_else(|| {
            panic!(
                "the stall span arrived (log {})",
                collector.log_path().display()
            )
        });
    let job = after
        .spans_of(&service)
        .find(|span| span.name == "slow_job")
        .expect("the slow_job span arrived");
    assert_eq!(
        stall.parent_id, job.span_id,
        "the stall span is a child of slow_job"
    );
    if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        check_diagnosis(stall, "three_second_stall_reaches_the_collector");
    }
    let duration = stall.duration();
    assert!(
        duration >= STALL && duration <= STALL + TOLERANCE,
        "the stall span lasts the 3 s block (+{TOLERANCE:?}): {duration:?}"
    );
    assert!(
        (report.duration.as_secs_f64() - duration.as_secs_f64()).abs() < 1e-3,
        "report {:?} = span {duration:?}",
        report.duration
    );
    let (_, stall_hist) = after
        .last_point(&service, "tokio.eventloop.stall.duration")
        .expect("stall duration histogram");
    let max = stall_hist.max.expect("Max");
    assert!(
        (max - duration.as_secs_f64()).abs() < 1e-3,
        "histogram max {max} s = span {duration:?}"
    );
    assert_eq!(
        after
            .last_point(&service, "tokio.eventloop.stalls")
            .and_then(|(_, point)| point.value),
        Some(1.0),
        "still one stall"
    );
    app.telemetry.shutdown();
    drop(runtime);
}

/// The parser reads the recorded sample of rotel's debug log (collector/testdata).
#[test]
fn rotel_debug_log_parser_reads_the_recorded_sample() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/collector/testdata/rotel-debug-sample.txt"
    );
    let text = std::fs::read_to_string(path).expect("read the rotel sample");
    let dump = rotel::parse(&text);
    let service = "looplag-sample-grpc";
    let spans: Vec<&Span> = dump.spans_of(service).collect();
    let stall = spans
        .iter()
        .find(|s| s.name == "tokio.eventloop.stall")
        .expect("stall span");
    assert_eq!(stall.trace_id, "85763fd6c3f766747aa16db8694c927e");
    assert_eq!(stall.parent_id, "220531a407d75804");
    assert_eq!(stall.span_id, "728c107d23748d7a");
    assert_eq!(stall.kind, "SPAN_KIND_INTERNAL");
    assert_eq!(stall.scope, "looplag");
    assert_eq!(stall.start_ns, 1795660050878380973);
    assert_eq!(stall.end_ns, 1795660050888551095);
    assert_eq!(stall.attr("thread.id").and_then(|a| a.int()), Some(7));
    assert_eq!(
        stall
            .attr("tokio.eventloop.stall.cpu_time")
            .and_then(|a| a.double()),
        Some(0.0125)
    );
    assert_eq!(
        stall.attr("code.stacktrace").map(|a| a.text()),
        Some("0: std::thread::sleep\n1: demo::handler"),
        "a multi-line string is read whole"
    );
    let block = spans
        .iter()
        .find(|s| s.name == "GET /block")
        .expect("request span");
    assert_eq!(block.parent_id, "");
    assert_eq!(block.span_id, stall.parent_id);
    let victim = spans
        .iter()
        .find(|s| s.name == "GET /victim")
        .expect("victim span");
    assert_eq!(victim.events.len(), 1);
    let event = &victim.events[0];
    assert_eq!(event.name, "tokio.eventloop.stall");
    assert_eq!(event.timestamp_ns, 1795660050936592365);
    assert_eq!(
        rotel::attr(&event.attributes, "tokio.eventloop.stall.duration").and_then(|a| a.double()),
        Some(0.2503)
    );
    assert_eq!(
        rotel::attr(&event.attributes, "tokio.eventloop.stall.span_id").map(|a| a.text()),
        Some("728c107d23748d7a")
    );
    assert_eq!(victim.links.len(), 1);
    assert_eq!(victim.links[0].trace_id, stall.trace_id);
    assert_eq!(victim.links[0].span_id, stall.span_id);
    assert_eq!(
        rotel::attr(&victim.links[0].attributes, "link.kind").map(|a| a.text()),
        Some("stall")
    );

    let (metric, delay) = dump
        .last_point(service, "tokio.eventloop.delay")
        .expect("delay histogram");
    assert_eq!(metric.unit, "s");
    assert_eq!(metric.data_type, "Histogram");
    assert_eq!(metric.temporality, "AGGREGATION_TEMPORALITY_CUMULATIVE");
    assert_eq!(delay.count, Some(4));
    assert_eq!(delay.max, Some(0.3));
    assert_eq!(delay.min, Some(0.00003));
    assert_eq!(delay.bounds.len(), 16);
    assert_eq!(delay.bounds[12], 1.0);
    assert_eq!(
        delay.buckets,
        vec![2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    );
    assert_eq!(delay.count_at_least(0.25), 1);
    let (metric, stalls) = dump
        .last_point(service, "tokio.eventloop.stalls")
        .expect("stall counter");
    assert_eq!(metric.unit, "{stall}");
    assert_eq!(metric.monotonic, Some(true));
    assert_eq!(stalls.value, Some(2.0));
    assert_eq!(
        rotel::attr(&stalls.attributes, "tokio.eventloop.stall.kind").map(|a| a.text()),
        Some("cpu")
    );
    // The HTTP half of the sample parses the same way.
    assert!(dump
        .spans_of("looplag-sample-http")
        .any(|s| s.name == "tokio.eventloop.stall"));
}
