//! Over real HTTP: the demo's axum router (tower-http `TraceLayer`) on a hooked
//! current-thread runtime; a client sends `/block?ms=300` while three `/fast` requests are in
//! flight. Exported spans are read from the in-memory exporter.

mod common;
mod support;

use std::time::Duration;

use common::*;
use opentelemetry::Value;
use support::{app, Server};

/// Measured stall durations may exceed the injected block by the sleep's overshoot and
/// scheduling noise on a loaded 2-core machine; never by more than this.
const TOLERANCE: Duration = Duration::from_millis(200);

fn route(span: &opentelemetry_sdk::trace::SpanData) -> Option<String> {
    attr(span, "http.route").map(|value| value.to_string())
}

/// The /fast requests outlive the stall by far: the watchdog marks them when it sees the
/// stall end, at its next tick.
#[test]
fn fast_requests_waiting_behind_a_blocking_handler_carry_the_victim_event() {
    victims_carry_the_stall_event(800);
}

/// The /fast requests' 100 ms timers expire during the 300 ms stall, so they complete the
/// moment it ends, before the watchdog's next tick: their spans close first, and looplag's
/// layer marks them as they close.
#[test]
fn requests_that_finish_as_the_stall_ends_still_carry_the_victim_event() {
    victims_carry_the_stall_event(100);
}

fn victims_carry_the_stall_event(fast_ms: u64) {
    let h = harness(|b| b);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let state = app::AppState::default();
    let server = Server::start(runtime, state.clone());

    // Three /fast requests waiting `fast_ms` each, then /block?ms=300 while they wait.
    let fast_path = format!("/fast?ms={fast_ms}");
    let replies = support::concurrent_gets(
        server.addr,
        &[fast_path.as_str(), fast_path.as_str(), fast_path.as_str()],
        support::received(&state, 3),
        "/block?ms=300",
    );
    for reply in &replies {
        assert!(
            matches!(reply, Ok((200, _))),
            "every request succeeds: {replies:?}"
        );
    }
    h.wait_ended(1, Duration::from_secs(5));
    let runtime = server.stop();
    drop(watchdog);

    let spans = h.finished_spans();
    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1, "exactly one stall: {stalls:#?}");
    let stall = &stalls[0];
    let requests: Vec<_> = spans.iter().filter(|s| route(s).is_some()).collect();
    assert_eq!(requests.len(), 4, "four request spans: {requests:#?}");

    let block: Vec<_> = requests
        .iter()
        .filter(|s| route(s).as_deref() == Some("/block"))
        .collect();
    assert_eq!(block.len(), 1);
    let block = block[0];
    assert_eq!(
        block.name, "GET /block",
        "TraceLayer span named after the route"
    );
    assert_eq!(
        stall.parent_span_id,
        span_id(block),
        "the stall span is a child of the /block request span"
    );
    assert_eq!(stall.span_context.trace_id(), block.span_context.trace_id());
    let duration = span_duration(stall);
    assert!(
        duration >= Duration::from_millis(300)
            && duration <= Duration::from_millis(300) + TOLERANCE,
        "the stall lasts the 300 ms block (+{TOLERANCE:?}): {duration:?}"
    );
    assert_eq!(
        attr(stall, "tokio.eventloop.stall.victims"),
        Some(Value::I64(3))
    );
    assert!(
        !block
            .events
            .iter()
            .any(|event| event.name == "tokio.eventloop.stall"),
        "the culprit is not its own victim"
    );

    let fast: Vec<_> = requests
        .iter()
        .filter(|s| route(s).as_deref() == Some("/fast"))
        .collect();
    assert_eq!(fast.len(), 3);
    for victim in fast {
        assert_eq!(victim.name, "GET /fast");
        let events: Vec<_> = victim
            .events
            .iter()
            .filter(|event| event.name == "tokio.eventloop.stall")
            .collect();
        assert_eq!(events.len(), 1, "one victim event: {victim:#?}");
        let get = |key: &str| {
            events[0]
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.clone())
        };
        assert_eq!(
            get("tokio.eventloop.stall.span_id"),
            Some(Value::from(stall.span_context.span_id().to_string()))
        );
        assert_eq!(
            get("tokio.eventloop.stall.trace_id"),
            Some(Value::from(stall.span_context.trace_id().to_string()))
        );
        match get("tokio.eventloop.stall.duration") {
            Some(Value::F64(seconds)) => assert!(
                (seconds - duration.as_secs_f64()).abs() < 1e-6,
                "{seconds} s"
            ),
            other => panic!("the duration is an f64: {other:?}"),
        }
        assert!(
            victim
                .links
                .iter()
                .any(|link| link.span_context == stall.span_context),
            "the /fast span links to the stall span: {:#?}",
            victim.links
        );
        // The victim waited: it was in flight during the whole stall.
        assert!(victim.start_time <= stall.start_time && victim.end_time >= stall.end_time);
    }
    drop(runtime);
}
