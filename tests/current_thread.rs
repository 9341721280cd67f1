//! A 200 ms blocking sleep inside `req_a` on a current-thread runtime, with `req_b` and
//! `req_c` in flight, their timers firing during the stall (so they wait on it).

mod common;

use std::time::Duration;

use common::*;
use opentelemetry::Value;
use tracing::Instrument;

/// Tolerance on measured stall durations: the stall is measured at poll boundaries, so the
/// only error is the sleep's own overshoot and scheduling noise on a loaded 2-core machine.
const TOLERANCE: Duration = Duration::from_millis(25);

#[test]
fn sleep_in_span_gives_one_stall_span_child_of_the_culprit_and_victim_events() {
    let h = harness(|b| b);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");

    runtime.block_on(async {
        // Their first timers fire in the middle of the stall (they are held up by it); the
        // second ones keep them in flight long after it.
        let wait = || async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
        };
        let b = tokio::spawn(wait().instrument(tracing::info_span!("req_b")));
        let c = tokio::spawn(wait().instrument(tracing::info_span!("req_c")));
        // Let the probe and req_b/req_c run before the stall.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let a = tokio::spawn(
            async { std::thread::sleep(Duration::from_millis(200)) }
                .instrument(tracing::info_span!("req_a")),
        );
        a.await.unwrap();
        b.await.unwrap();
        c.await.unwrap();
    });
    h.wait_ended(1, Duration::from_secs(10));
    // Let the probe that waited through the stall be collected.
    std::thread::sleep(Duration::from_millis(100));
    drop(watchdog);

    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1, "exactly one stall span: {stalls:#?}");
    let stall = &stalls[0];
    let req_a = h.span_named("req_a");
    assert_eq!(
        stall.parent_span_id,
        span_id(&req_a),
        "stall is a child of req_a"
    );
    assert_eq!(stall.span_context.trace_id(), req_a.span_context.trace_id());
    let duration = span_duration(stall);
    assert!(
        duration >= Duration::from_millis(200)
            && duration <= Duration::from_millis(200) + TOLERANCE,
        "stall span lasts 200 ms (+{TOLERANCE:?}): {duration:?}"
    );
    assert_eq!(attr(stall, "tokio.runtime.name"), Some(Value::from("main")));
    assert!(matches!(attr(stall, "thread.id"), Some(Value::I64(_))));
    assert_eq!(
        attr(stall, "tokio.eventloop.stall.victims"),
        Some(Value::I64(2))
    );

    for name in ["req_b", "req_c"] {
        let victim = h.span_named(name);
        let events: Vec<_> = victim
            .events
            .iter()
            .filter(|event| event.name == "tokio.eventloop.stall")
            .collect();
        assert_eq!(
            events.len(),
            1,
            "{name} carries one victim event: {victim:#?}"
        );
        let event = events[0];
        let get = |key: &str| {
            event
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.clone())
        };
        match get("tokio.eventloop.stall.duration") {
            Some(Value::F64(seconds)) => {
                assert!((seconds - duration.as_secs_f64()).abs() < 1e-6, "{seconds}")
            }
            other => panic!("duration attribute is an f64: {other:?}"),
        }
        // Held up from the stall's start (an upper bound: when its timer fired is unknown)
        // to its first poll after the stall.
        match get("tokio.eventloop.stall.wait") {
            Some(Value::F64(seconds)) => assert!(
                seconds >= duration.as_secs_f64()
                    && seconds <= (duration + TOLERANCE).as_secs_f64(),
                "{name} waited the stall's length: {seconds} s, stall {duration:?}"
            ),
            other => panic!("wait attribute is an f64: {other:?}"),
        }
        assert_eq!(
            get("tokio.eventloop.stall.wait.exact"),
            Some(Value::Bool(false))
        );
        assert_eq!(
            get("tokio.eventloop.stall.trace_id"),
            Some(Value::from(stall.span_context.trace_id().to_string()))
        );
        assert_eq!(
            get("tokio.eventloop.stall.span_id"),
            Some(Value::from(stall.span_context.span_id().to_string()))
        );
        assert!(
            victim
                .links
                .iter()
                .any(|link| link.span_context == stall.span_context),
            "{name} links to the stall span: {:#?}",
            victim.links
        );
    }
    let req_a_events = req_a
        .events
        .iter()
        .filter(|event| event.name == "tokio.eventloop.stall")
        .count();
    assert_eq!(req_a_events, 0, "the culprit is not its own victim");

    assert_eq!(h.counter("tokio.eventloop.stalls"), 1);
    let stall_hist = h
        .histogram("tokio.eventloop.stall.duration")
        .expect("duration histogram");
    assert_eq!(stall_hist.count, 1);
    assert_eq!(stall_hist.unit, "s");
    assert!((stall_hist.max - duration.as_secs_f64()).abs() < 1e-6);

    let delay = h
        .histogram("tokio.eventloop.delay")
        .expect("delay histogram");
    assert_eq!(delay.unit, "s");
    assert!(
        delay.max >= 0.150 && delay.max <= 0.200 + 0.050,
        "the probe that waited through the stall saw about 200 ms: {delay:?}"
    );
    // Coordinated omission: the ticks skipped during the stall are back-filled, so about
    // 200 ms / 10 ms samples are 25 ms or more, not just one.
    assert!(
        delay.count_at_least(0.025) >= 12,
        "samples missed during the stall are accounted for: {delay:?}"
    );
    assert_eq!(
        delay.attributes,
        vec![("tokio.runtime.name".to_string(), "main".to_string())]
    );
}

/// Runs waiter spans that sleep `waits` (ms each) on a current-thread runtime, blocks it for
/// 300 ms in a `culprit` span once every waiter has been polled, waits for the one ended
/// stall report and returns how many waiters carry the victim event.
fn stall_with_waiters(h: &Harness, waits: &[u64]) -> usize {
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.block_on(async {
        let waiters: Vec<_> = waits
            .iter()
            .enumerate()
            .map(|(i, &ms)| {
                tokio::spawn(
                    async move { tokio::time::sleep(Duration::from_millis(ms)).await }
                        .instrument(tracing::info_span!("waiter", i)),
                )
            })
            .collect();
        // Let every waiter be polled once, and the watchdog see it, before the stall.
        tokio::time::sleep(Duration::from_millis(30)).await;
        tokio::spawn(
            async { std::thread::sleep(Duration::from_millis(300)) }
                .instrument(tracing::info_span!("culprit")),
        )
        .await
        .unwrap();
        for waiter in waiters {
            waiter.await.unwrap();
        }
    });
    h.wait_ended(1, Duration::from_secs(10));
    drop(watchdog);
    h.finished_spans()
        .iter()
        .filter(|s| s.name == "waiter")
        .filter(|s| s.events.iter().any(|e| e.name == "tokio.eventloop.stall"))
        .count()
}

/// `max_victims` caps the victim events per stall: five waiters' timers fire during the
/// stall (they finish the moment it ends), one idle waiter's timer fires long after it (not
/// a victim, so not counted either way). With a cap of 2, exactly two get the event and
/// the stall counts the other three as dropped.
#[test]
fn max_victims_caps_the_events_and_counts_the_rest() {
    let h = harness(|b| b.max_victims(2));
    let marked = stall_with_waiters(&h, &[50, 50, 50, 100, 100, 900]);

    let ended = &h.ended_reports()[0];
    assert_eq!((ended.victims, ended.victims_dropped), (2, 3), "{ended:#?}");
    let stall = &h.stall_spans()[0];
    assert_eq!(
        attr(stall, "tokio.eventloop.stall.victims"),
        Some(Value::I64(2))
    );
    assert_eq!(
        attr(stall, "tokio.eventloop.stall.victims_dropped"),
        Some(Value::I64(3))
    );
    assert_eq!(marked, 2, "two waiters carry the victim event");
}

/// `max_victims(0)`: the layer records no request spans, and a stall is still reported
/// exactly, in its culprit span, with no victim event and nothing counted as dropped.
#[test]
fn without_victims_a_stall_is_still_reported_and_marks_nobody() {
    let h = harness(|b| b.max_victims(0));
    let marked = stall_with_waiters(&h, &[50, 50, 50]);

    let ended = &h.ended_reports()[0];
    assert!(ended.exact, "{ended:#?}");
    assert_eq!(ended.span_name, Some("culprit"), "{ended:#?}");
    assert_eq!((ended.victims, ended.victims_dropped), (0, 0), "{ended:#?}");
    assert_eq!(marked, 0, "no waiter carries the victim event");
}

/// A stall outside any span is found on a current-thread runtime (on stable builds, by
/// asking the thread with a signal whether it is inside `block_on`), while the same frozen
/// runtime state with nobody driving it (`block_on` returned, the thread busy elsewhere)
/// is not a stall, before and after the real one.
#[test]
fn stall_outside_any_span_is_found_and_an_undriven_runtime_is_not_a_stall() {
    // Estimated stalls are known to a sample interval at each end (10 ms by default), and
    // the machine may be loaded: a generous, stated tolerance.
    const ESTIMATE_TOLERANCE: Duration = Duration::from_millis(60);
    let h = harness(|b| b);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");

    runtime.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    // Nobody drives the runtime for 8 thresholds.
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        h.reports().is_empty(),
        "a runtime nobody drives is not stalled: {:#?}",
        h.reports()
    );

    runtime.block_on(async {
        tokio::spawn(async { std::thread::sleep(Duration::from_millis(300)) })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    // The stall outside any span is reported and ends.
    h.wait_ended(1, Duration::from_secs(10));
    // Undriven again, for longer than the recheck backoff's first steps.
    std::thread::sleep(Duration::from_millis(400));
    drop(watchdog);

    let ended = h.ended_reports();
    assert_eq!(
        ended.len(),
        1,
        "only the real stall is reported: {:#?}",
        h.reports()
    );
    let report = &ended[0];
    assert_eq!(report.span_name, None);
    assert_eq!(report.worker_index, Some(0));
    assert!(report.thread_id.is_some(), "{report:#?}");
    // With tokio's poll hooks the poll's boundaries are exact.
    assert_eq!(report.exact, cfg!(tokio_unstable), "{report:#?}");
    let (low, high) = if report.exact {
        (
            Duration::from_millis(300),
            Duration::from_millis(300) + TOLERANCE,
        )
    } else {
        (
            Duration::from_millis(300) - ESTIMATE_TOLERANCE,
            Duration::from_millis(300) + ESTIMATE_TOLERANCE,
        )
    };
    assert!(
        report.duration >= low && report.duration <= high,
        "the stall lasted 300 ms: {report:#?}"
    );
    assert_eq!(h.stall_spans().len(), 1);
    assert_eq!(h.counter("tokio.eventloop.stalls"), 1);
}

/// A current-thread runtime driven by a thread that blocks the stack signal: looplag cannot
/// ask it whether it is inside `block_on`, so a stall outside any span is not reported
/// (rather than guessed), while a stall in a span still is, exact, with the stack marked as
/// not taken; nothing hangs.
#[test]
fn a_driver_thread_that_blocks_the_stack_signal_gets_no_guessed_stalls() {
    // With tokio's poll hooks every poll is exact and needs no query.
    let expected = if cfg!(tokio_unstable) { 2 } else { 1 };
    let h = harness(|b| b);
    let runtime = current_thread(&h.looplag);
    let reports = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: plain signal-set manipulation on this thread's own mask.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, looplag::DEFAULT_STACK_SIGNAL);
                    assert_eq!(
                        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                        0
                    );
                }
                let watchdog = h.looplag.start(runtime.handle()).expect("start");
                runtime.block_on(async {
                    tokio::spawn(async { std::thread::sleep(Duration::from_millis(400)) })
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    tokio::spawn(
                        async { std::thread::sleep(Duration::from_millis(200)) }
                            .instrument(tracing::info_span!("req_a")),
                    )
                    .await
                    .unwrap();
                });
                // The stall in a span is reported.
                h.wait_ended(expected, Duration::from_secs(10));
                drop(watchdog);
                h.ended_reports()
            })
            .join()
            .expect("driver thread")
    });
    assert_eq!(
        reports.len(),
        expected,
        "the stall in a span, and with poll hooks the other one: {reports:#?}"
    );
    let report = reports
        .iter()
        .find(|report| report.span_name.is_some())
        .expect("the stall in a span");
    assert_eq!(report.span_name, Some("req_a"));
    assert!(report.exact);
    assert!(
        report.duration >= Duration::from_millis(200)
            && report.duration <= Duration::from_millis(200) + TOLERANCE,
        "{report:#?}"
    );
    assert!(
        matches!(report.stack, looplag::StackCapture::Failed(_)),
        "the blocked signal never arrives: {:?}",
        report.stack
    );
}
