//! With `--cfg tokio_unstable`, tokio's task poll hooks give every poll exact boundaries,
//! and stall spans carry the task id and spawn location (`tokio.task.spawn.*`; `code.*` is
//! the culprit frame). (This file has tests only in the
//! `tokio_unstable` build, which `scripts/test.sh` runs.)
#![cfg(tokio_unstable)]

mod common;

use std::time::Duration;

use common::*;
use opentelemetry::Value;

#[test]
fn uninstrumented_stall_is_exact_with_task_id_and_spawn_location() {
    let h = harness(|b| b);
    let runtime = multi_thread(&h.looplag, 2);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    let spawn_line = line!() + 1;
    let task = runtime.spawn(async { std::thread::sleep(Duration::from_millis(200)) });
    runtime.block_on(task).unwrap();
    h.wait_ended(1, Duration::from_secs(10));
    drop(watchdog);

    let stalls = h.stall_spans();
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    let stall = &stalls[0];
    let duration = span_duration(stall);
    assert!(
        duration >= Duration::from_millis(200) && duration <= Duration::from_millis(225),
        "exact without any span: {duration:?}"
    );
    assert_eq!(
        attr(stall, "tokio.eventloop.stall.exact"),
        Some(Value::Bool(true))
    );
    assert!(matches!(attr(stall, "tokio.task.id"), Some(Value::I64(id)) if id > 0));
    assert_eq!(
        attr(stall, "tokio.task.spawn.file"),
        Some(Value::from(file!().to_string()))
    );
    assert_eq!(
        attr(stall, "tokio.task.spawn.line"),
        Some(Value::I64(i64::from(spawn_line)))
    );
    // `code.*` describes the blocking code: the task's async block, on the same line here.
    assert_eq!(
        attr(stall, "code.function.name"),
        Some(Value::from(
            "unstable::uninstrumented_stall_is_exact_with_task_id_and_spawn_location"
        ))
    );
    let Some(Value::String(file)) = attr(stall, "code.file.path") else {
        panic!("code.file.path: {stall:#?}");
    };
    assert!(file.as_str().ends_with(file!()), "{file}");
    let report = &h.ended_reports()[0];
    assert!(report.task_id.is_some());
    assert_eq!(report.spawn_location.map(|l| l.line()), Some(spawn_line));
}
