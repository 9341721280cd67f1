//! Multi-thread runtime with 4 workers and steady traffic of short polls.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tracing::Instrument;

/// Steady traffic: tasks that each wake every millisecond and do a few microseconds of work
/// inside a span, until `stop`.
fn traffic(runtime: &tokio::runtime::Runtime, tasks: usize, stop: &Arc<AtomicBool>) {
    for i in 0..tasks {
        let stop = Arc::clone(stop);
        runtime.spawn(
            async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    std::hint::black_box((0..200u64).sum::<u64>());
                }
            }
            .instrument(tracing::info_span!("traffic", i)),
        );
    }
}

#[test]
fn ten_single_worker_stalls_are_all_detected_with_their_parent() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 4);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let stop = Arc::new(AtomicBool::new(false));
    traffic(&runtime, 16, &stop);
    std::thread::sleep(Duration::from_millis(200));

    for i in 0..10 {
        runtime
            .block_on(
                runtime.spawn(
                    async { std::thread::sleep(Duration::from_millis(200)) }
                        .instrument(tracing::info_span!("culprit", i)),
                ),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        wait_until(Duration::from_secs(10), || h.ended_reports().len() >= 10),
        "ten ended stalls: {:#?}",
        h.ended_reports()
    );
    stop.store(true, Ordering::Relaxed);
    drop(watchdog);

    let spans = h.finished_spans();
    let culprits: Vec<_> = spans.iter().filter(|s| s.name == "culprit").collect();
    let stalls: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "tokio.eventloop.stall")
        .collect();
    assert_eq!(culprits.len(), 10);
    assert_eq!(
        stalls.len(),
        10,
        "every stall detected, nothing else: {stalls:#?}"
    );
    for culprit in &culprits {
        let children: Vec<_> = stalls
            .iter()
            .filter(|stall| stall.parent_span_id == culprit.span_context.span_id())
            .collect();
        assert_eq!(children.len(), 1, "one stall under each culprit");
        let duration = span_duration(children[0]);
        assert!(
            duration >= Duration::from_millis(200) && duration <= Duration::from_millis(200 + 25),
            "200 ms (+25 ms) stall: {duration:?}"
        );
    }
    assert_eq!(h.counter("tokio.eventloop.stalls"), 10);
}

#[test]
fn five_seconds_of_healthy_traffic_yield_no_stall() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 4);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let stop = Arc::new(AtomicBool::new(false));
    traffic(&runtime, 16, &stop);
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    drop(watchdog);

    assert_eq!(h.stall_spans().len(), 0, "{:#?}", h.reports());
    assert!(h.reports().is_empty(), "{:#?}", h.reports());
    assert_eq!(h.counter("tokio.eventloop.stalls"), 0);
    let delay = h
        .histogram("tokio.eventloop.delay")
        .expect("delay histogram");
    assert!(delay.count >= 100, "the probe sampled all along: {delay:?}");
    assert!(
        delay.max < 0.050,
        "healthy runtime, no delay over the threshold: {delay:?}"
    );
}

#[test]
fn uninstrumented_stall_is_detected_while_blocked() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 4);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let stop = Arc::new(AtomicBool::new(false));
    traffic(&runtime, 8, &stop);
    std::thread::sleep(Duration::from_millis(200));

    let returned = Arc::new(AtomicBool::new(false));
    let seen_while_blocked = Arc::new(AtomicBool::new(false));
    let (r, seen) = (Arc::clone(&returned), Arc::clone(&seen_while_blocked));
    let reports = Arc::clone(&h.reports);
    // No span around this task: only tokio's metrics (stable) or its poll hooks
    // (tokio_unstable) can see it.
    let task = runtime.spawn(async move {
        let deadline = std::time::Instant::now() + Duration::from_millis(1000);
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            if !reports.lock().unwrap().is_empty() {
                seen.store(true, Ordering::SeqCst);
            }
        }
        r.store(true, Ordering::SeqCst);
    });
    runtime.block_on(task).unwrap();
    h.wait_ended(1, Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    drop(watchdog);

    assert!(
        seen_while_blocked.load(Ordering::SeqCst),
        "the stall was reported while the worker was still blocked"
    );
    let ended = h.ended_reports();
    assert_eq!(ended.len(), 1, "{ended:#?}");
    let report = &ended[0];
    assert!(report.worker_index.is_some(), "{report:#?}");
    assert!(
        report.thread_id.is_some(),
        "attributed to its thread: {report:#?}"
    );
    // Stable: estimated to within a sample interval or so; tokio_unstable: exact.
    assert!(
        report.duration >= Duration::from_millis(900)
            && report.duration <= Duration::from_millis(1000 + 60),
        "{report:#?}"
    );
    assert_eq!(report.exact, cfg!(tokio_unstable));
    assert_eq!(h.stall_spans().len(), 1);
    assert_eq!(h.counter("tokio.eventloop.stalls"), 1);
}

#[test]
fn span_held_in_spawn_blocking_is_not_a_stall() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 2);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.block_on(async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        tokio::task::spawn_blocking(|| {
            let _entered = tracing::info_span!("blocking_work").entered();
            std::thread::sleep(Duration::from_millis(500));
        })
        .await
        .unwrap();
    });
    std::thread::sleep(Duration::from_millis(100));
    drop(watchdog);
    assert!(h.reports().is_empty(), "{:#?}", h.reports());
    assert_eq!(h.stall_spans().len(), 0);
    assert_eq!(h.counter("tokio.eventloop.stalls"), 0);
}

#[test]
fn block_in_place_is_not_a_stall() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 2);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let stop = Arc::new(AtomicBool::new(false));
    traffic(&runtime, 4, &stop);
    runtime
        .block_on(
            runtime.spawn(
                async {
                    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(500)))
                }
                .instrument(tracing::info_span!("in_place")),
            ),
        )
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    drop(watchdog);
    assert!(h.reports().is_empty(), "{:#?}", h.reports());
}
