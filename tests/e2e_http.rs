//! Over real HTTP: the demo's axum router (tower-http `TraceLayer`) on a hooked
//! current-thread runtime; a client sends `/block?ms=300` while three `/fast` requests are in
//! flight whose 100 ms waits end during the stall (they are held up by it), and, in one
//! test, four long polls (`/fast?ms=1500`) that idle through it (they are not). Exported
//! spans are read from the in-memory exporter.

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

/// Long polls open on the same worker through the whole stall were not held up by it (their
/// wake-up came long after): only the /fast requests whose waits ended during the stall are
/// marked.
#[test]
fn only_held_up_fast_requests_are_victims_not_long_polls_idling_through_the_stall() {
    victims_carry_the_stall_event(4);
}

/// The /fast requests' 100 ms timers expire during the 300 ms stall, so they complete the
/// moment it ends, before the watchdog's next tick: looplag's layer marks them as their
/// first poll after the stall starts, before their spans close.
#[test]
fn requests_that_finish_as_the_stall_ends_still_carry_the_victim_event() {
    victims_carry_the_stall_event(0);
}

fn victims_carry_the_stall_event(long_polls: usize) {
    let h = harness(|b| b);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let state = app::AppState::default();
    let server = Server::start(runtime, state.clone());

    // Three /fast requests waiting 100 ms each and the long polls, then /block?ms=300 while
    // they wait.
    let mut paths = vec!["/fast?ms=100"; 3];
    paths.extend(std::iter::repeat_n("/fast?ms=1500", long_polls));
    let replies = support::concurrent_gets(
        server.addr,
        &paths,
        support::received(&state, paths.len() as u64),
        "/block?ms=300",
    );
    for reply in &replies {
        assert!(
            matches!(reply, Ok((200, _))),
            "every request succeeds: {replies:?}"
        );
    }
    let ended = &h.wait_ended(1, Duration::from_secs(5))[0];
    assert_eq!((ended.victims, ended.victims_dropped), (3, 0), "{ended:#?}");
    let runtime = server.stop();
    drop(watchdog);

    let spans = h.finished_spans();
    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1, "exactly one stall: {stalls:#?}");
    let stall = &stalls[0];
    let requests: Vec<_> = spans.iter().filter(|s| route(s).is_some()).collect();
    assert_eq!(
        requests.len(),
        4 + long_polls,
        "a span per request: {requests:#?}"
    );

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

    let query = |s: &&&opentelemetry_sdk::trace::SpanData| {
        attr(s, "url.query").map(|value| value.to_string())
    };
    let idle: Vec<_> = requests
        .iter()
        .filter(|s| query(s).as_deref() == Some("ms=1500"))
        .collect();
    assert_eq!(idle.len(), long_polls);
    for long_poll in idle {
        assert!(
            !long_poll
                .events
                .iter()
                .any(|event| event.name == "tokio.eventloop.stall"),
            "a long poll idle through the stall is no victim: {long_poll:#?}"
        );
        assert!(long_poll.start_time <= stall.start_time && long_poll.end_time >= stall.end_time);
    }
    let fast: Vec<_> = requests
        .iter()
        .filter(|s| query(s).as_deref() == Some("ms=100"))
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
        // Its timer fired during the stall: held up from (at most) the stall's start to its
        // first poll after it.
        match get("tokio.eventloop.stall.wait") {
            Some(Value::F64(seconds)) => assert!(
                seconds >= duration.as_secs_f64()
                    && seconds <= (duration + TOLERANCE).as_secs_f64(),
                "waited the stall's length: {seconds} s, stall {duration:?}"
            ),
            other => panic!("the wait is an f64: {other:?}"),
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
