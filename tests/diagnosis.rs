//! Stall diagnosis: on the CPU or blocked, and in which system call (Linux).
#![cfg(target_os = "linux")]

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use looplag::{StallKind, StallReport};
use opentelemetry::Value;

/// Runs `block` inside span `culprit` on a current-thread runtime; returns the final report.
fn stall(h: &Harness, block: impl FnOnce() + Send + 'static) -> StallReport {
    h.stall_in_span(
        &current_thread(&h.looplag),
        || tracing::info_span!("culprit"),
        async move { block() },
        Duration::from_secs(10),
    )
}

fn stall_span_attr(h: &Harness, key: &str) -> Option<Value> {
    attr(&h.stall_spans()[0], key)
}

#[test]
fn busy_loop_is_cpu_with_cpu_time_near_its_duration() {
    let h = harness(|b| b);
    let report = stall(&h, || {
        let deadline = std::time::Instant::now() + Duration::from_millis(300);
        let mut x = 0u64;
        while std::time::Instant::now() < deadline {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    });
    assert_eq!(report.kind, Some(StallKind::Cpu), "{report:#?}");
    let cpu = report.cpu_time.expect("cpu time");
    // Near the duration on an idle machine (measured ~95%); the bound is generous because a
    // loaded machine keeps a spinning thread off its core part of the time (that wait in the
    // run queue still counts towards `cpu` for the kind, not for the CPU time).
    assert!(
        cpu >= report.duration.mul_f64(0.5) && cpu <= report.duration,
        "cpu {cpu:?} of {:?}",
        report.duration
    );
    assert_eq!(
        stall_span_attr(&h, "tokio.eventloop.stall.kind"),
        Some(Value::from("cpu"))
    );
    match stall_span_attr(&h, "tokio.eventloop.stall.cpu_time") {
        Some(Value::F64(seconds)) => assert!((seconds - cpu.as_secs_f64()).abs() < 1e-6),
        other => panic!("cpu_time is an f64: {other:?}"),
    }
    assert!(report
        .to_string()
        .contains("advice: the thread was computing"));
    let hist = h.histogram("tokio.eventloop.stall.duration").unwrap();
    assert!(
        hist.attributes
            .contains(&("tokio.eventloop.stall.kind".to_string(), "cpu".to_string())),
        "{hist:?}"
    );
}

#[test]
fn sleep_is_blocked_in_the_sleep_syscall() {
    let h = harness(|b| b);
    let report = stall(&h, || std::thread::sleep(Duration::from_millis(300)));
    assert_eq!(report.kind, Some(StallKind::Blocked), "{report:#?}");
    assert!(
        matches!(report.syscall, Some("clock_nanosleep") | Some("nanosleep")),
        "{report:#?}"
    );
    assert!(report.cpu_time.unwrap() < Duration::from_millis(60));
    assert_eq!(
        stall_span_attr(&h, "tokio.eventloop.stall.syscall"),
        Some(Value::from(report.syscall.unwrap()))
    );
    assert!(report.to_string().contains("advice: the thread waited"));
}

#[test]
fn held_mutex_is_blocked_on_futex() {
    let h = harness(|b| b);
    let lock = Arc::new(Mutex::new(()));
    let (tx, rx) = std::sync::mpsc::channel();
    let holder = {
        let lock = Arc::clone(&lock);
        std::thread::spawn(move || {
            let _guard = lock.lock().unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        })
    };
    rx.recv().unwrap();
    let report = stall(&h, move || drop(lock.lock().unwrap()));
    holder.join().unwrap();
    assert_eq!(report.kind, Some(StallKind::Blocked), "{report:#?}");
    assert_eq!(report.syscall, Some("futex"), "{report:#?}");
}

#[test]
fn blocking_pipe_read_is_blocked_on_read() {
    let h = harness(|b| b);
    let (mut reader, mut writer) = std::io::pipe().unwrap();
    let writer_thread = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        writer.write_all(b"x").unwrap();
    });
    let report = stall(&h, move || {
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte).unwrap();
    });
    writer_thread.join().unwrap();
    assert_eq!(report.kind, Some(StallKind::Blocked), "{report:#?}");
    assert_eq!(report.syscall, Some("read"), "{report:#?}");
    assert_eq!(h.counter("tokio.eventloop.stalls"), 1);
}
