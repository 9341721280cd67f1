//! A panic inside an instrumented future exits its spans during unwinding. The worker's
//! slot must stay consistent: no phantom stall, and the next stall on that same worker is
//! detected exactly (right parent, right duration).

mod common;

use std::time::Duration;

use common::*;
use tracing::Instrument;

/// Tolerance on a stall measured at poll boundaries: the sleep's overshoot plus scheduling
/// noise on a loaded 2-core machine.
const TOLERANCE: Duration = Duration::from_millis(25);

/// Silences the default panic message of the panics these tests cause on purpose.
fn quiet_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let planned = info
            .payload()
            .downcast_ref::<&str>()
            .is_some_and(|message| message.starts_with("planned"));
        if !planned {
            default(info);
        }
    }));
}

fn assert_in(duration: Duration, expected: Duration, what: &str) {
    assert!(
        duration >= expected && duration <= expected + TOLERANCE,
        "{what}: {duration:?}, expected {expected:?} (+{TOLERANCE:?})"
    );
}

/// The one stall span under the span named `parent`.
fn stall_under(h: &Harness, parent: &str) -> opentelemetry_sdk::trace::SpanData {
    let parent = span_id(&h.span_named(parent));
    let stalls: Vec<_> = h
        .stall_spans()
        .into_iter()
        .filter(|stall| stall.parent_span_id == parent)
        .collect();
    assert_eq!(stalls.len(), 1, "one stall under the span: {stalls:#?}");
    stalls[0].clone()
}

#[test]
fn panics_in_instrumented_tasks_leave_the_worker_consistent() {
    quiet_panics();
    let h = harness(|b| b);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");

    runtime.block_on(async {
        // A panic in a task's span, through tokio's own catch_unwind.
        let flat =
            tokio::spawn(async { panic!("planned: flat") }.instrument(tracing::info_span!("flat")));
        assert!(flat.await.unwrap_err().is_panic());
        // A panic two spans deep: both exit during unwinding.
        let nested = tokio::spawn(
            async {
                let _inner = tracing::info_span!("inner").entered();
                panic!("planned: nested");
            }
            .instrument(tracing::info_span!("outer")),
        );
        assert!(nested.await.unwrap_err().is_panic());
        // A panic caught inside the poll, which goes on.
        tokio::spawn(
            async {
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    tracing::info_span!("caught").in_scope(|| panic!("planned: caught"))
                }));
                assert!(caught.is_err());
                tokio::task::yield_now().await;
            }
            .instrument(tracing::info_span!("survivor")),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    assert!(
        h.reports().is_empty(),
        "no phantom stall after the panics: {:#?}",
        h.reports()
    );

    // The next stall on the same (only) worker thread is exact.
    run_in_span(&runtime, || tracing::info_span!("after"), async {
        std::thread::sleep(Duration::from_millis(200))
    });
    h.wait_ended(1, Duration::from_secs(10));
    drop(watchdog);

    let ended = h.ended_reports();
    assert_eq!(ended.len(), 1, "{:#?}", h.reports());
    assert_eq!(ended[0].span_name, Some("after"));
    assert!(ended[0].exact);
    let stall = stall_under(&h, "after");
    assert_in(
        span_duration(&stall),
        Duration::from_millis(200),
        "stall after the panics",
    );
    assert_eq!(h.stall_spans().len(), 1);
    assert_eq!(h.counter("tokio.eventloop.stalls"), 1);
}

#[test]
fn a_panic_during_a_stall_ends_it_and_the_next_stall_on_that_worker_is_exact() {
    quiet_panics();
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 1);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");

    let doomed = runtime.spawn(
        async {
            std::thread::sleep(Duration::from_millis(300));
            panic!("planned: during a stall");
        }
        .instrument(tracing::info_span!("doomed")),
    );
    assert!(runtime.block_on(doomed).unwrap_err().is_panic());
    h.wait_ended(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(100));

    run_in_span(&runtime, || tracing::info_span!("after"), async {
        std::thread::sleep(Duration::from_millis(200))
    });
    h.wait_ended(2, Duration::from_secs(10));
    drop(watchdog);

    let ended = h.ended_reports();
    assert_eq!(ended.len(), 2, "{:#?}", h.reports());
    let (first, second) = (&ended[0], &ended[1]);
    assert_eq!(first.span_name, Some("doomed"));
    assert_eq!(second.span_name, Some("after"));
    assert!(first.exact && second.exact);
    assert_eq!(first.thread_id, second.thread_id, "same worker thread");
    assert_eq!(first.worker_index, Some(0));
    assert_eq!(second.worker_index, Some(0));

    assert_in(
        span_duration(&stall_under(&h, "doomed")),
        Duration::from_millis(300),
        "the stall ends when the panic unwinds out of the poll",
    );
    assert_in(
        span_duration(&stall_under(&h, "after")),
        Duration::from_millis(200),
        "the next stall",
    );
    assert_eq!(h.stall_spans().len(), 2);
    assert_eq!(h.counter("tokio.eventloop.stalls"), 2);
}
