//! An idle runtime: the watchdog dozes (wakes twice per 21 sample intervals instead of at
//! every one), still accounts for one delay sample per interval, and a stall that begins while it
//! dozes is detected as fast as when it does not (the first unparking worker wakes it).

mod common;

use std::time::Duration;

use common::*;
use tracing::Instrument;

const INTERVAL: Duration = Duration::from_millis(20);
const THRESHOLD: Duration = Duration::from_millis(50);

fn idle_harness(name: &str) -> Harness {
    let name = name.to_string();
    harness(move |b| {
        b.runtime_name(name)
            .sample_interval(INTERVAL)
            .stall_threshold(THRESHOLD)
    })
}

/// Voluntary context switches of the thread named `name` (Linux): how often it went to sleep.
#[cfg(target_os = "linux")]
fn sleeps_of_thread(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).ok()?;
        return status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|value| value.trim().parse().ok());
    }
    None
}

#[cfg(target_os = "linux")]
#[test]
fn idle_watchdog_dozes_and_still_samples_every_interval() {
    let h = idle_harness("idle");
    let runtime = multi_thread(&h.looplag, 2);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    std::thread::sleep(Duration::from_millis(300));
    let before = sleeps_of_thread("looplag-idle").expect("the watchdog thread is found");
    let period = Duration::from_secs(3);
    std::thread::sleep(period);
    let after = sleeps_of_thread("looplag-idle").expect("the watchdog thread is found");
    drop(watchdog);

    // Without dozing the watchdog sleeps once per interval: 150 times in 3 s. Dozing, it
    // sleeps twice per 21 intervals (a doze of 20, then one interval to collect the probe it
    // spawned on waking): about 15 times. Accept up to 75, half of the undozing count.
    let sleeps = after - before;
    let intervals = (period.as_secs_f64() / INTERVAL.as_secs_f64()) as u64;
    assert!(
        sleeps <= intervals / 2,
        "the idle watchdog slept {sleeps} times in {period:?}, no fewer than without dozing \
         ({intervals})"
    );
    // Each probe after a doze counts for the intervals it slept through: the histogram still
    // holds about one sample per interval of the watchdog's life (3.3 s / 20 ms = 165).
    // Accept a factor of two either way for a loaded machine.
    let delay = h
        .histogram("tokio.eventloop.delay")
        .expect("delay histogram");
    let expected =
        ((period + Duration::from_millis(300)).as_secs_f64() / INTERVAL.as_secs_f64()) as u64;
    assert!(
        delay.count >= expected / 2 && delay.count <= expected * 2,
        "about {expected} delay samples, got {}: {delay:?}",
        delay.count
    );
    assert_eq!(h.counter("tokio.eventloop.stalls"), 0);
}

/// Stalls that begin while the watchdog dozes (it dozes 20 × 20 ms = 400 ms) are reported
/// as soon as without the doze: the first in-progress report comes at the threshold plus
/// at most about one interval. Without the wake-up from the unpark hook the watchdog would
/// notice up to 400 ms late, or miss these 150 ms stalls altogether. Tolerance: 150 ms
/// (threshold 50 + interval 20 + 80 ms for a loaded machine).
fn stalls_after_idle_are_detected_promptly(runtime: tokio::runtime::Runtime, h: &Harness) {
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    // Everything runs inside one `block_on`, so a current-thread runtime parks (and the
    // watchdog dozes) while the loop sleeps.
    runtime.block_on(async {
        for i in 0..5u64 {
            // Idle long enough for the watchdog to doze, at a different phase each time.
            tokio::time::sleep(Duration::from_millis(500 + 77 * i)).await;
            tokio::spawn(
                async { std::thread::sleep(Duration::from_millis(150)) }
                    .instrument(tracing::info_span!("culprit", i)),
            )
            .await
            .expect("culprit task");
        }
    });
    assert!(
        wait_until(Duration::from_secs(10), || h.ended_reports().len() >= 5),
        "five ended stalls: {:#?}",
        h.reports()
    );
    drop(watchdog);
    let reports = h.reports();
    let first_reports: Vec<_> = reports
        .iter()
        .filter(|r| r.state == looplag::StallState::InProgress && r.report_number == 1)
        .collect();
    assert_eq!(first_reports.len(), 5, "{reports:#?}");
    for report in first_reports {
        assert!(report.exact, "{report:#?}");
        assert!(
            report.duration >= THRESHOLD && report.duration < Duration::from_millis(150),
            "detected {:?} after the stall began (threshold {THRESHOLD:?}): {report:#?}",
            report.duration
        );
    }
}

#[test]
fn stalls_after_idle_are_detected_promptly_multi_thread() {
    let h = idle_harness("idle-mt");
    let runtime = multi_thread(&h.looplag, 2);
    stalls_after_idle_are_detected_promptly(runtime, &h);
}

#[test]
fn stalls_after_idle_are_detected_promptly_current_thread() {
    let h = idle_harness("idle-ct");
    let runtime = current_thread(&h.looplag);
    stalls_after_idle_are_detected_promptly(runtime, &h);
}
