//! Started on a runtime built without `hook_runtime`: the delay histogram still works,
//! stall detection is off, and looplag says so once.

mod common;

use std::time::Duration;

use common::*;
use tracing::Instrument;

#[test]
fn unhooked_current_thread_runtime_exports_delay_but_no_stalls() {
    let h = harness(|b| b);
    // Not hooked.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.block_on(async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        async { std::thread::sleep(Duration::from_millis(200)) }
            .instrument(tracing::info_span!("culprit"))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    drop(watchdog);
    let delay = h
        .histogram("tokio.eventloop.delay")
        .expect("delay is exported");
    assert!(delay.count >= 10, "{delay:?}");
    assert!(
        delay.max >= 0.1,
        "the delay histogram saw the stall: {delay:?}"
    );
    assert!(h.reports().is_empty(), "no stall detection without hooks");
    assert_eq!(h.stall_spans().len(), 0);
}

#[test]
fn unhooked_multi_thread_runtime_still_gets_estimated_stalls() {
    let h = harness(|b| b);
    // Not hooked: no slots, but tokio's per-worker metrics still freeze on a stuck worker.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    std::thread::sleep(Duration::from_millis(50));
    run_in_span(&runtime, || tracing::info_span!("culprit"), async {
        std::thread::sleep(Duration::from_millis(300))
    });
    h.wait_ended(1, Duration::from_secs(10));
    drop(watchdog);
    let report = &h.ended_reports()[0];
    assert!(!report.exact, "estimated: {report:#?}");
    assert_eq!(report.span_name, None, "no span without the hooks");
    assert_eq!(report.thread_id, None, "no thread without the hooks");
    assert!(report.worker_index.is_some());
    assert!(
        report.duration >= Duration::from_millis(300 - 60)
            && report.duration <= Duration::from_millis(300 + 60),
        "within a few sample intervals: {report:#?}"
    );
    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1);
    assert_eq!(
        stalls[0].parent_span_id,
        opentelemetry::trace::SpanId::INVALID,
        "a root span"
    );
}

#[test]
fn plain_threads_never_stall() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 2);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    std::thread::spawn(|| {
        let _span = tracing::info_span!("plain_thread_work").entered();
        std::thread::sleep(Duration::from_millis(300));
    })
    .join()
    .unwrap();
    // The thread that calls block_on on a multi-thread runtime is not a worker either.
    runtime.block_on(async {
        let _span = tracing::info_span!("block_on_thread").entered();
        std::thread::sleep(Duration::from_millis(300));
    });
    drop(watchdog);
    assert!(h.reports().is_empty(), "{:#?}", h.reports());
}
