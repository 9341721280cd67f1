//! Instruction counts of the hot path, for callgrind: one workload variant per process.
//!
//! ```text
//! instructions <row> <off|on> <iterations> [extra]
//! instructions --list
//! ```
//!
//! `scripts/instructions.py` runs each (row, variant) under
//! `valgrind --tool=callgrind --collect-atstart=no --toggle-collect=*instructions::measured*`
//! with N and 2N iterations and takes (I(2N) − I(N)) / N: what one iteration costs, with
//! setup, warm-up and teardown cancelled out. "off" and "on" run the same setup (same threads,
//! same runtime, same subscriber shape); "on" has looplag's layer or hooks where "off" has an
//! empty layer or no hooks. `extra` (default 0) makes the "on" variant run that many more
//! iterations of a tiny loop per iteration: the driver's self-test uses it to show the guard
//! fails on an added cost.
//!
//! What keeps the counts the same from run to run:
//!
//! - only [`measured`] (and what it calls) is counted: callgrind's collection is per thread,
//!   switched on when `measured` is entered and off when it returns;
//! - the workload runs on a dedicated thread (or a runtime worker), never on the main
//!   thread, and every variant has the same threads alive, so glibc takes the same
//!   (multi-thread) paths; the driver runs it under `env -i` with a fixed `PATH`;
//! - no watchdog runs, so no delay probe is polled on the measured thread; the worker slots
//!   are registered the way a hooked runtime registers them (by its park hook; the driver
//!   checks that the poll-boundary rows cost more than the plain thread's, which has none);
//! - the warm-up calls the workload directly, never through `measured`, and `measured` is
//!   `#[inline(never)]` with its argument behind `black_box`, so it cannot be merged with
//!   anything else (the driver checks that callgrind saw exactly one call to it).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use looplag::LoopLag;
use tracing::dispatcher::Dispatch;
use tracing_subscriber::layer::SubscriberExt;

/// Iterations of the workload run before the measured call: caches, the allocator, the
/// registry's slab, the TSC calibration and lazily built statics are all warm after it.
const WARM_UP: u64 = 200;

/// The one counted function: callgrind collects from its entry to its return.
#[inline(never)]
fn measured(iterations: u64, work: &mut dyn FnMut(u64)) {
    work(black_box(iterations));
}

/// What one process measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Off,
    On,
}

/// Where the workload runs.
#[derive(Clone, Copy)]
enum Setup {
    /// Inside `block_on` of a hooked current-thread runtime.
    CurrentThread,
    /// Inside a task on a hooked one-worker multi-thread runtime.
    MultiThread,
    /// On a plain thread, which has no slot.
    Plain,
}

/// The span workloads.
#[derive(Clone, Copy)]
enum Spans {
    /// Enter+exit at the poll boundary, alternating two spans (2 enter+exit per iteration).
    Boundary,
    /// Enter+exit of a span inside an entered one.
    Nested,
    /// A new root span, closed.
    Root,
    /// One request: root + child span, 3 boundary enters, 2 nested.
    Request,
}

/// One row: its name, what one iteration is, and how many operations an iteration holds.
struct Row {
    name: &'static str,
    what: &'static str,
    ops_per_iteration: u64,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    Spans {
        setup: Setup,
        spans: Spans,
        otel: bool,
    },
    ParkUnpark,
    PollHooks,
}

const fn spans(
    name: &'static str,
    what: &'static str,
    ops_per_iteration: u64,
    setup: Setup,
    spans: Spans,
    otel: bool,
) -> Row {
    Row {
        name,
        what,
        ops_per_iteration,
        kind: Kind::Spans { setup, spans, otel },
    }
}

const ROWS: &[Row] = &[
    spans(
        "ct.boundary",
        "current-thread worker (in `block_on`): enter+exit, poll boundary",
        2,
        Setup::CurrentThread,
        Spans::Boundary,
        false,
    ),
    spans(
        "ct.nested",
        "current-thread worker: enter+exit, nested",
        1,
        Setup::CurrentThread,
        Spans::Nested,
        false,
    ),
    spans(
        "ct.root",
        "current-thread worker: new root span + close",
        1,
        Setup::CurrentThread,
        Spans::Root,
        false,
    ),
    spans(
        "ct.request",
        "current-thread worker: one request (root + child, 3 polls)",
        1,
        Setup::CurrentThread,
        Spans::Request,
        false,
    ),
    spans(
        "ct.request.otel",
        "current-thread worker: one request, with tracing-opentelemetry",
        1,
        Setup::CurrentThread,
        Spans::Request,
        true,
    ),
    spans(
        "mt.boundary",
        "multi-thread worker (in a task): enter+exit, poll boundary",
        2,
        Setup::MultiThread,
        Spans::Boundary,
        false,
    ),
    spans(
        "mt.nested",
        "multi-thread worker: enter+exit, nested",
        1,
        Setup::MultiThread,
        Spans::Nested,
        false,
    ),
    spans(
        "mt.root",
        "multi-thread worker: new root span + close",
        1,
        Setup::MultiThread,
        Spans::Root,
        false,
    ),
    spans(
        "mt.request",
        "multi-thread worker: one request (root + child, 3 polls)",
        1,
        Setup::MultiThread,
        Spans::Request,
        false,
    ),
    spans(
        "mt.request.otel",
        "multi-thread worker: one request, with tracing-opentelemetry",
        1,
        Setup::MultiThread,
        Spans::Request,
        true,
    ),
    spans(
        "plain.enter_exit",
        "plain thread (no slot): enter+exit",
        2,
        Setup::Plain,
        Spans::Boundary,
        false,
    ),
    Row {
        name: "hooks.park_unpark",
        what: "park hook + unpark hook, on a registered current-thread worker",
        ops_per_iteration: 1,
        kind: Kind::ParkUnpark,
    },
    Row {
        name: "hooks.poll",
        what:
            "task poll (Notify ping-pong on a current-thread runtime), `--cfg tokio_unstable` only",
        ops_per_iteration: 1,
        kind: Kind::PollHooks,
    },
];

/// A layer with no hooks: the "off" variant of the span rows.
struct EmptyLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for EmptyLayer {}

/// A span processor that drops every span: tracing-opentelemetry and the SDK do all their
/// work (the span is recorded and ended), and nothing is exported.
#[derive(Debug)]
struct DropProcessor;

impl opentelemetry_sdk::trace::SpanProcessor for DropProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}
    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        drop(black_box(span));
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// The subscriber of a span row: the registry with an empty layer (off) or looplag's layer
/// (on), and with tracing-opentelemetry's layer last when `otel`.
fn dispatch(looplag: &LoopLag, variant: Variant, otel: bool) -> Dispatch {
    use opentelemetry::trace::TracerProvider as _;
    let base = tracing_subscriber::registry();
    let tracer = otel.then(|| {
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_span_processor(DropProcessor)
            .build()
            .tracer("instructions")
    });
    match variant {
        Variant::Off => Dispatch::new(
            base.with(EmptyLayer)
                .with(tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t))),
        ),
        Variant::On => Dispatch::new(
            base.with(looplag.layer())
                .with(tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t))),
        ),
    }
}

/// Runs `iterations` of a span workload under the current dispatcher.
fn run_spans(spans: Spans, iterations: u64, extra: u64) {
    match spans {
        Spans::Boundary => {
            let a = tracing::info_span!("poll_a");
            let b = tracing::info_span!("poll_b");
            for _ in 0..iterations {
                drop(black_box(a.enter()));
                drop(black_box(b.enter()));
                burn(extra);
            }
        }
        Spans::Nested => {
            let outer = tracing::info_span!("request");
            let inner = tracing::info_span!("inner");
            let _outer = outer.enter();
            for _ in 0..iterations {
                drop(black_box(inner.enter()));
                burn(extra);
            }
        }
        Spans::Root => {
            for _ in 0..iterations {
                drop(black_box(tracing::info_span!("request")));
                burn(extra);
            }
        }
        Spans::Request => {
            for _ in 0..iterations {
                let root = tracing::info_span!("request");
                drop(black_box(root.enter()));
                drop(black_box(root.enter()));
                let poll = root.enter();
                let child = tracing::info_span!("handler");
                drop(black_box(child.enter()));
                drop(black_box(child.enter()));
                drop(child);
                drop(poll);
                drop(black_box(root));
                burn(extra);
            }
        }
    }
}

/// The injected cost: `extra` trips round a loop the optimiser cannot remove.
#[inline(never)]
fn burn(extra: u64) {
    for i in 0..extra {
        black_box(i);
    }
}

/// Warm-up, then the measured call, of `work` (which runs the given number of iterations).
fn warm_then_measure(iterations: u64, mut work: impl FnMut(u64)) {
    work(WARM_UP);
    measured(iterations, &mut work);
}

fn looplag() -> LoopLag {
    // No watchdog is started: the sample interval only matters to it.
    LoopLag::builder().build().expect("looplag")
}

/// A current-thread runtime, with looplag's hooks when `hooked`.
fn current_thread(looplag: &LoopLag, hooked: bool) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    if hooked {
        looplag.hook_runtime(&mut builder);
    }
    builder.build().expect("runtime")
}

/// Parks the worker once (a 1 ms sleep), which registers its slot through the park hook, as
/// on any hooked runtime.
async fn park_once() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn span_row(setup: Setup, spans: Spans, otel: bool, variant: Variant, n: u64, extra: u64) {
    let looplag = looplag();
    let dispatch = dispatch(&looplag, variant, otel);
    let extra = if variant == Variant::On { extra } else { 0 };
    let work = move |dispatch: &Dispatch| {
        tracing::dispatcher::with_default(dispatch, || {
            warm_then_measure(n, |k| run_spans(spans, k, extra));
        });
    };
    match setup {
        Setup::CurrentThread => {
            let runtime = current_thread(&looplag, true);
            runtime.block_on(async {
                park_once().await;
                work(&dispatch);
            });
        }
        Setup::MultiThread => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(1).enable_all();
            looplag.hook_runtime(&mut builder);
            let runtime = builder.build().expect("runtime");
            runtime
                .block_on(runtime.spawn(async move {
                    park_once().await;
                    work(&dispatch);
                }))
                .expect("measuring task");
        }
        // This thread never ran a hooked runtime: it has no slot.
        Setup::Plain => work(&dispatch),
    }
}

/// A park or unpark hook, called through a pointer in both variants.
type Hook = Box<dyn Fn()>;

fn park_unpark(variant: Variant, n: u64, extra: u64) {
    let looplag = looplag();
    let runtime = current_thread(&looplag, true);
    let (park, unpark): (Hook, Hook) = match variant {
        Variant::Off => (Box::new(|| {}), Box::new(|| {})),
        Variant::On => (
            Box::new(looplag.park_hook()),
            Box::new(looplag.unpark_hook()),
        ),
    };
    let extra = if variant == Variant::On { extra } else { 0 };
    runtime.block_on(async {
        park_once().await;
        warm_then_measure(n, |k| {
            for _ in 0..k {
                black_box(&park)();
                black_box(&unpark)();
                burn(extra);
            }
        });
    });
}

/// Two tasks waking each other through `Notify`, `polls` task polls in all, with no syscall:
/// every poll runs the poll hooks (under `--cfg tokio_unstable`) and nothing else of looplag.
fn ping_pong(runtime: &tokio::runtime::Runtime, polls: u64, extra: u64) {
    runtime.block_on(async move {
        let ping = Arc::new(tokio::sync::Notify::new());
        let pong = Arc::new(tokio::sync::Notify::new());
        let count = Arc::new(AtomicU64::new(0));
        let (p1, q1, c1) = (Arc::clone(&ping), Arc::clone(&pong), Arc::clone(&count));
        let half = polls / 2;
        let a = tokio::spawn(async move {
            for _ in 0..half {
                q1.notify_one();
                p1.notified().await;
                c1.fetch_add(1, Ordering::Relaxed);
                burn(extra);
            }
            q1.notify_one();
        });
        let (p2, q2) = (Arc::clone(&ping), Arc::clone(&pong));
        let b = tokio::spawn(async move {
            for _ in 0..half {
                q2.notified().await;
                p2.notify_one();
                burn(extra);
            }
        });
        a.await.expect("ping");
        b.await.expect("pong");
    });
}

fn poll_hooks(variant: Variant, n: u64, extra: u64) {
    let looplag = looplag();
    let runtime = current_thread(&looplag, variant == Variant::On);
    // Registers the slot in "on" (the park hook), and parks the same way in "off".
    runtime.block_on(park_once());
    let extra = if variant == Variant::On { extra } else { 0 };
    warm_then_measure(n, |k| ping_pong(&runtime, k, extra));
}

/// The CPU brand string CPUID reports to this process: under valgrind, the CPU valgrind
/// emulates, which is what glibc picks its string functions by.
fn cpuid_brand() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // SAFETY: CPUID exists on every x86_64 CPU; the extended leaves are checked first.
        // (`__cpuid` is a safe function since Rust 1.87; the crate's minimum is 1.85.)
        #[allow(unused_unsafe)]
        let max = unsafe { __cpuid(0x8000_0000) }.eax;
        if max < 0x8000_0004 {
            return "unknown".to_string();
        }
        let mut bytes = Vec::with_capacity(48);
        for leaf in 0x8000_0002u32..=0x8000_0004 {
            // SAFETY: as above, the leaf is within the reported maximum.
            #[allow(unused_unsafe)]
            let r = unsafe { __cpuid(leaf) };
            for word in [r.eax, r.ebx, r.ecx, r.edx] {
                bytes.extend_from_slice(&word.to_le_bytes());
            }
        }
        String::from_utf8_lossy(&bytes)
            .trim_matches(char::from(0))
            .trim()
            .to_string()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "unknown".to_string()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--list") {
        for row in ROWS {
            let unstable_only = matches!(row.kind, Kind::PollHooks);
            println!(
                "{}\t{}\t{}\t{}",
                row.name,
                row.ops_per_iteration,
                if unstable_only { "unstable" } else { "all" },
                row.what
            );
        }
        return;
    }
    if args.first().map(String::as_str) == Some("--cpuid") {
        println!("{}", cpuid_brand());
        return;
    }
    let usage = "usage: instructions <row> <off|on> <iterations> [extra] | --list | --cpuid";
    let (Some(name), Some(variant), Some(n)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let Some(row) = ROWS.iter().find(|row| row.name == name) else {
        eprintln!("unknown row {name}; --list lists them");
        std::process::exit(2);
    };
    let variant = match variant.as_str() {
        "off" => Variant::Off,
        "on" => Variant::On,
        other => {
            eprintln!("unknown variant {other}\n{usage}");
            std::process::exit(2);
        }
    };
    let n: u64 = n.parse().expect("iterations");
    let extra: u64 = args.get(3).map_or(0, |e| e.parse().expect("extra"));
    if matches!(row.kind, Kind::PollHooks) && !cfg!(tokio_unstable) {
        eprintln!("{}: needs a --cfg tokio_unstable build", row.name);
        std::process::exit(3);
    }
    let kind = row.kind;
    // The workload runs on its own thread (a runtime's worker for the multi-thread rows),
    // never on the main thread, whose stack depends on the environment and arguments.
    std::thread::Builder::new()
        .name("measure".to_string())
        .spawn(move || match kind {
            Kind::Spans { setup, spans, otel } => span_row(setup, spans, otel, variant, n, extra),
            Kind::ParkUnpark => park_unpark(variant, n, extra),
            Kind::PollHooks => poll_hooks(variant, n, extra),
        })
        .expect("thread")
        .join()
        .expect("workload");
}
