//! Culprit stacks: taken while the thread is blocked, symbolized, on the stall span, in the
//! report and the log; rate limited.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use looplag::{StackCapture, StallReport};
use opentelemetry::Value;
use tracing::Instrument;

#[inline(never)]
fn looplag_culprit_sleep() {
    std::thread::sleep(Duration::from_millis(200));
    std::hint::black_box(());
}

#[inline(never)]
fn looplag_culprit_spin() {
    let deadline = std::time::Instant::now() + Duration::from_millis(200);
    let mut x = 0u64;
    while std::time::Instant::now() < deadline {
        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
    }
    std::hint::black_box(x);
}

#[inline(never)]
fn looplag_culprit_lock(lock: &Mutex<()>) {
    let _guard = lock.lock().unwrap();
    std::hint::black_box(());
}

#[inline(never)]
async fn task_that_calls_the_culprit(which: &'static str, lock: Arc<Mutex<()>>) {
    match which {
        "sleep" => looplag_culprit_sleep(),
        "spin" => looplag_culprit_spin(),
        _ => looplag_culprit_lock(&lock),
    }
    std::hint::black_box(());
}

/// Runs one stall of kind `which` inside span `culprit` on a current-thread runtime and
/// returns the stall span's `code.stacktrace` and the final report.
fn stall(h: &Harness, which: &'static str) -> (String, StallReport) {
    let lock = Arc::new(Mutex::new(()));
    let holder = if which == "lock" {
        let lock = Arc::clone(&lock);
        let (tx, rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let _guard = lock.lock().unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        rx.recv().unwrap();
        Some(holder)
    } else {
        None
    };
    let report = h.stall_in_span(
        &current_thread(&h.looplag),
        || tracing::info_span!("culprit"),
        task_that_calls_the_culprit(which, Arc::clone(&lock)),
        Duration::from_secs(5),
    );
    if let Some(holder) = holder {
        holder.join().unwrap();
    }
    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1);
    let Some(Value::String(stack)) = attr(&stalls[0], "code.stacktrace") else {
        panic!("code.stacktrace on the stall span: {:#?}", stalls[0]);
    };
    (stack.to_string(), report)
}

/// Position of the first line of `stack` containing `needle`.
fn line_of(stack: &str, needle: &str) -> Option<usize> {
    stack.lines().position(|line| line.contains(needle))
}

fn assert_culprit_above_caller(stack: &str, culprit: &str) {
    let culprit_line =
        line_of(stack, culprit).unwrap_or_else(|| panic!("{culprit} in the stack:\n{stack}"));
    let caller_line = line_of(stack, "task_that_calls_the_culprit")
        .unwrap_or_else(|| panic!("the calling task in the stack:\n{stack}"));
    assert!(
        culprit_line < caller_line,
        "{culprit} (line {culprit_line}) above its caller (line {caller_line}):\n{stack}"
    );
}

#[test]
fn sleep_culprit_is_named_above_its_task() {
    let h = harness(|b| b);
    let (stack, report) = stall(&h, "sleep");
    assert_culprit_above_caller(&stack, "looplag_culprit_sleep");
    let frames = report.stack.frames().expect("the report carries the stack");
    assert!(frames
        .iter()
        .any(|frame| frame.function.contains("looplag_culprit_sleep")));
    let text = report.to_string();
    assert!(
        text.contains("looplag_culprit_sleep"),
        "the log line shows the top frames: {text}"
    );
}

#[test]
fn cpu_bound_culprit_is_named() {
    let h = harness(|b| b);
    let (stack, _) = stall(&h, "spin");
    assert_culprit_above_caller(&stack, "looplag_culprit_spin");
}

#[test]
fn mutex_culprit_is_named() {
    let h = harness(|b| b);
    let (stack, _) = stall(&h, "lock");
    assert_culprit_above_caller(&stack, "looplag_culprit_lock");
}

#[test]
fn stack_captures_are_rate_limited_and_suppressions_counted() {
    let h = harness(|b| b.max_stacks_per_minute(3));
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.block_on(async {
        for i in 0..8 {
            tokio::spawn(
                async { std::thread::sleep(Duration::from_millis(80)) }
                    .instrument(tracing::info_span!("storm", i)),
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    h.wait_ended(8, Duration::from_secs(10));
    drop(watchdog);
    let ended = h.ended_reports();
    let captured = ended
        .iter()
        .filter(|r| matches!(r.stack, StackCapture::Captured(_)))
        .count();
    // 3 tokens; the bucket refills 3 per minute, i.e. at most one more in a 20 s window.
    assert_eq!(captured, 3, "{ended:#?}");
    let suppressed: Vec<u64> = ended
        .iter()
        .filter_map(|r| match r.stack {
            StackCapture::RateLimited { suppressed } => Some(suppressed),
            _ => None,
        })
        .collect();
    assert_eq!(suppressed, vec![1, 2, 3, 4, 5], "{ended:#?}");
    assert_eq!(
        h.counter("tokio.eventloop.stalls"),
        8,
        "every stall still counted"
    );
    let spans = h.stall_spans();
    assert_eq!(
        spans
            .iter()
            .filter(|s| attr(s, "tokio.eventloop.stall.stack_status")
                == Some(Value::from("rate_limited")))
            .count(),
        5
    );
}

#[test]
fn capture_stacks_off_takes_no_stack() {
    let h = harness(|b| b.capture_stacks(false));
    let report = h.stall_in_span(
        &current_thread(&h.looplag),
        || tracing::info_span!("culprit"),
        async { std::thread::sleep(Duration::from_millis(100)) },
        Duration::from_secs(10),
    );
    assert_eq!(report.stack, StackCapture::Disabled);
    let stall = &h.stall_spans()[0];
    assert_eq!(attr(stall, "code.stacktrace"), None);
    assert_eq!(
        attr(stall, "tokio.eventloop.stall.stack_status"),
        Some(Value::from("disabled"))
    );
}

#[test]
fn a_signal_with_a_foreign_handler_is_refused() {
    extern "C" fn foreign(_: libc::c_int) {}
    // SAFETY: installs a plain handler for a real-time signal nobody else uses in this test
    // process.
    unsafe { libc::signal(45, foreign as *const () as libc::sighandler_t) };
    let err = looplag::LoopLag::builder()
        .stack_signal(45)
        .build()
        .expect_err("a signal with another handler is refused");
    let message = err.to_string();
    assert!(
        message.contains("stack_signal") && message.contains("45"),
        "{message}"
    );
    let err = looplag::LoopLag::builder()
        .stack_signal(9)
        .build()
        .expect_err("SIGKILL is not accepted");
    assert!(err.to_string().contains("stack_signal"), "{err}");
}
