//! Culprit stacks: taken while the thread is blocked, symbolized, on the stall span, in the
//! report and the log; rate limited.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use looplag::{Culprit, StackCapture, StallReport};
use opentelemetry::Value;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
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

/// Always inlined into its caller: in release builds its frame exists only in the debug
/// info, never in the symbol table.
#[inline(always)]
fn looplag_culprit_inlined() {
    std::thread::sleep(Duration::from_millis(200));
    std::hint::black_box(());
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
        "inlined" => looplag_culprit_inlined(),
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
    assert_eq!(
        culprit_of(&report).function,
        "stacks::looplag_culprit_sleep"
    );
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

/// The culprit frame of `report`, or a failure that shows the stack.
fn culprit_of(report: &StallReport) -> looplag::StackFrame {
    match &report.culprit {
        Culprit::Found(frame) => frame.clone(),
        other => panic!("no culprit ({other:?}) in {report:#?}"),
    }
}

/// The `code.function.name` values on `tokio.eventloop.stall.duration`, with their counts.
fn duration_by_function(h: &Harness) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for scope in h.collect().last().expect("an export").scope_metrics() {
        for metric in scope.metrics() {
            if metric.name() != "tokio.eventloop.stall.duration" {
                continue;
            }
            let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = metric.data() else {
                panic!("the duration is an f64 histogram");
            };
            for point in histogram.data_points() {
                let function = point
                    .attributes()
                    .find(|kv| kv.key.as_str() == "code.function.name")
                    .map(|kv| kv.value.to_string())
                    .unwrap_or_else(|| panic!("code.function.name on every point"));
                out.push((function, point.count()));
            }
        }
    }
    out.sort();
    out
}

/// The application's own blocking call, below an axum handler.
#[inline(never)]
fn legacy_db_lookup(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    std::hint::black_box(ms)
}

/// A client library the application wraps; marked as library code in one test.
mod db_driver {
    #[inline(never)]
    pub fn query(ms: u64) -> u64 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        std::hint::black_box(ms)
    }
}

/// The application function that calls the driver.
#[inline(never)]
fn load_user(ms: u64) -> u64 {
    let rows = db_driver::query(ms);
    std::hint::black_box(rows + 1)
}

async fn lookup_handler() -> String {
    format!("{}\n", legacy_db_lookup(200))
}

async fn user_handler() -> String {
    format!("{}\n", load_user(200))
}

/// Serves an axum router (handlers behind tower-http's `TraceLayer`, one `request` span per
/// request) on a current-thread runtime, sends it one `GET path`, and returns the ended
/// stall's report.
fn stall_in_axum(h: &Harness, path: &'static str) -> StallReport {
    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.block_on(async {
        let router = axum::Router::new()
            .route("/lookup", get(lookup_handler))
            .route("/user", get(user_handler))
            .layer(
                tower_http::trace::TraceLayer::new_for_http()
                    .make_span_with(|_: &axum::extract::Request| tracing::info_span!("request")),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    });
    let ended = h.wait_ended(1, Duration::from_secs(10));
    drop(watchdog);
    ended[0].clone()
}

#[test]
fn an_application_function_below_an_axum_handler_is_the_culprit() {
    let h = harness(|b| b);
    let report = stall_in_axum(&h, "/lookup");
    let culprit = culprit_of(&report);
    assert_eq!(culprit.function, "stacks::legacy_db_lookup", "{report:#?}");
    let file = culprit.file.clone().expect("line tables name the file");
    assert!(file.ends_with("tests/stacks.rs"), "{file}");
    let line = culprit.line.expect("and the line");
    // The log line names it first.
    let text = report.to_string();
    assert!(
        text.starts_with(&format!(
            "blocked in `stacks::legacy_db_lookup` at {file}:{line}: "
        )),
        "{text}"
    );
    // On the span, as OpenTelemetry's code attributes.
    let stall = &h.stall_spans()[0];
    assert_eq!(
        attr(stall, "code.function.name"),
        Some(Value::from("stacks::legacy_db_lookup"))
    );
    assert_eq!(attr(stall, "code.file.path"), Some(Value::from(file)));
    assert_eq!(
        attr(stall, "code.line.number"),
        Some(Value::I64(i64::from(line)))
    );
    assert_eq!(attr(stall, "tokio.eventloop.stall.culprit_status"), None);
    // And on the duration histogram.
    assert_eq!(
        duration_by_function(&h),
        vec![("stacks::legacy_db_lookup".to_string(), 1)]
    );
}

#[test]
fn a_function_marked_as_library_code_names_its_caller() {
    let h = harness(|b| b.library_prefixes(["stacks::db_driver"]));
    let report = stall_in_axum(&h, "/user");
    let frames = report.stack.frames().expect("a stack");
    assert!(
        frames.iter().any(|f| f.function.contains("query")),
        "the driver is in the stack: {frames:#?}"
    );
    assert_eq!(culprit_of(&report).function, "stacks::load_user");
    let stall = &h.stall_spans()[0];
    assert_eq!(
        attr(stall, "code.function.name"),
        Some(Value::from("stacks::load_user"))
    );
}

#[test]
fn a_stack_of_library_code_only_says_it_has_no_culprit() {
    // The whole test crate marked as library code: nothing in the stack qualifies. By path
    // too: in release builds (line tables only), the inlined body of the task is named
    // `{async_fn#0}`, without the crate's name, and so are the harness's generic helpers.
    let h = harness(|b| b.library_prefixes(["stacks", "/tests/"]));
    let (_, report) = stall(&h, "sleep");
    assert_eq!(report.culprit, Culprit::NotFound, "{report:#?}");
    assert!(
        report
            .to_string()
            .starts_with("blocked in library code only (no application frame in the stack): "),
        "{report}"
    );
    let stall = &h.stall_spans()[0];
    assert_eq!(attr(stall, "code.function.name"), None);
    assert_eq!(
        attr(stall, "tokio.eventloop.stall.culprit_status"),
        Some(Value::from("not_found"))
    );
    assert_eq!(duration_by_function(&h), vec![("unknown".to_string(), 1)]);
}

/// Set by `scripts/test.sh` for its run of this file built without line tables
/// (`profile.release.package.looplag.debug=false`).
const NO_LINE_TABLES: &str = "LOOPLAG_TEST_NO_LINE_TABLES";

#[test]
fn with_or_without_line_tables_the_culprit_is_named() {
    // The "could not tell" half is `a_stack_of_library_code_only_says_it_has_no_culprit`,
    // which scripts/test.sh runs in that build too.
    let no_line_tables = std::env::var(NO_LINE_TABLES).is_ok_and(|v| v == "1");
    let h = harness(|b| b);
    let (stack, report) = stall(&h, "sleep");
    let culprit = culprit_of(&report);
    // Named in full in every build: from debug info, or from the symbol table.
    assert_eq!(culprit.function, "stacks::looplag_culprit_sleep", "{stack}");
    if no_line_tables {
        // Found by its crate name: there is no file to tell by.
        assert_eq!(culprit.file, None, "this build has no line tables: {stack}");
    } else {
        assert!(
            culprit.file.is_some(),
            "this build has line tables: {stack}"
        );
    }
}

/// Set by `scripts/test.sh` for its release run of this file with `debug = "limited"`, the
/// profile README recommends (`profile.release.package.looplag.debug="limited"`).
const DEBUG_LIMITED: &str = "LOOPLAG_TEST_DEBUG_LIMITED";

/// An inlined application function is named with its module path where the debug info has
/// module paths (a debug build, or `debug = "limited"`); `debug = "line-tables-only"` names
/// inlined functions by their short name only, and there is no symbol to complete it from.
#[test]
fn an_inlined_culprit_is_named_in_full_with_limited_debug_info() {
    let debug_limited = std::env::var(DEBUG_LIMITED).is_ok_and(|v| v == "1");
    let line_tables_only = !cfg!(debug_assertions) && !debug_limited;
    let h = harness(|b| b);
    let (stack, report) = stall(&h, "inlined");
    let culprit = culprit_of(&report);
    let expected = if line_tables_only {
        "looplag_culprit_inlined"
    } else {
        "stacks::looplag_culprit_inlined"
    };
    assert_eq!(culprit.function, expected, "{stack}");
    assert!(culprit.file.is_some(), "{stack}");
}

#[test]
fn without_a_stack_the_histogram_says_unknown() {
    let h = harness(|b| b.capture_stacks(false));
    let report = h.stall_in_span(
        &current_thread(&h.looplag),
        || tracing::info_span!("culprit"),
        async { std::thread::sleep(Duration::from_millis(100)) },
        Duration::from_secs(10),
    );
    assert_eq!(report.culprit, Culprit::NoStack);
    assert_eq!(duration_by_function(&h), vec![("unknown".to_string(), 1)]);
}

/// Fifteen modules of ten functions, each a distinct culprit (distinct bodies, so that the
/// linker cannot fold them into one).
macro_rules! ten_culprits {
    ($($f:ident)*) => {
        $(
            #[inline(never)]
            pub fn $f() {
                std::thread::sleep(std::time::Duration::from_millis(40));
                std::hint::black_box(concat!(module_path!(), "::", stringify!($f)));
            }
        )*
        pub const ALL: &[fn()] = &[$($f),*];
    };
}

macro_rules! culprit_modules {
    ($($m:ident)*) => {
        mod generated {
            $(pub mod $m { ten_culprits!(f0 f1 f2 f3 f4 f5 f6 f7 f8 f9); })*
            pub const MODULES: &[&[fn()]] = &[$($m::ALL),*];
        }
    };
}

culprit_modules!(m0 m1 m2 m3 m4 m5 m6 m7 m8 m9 m10 m11 m12 m13 m14);

#[test]
fn distinct_culprits_on_the_histogram_are_bounded() {
    const N: usize = 100;
    let h = harness(|b| {
        b.max_culprit_functions(N)
            .sample_interval(Duration::from_millis(2))
            .stall_threshold(Duration::from_millis(15))
            .max_stacks_per_minute(6000)
            .max_stall_logs_per_second(0)
    });
    let culprits: Vec<fn()> = generated::MODULES
        .iter()
        .flat_map(|m| m.iter().copied())
        .collect();
    assert_eq!(culprits.len(), 150);
    let runtime = current_thread(&h.looplag);
    let watchdog = h.looplag.start(runtime.handle()).expect("start");
    runtime.block_on(async {
        for (i, culprit) in culprits.iter().copied().enumerate() {
            tokio::spawn(async move { culprit() }.instrument(tracing::info_span!("generated", i)))
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
    });
    h.wait_ended(150, Duration::from_secs(60));
    drop(watchdog);
    let ended = h.ended_reports();
    let named: std::collections::BTreeSet<String> = ended
        .iter()
        .map(|report| culprit_of(report).function)
        .collect();
    assert_eq!(
        named.len(),
        150,
        "every stall names its own function: {named:#?}"
    );
    assert!(named.contains("stacks::generated::m14::f9"), "{named:#?}");
    // A loaded machine may add a stall of its own (a poll preempted past the threshold),
    // whose stack may hold no application frame: `unknown` is kept apart.
    let values: Vec<(String, u64)> = duration_by_function(&h)
        .into_iter()
        .filter(|(name, _)| name != "unknown")
        .collect();
    assert_eq!(values.len(), N + 1, "N names and `other`: {values:#?}");
    let other = values.iter().find(|(name, _)| name == "other");
    assert_eq!(other.map(|(_, count)| *count), Some(50), "{values:#?}");
    let generated = values
        .iter()
        .filter(|(name, _)| name.starts_with("stacks::generated::"))
        .count();
    assert_eq!(generated, N, "{values:#?}");
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
    let (stack, report) = stall(&h, "lock");
    assert_culprit_above_caller(&stack, "looplag_culprit_lock");
    // Not std's futex wait, nor `Mutex::lock`: the application function that locked.
    assert_eq!(
        culprit_of(&report).function,
        "stacks::looplag_culprit_lock",
        "{stack}"
    );
    let stall = &h.stall_spans()[0];
    assert_eq!(
        attr(stall, "code.function.name"),
        Some(Value::from("stacks::looplag_culprit_lock"))
    );
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
