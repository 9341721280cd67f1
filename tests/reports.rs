//! Reports arrive while the stall is happening, and again while it lasts.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use looplag::StallState;
use tracing::Instrument;

#[test]
fn in_progress_report_arrives_long_before_a_two_second_block_returns() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 2);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let first_report_after = Arc::new(std::sync::Mutex::new(None));
    let returned = Arc::new(AtomicBool::new(false));
    let (first, done) = (Arc::clone(&first_report_after), Arc::clone(&returned));
    let reports = Arc::clone(&h.reports);
    let watcher = std::thread::spawn(move || {
        let started = Instant::now();
        while !done.load(Ordering::SeqCst) {
            if !reports.lock().unwrap().is_empty() {
                *first.lock().unwrap() = Some(started.elapsed());
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    run_in_span(&runtime, || tracing::info_span!("slow"), async {
        std::thread::sleep(Duration::from_secs(2))
    });
    returned.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    drop(watchdog);

    let first = first_report_after
        .lock()
        .unwrap()
        .expect("a report arrived while the block was running");
    // threshold 50 ms + one 10 ms interval, plus generous scheduling slack.
    assert!(
        first < Duration::from_millis(500),
        "first report after {first:?}"
    );
    let reports = h.reports();
    assert_eq!(reports[0].state, StallState::InProgress);
    assert_eq!(reports[0].span_name, Some("slow"));
    assert!(reports[0].duration >= Duration::from_millis(50));
}

#[test]
fn a_worker_blocked_for_three_seconds_is_reported_at_least_twice_while_blocked() {
    let h = harness(|b| b);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.block_on(async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        tokio::spawn(
            async { std::thread::sleep(Duration::from_secs(3)) }
                .instrument(tracing::info_span!("stuck")),
        )
        .await
        .unwrap();
    });
    h.wait_ended(1, Duration::from_secs(10));
    drop(watchdog);

    let reports = h.reports();
    let in_progress: Vec<_> = reports
        .iter()
        .filter(|r| r.state == StallState::InProgress)
        .collect();
    assert!(in_progress.len() >= 2, "{reports:#?}");
    // Doubling intervals: every re-report at least twice as late as the one before.
    for pair in in_progress.windows(2) {
        assert!(pair[1].duration >= pair[0].duration * 2 - Duration::from_millis(1));
        assert_eq!(pair[1].report_number, pair[0].report_number + 1);
        assert_eq!(pair[1].trace_id, pair[0].trace_id, "same stall");
    }
    assert!(in_progress.last().unwrap().duration < Duration::from_secs(3));
    let ended = &h.ended_reports()[0];
    assert!(ended.duration >= Duration::from_secs(3));
    assert_eq!(
        h.counter("tokio.eventloop.stalls"),
        1,
        "counted once, when detected"
    );
}
