//! Hot path: what looplag adds to a span enter+exit, to the runtime's park/unpark, and
//! (under `--cfg tokio_unstable`) to every task poll.
//!
//! Span enter+exit is measured with the `tracing_subscriber` registry alone and with the
//! registry plus looplag's layer, on the same thread, in alternating batches:
//!
//! - on a registered worker slot of a hooked current-thread runtime (inside `block_on`) and
//!   of a hooked one-worker multi-thread runtime (inside a task), each checked at the end by
//!   injecting a stall and getting an exact `StallReport` for that thread;
//! - at the poll boundary (a span entered at the thread's base depth: looplag reads the TSC)
//!   and nested (a span entered inside another: no clock read);
//! - on a plain thread, which has no slot.
//!
//! Every number is the median over many short batches (each batch is 100 000 operations);
//! "added" is the median of the per-round differences, so slow drift on a shared machine
//! cancels out.

#[path = "support/mod.rs"]
mod support;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use looplag::{LoopLag, StallReport, StallState};
use support::*;
use tracing::dispatcher::Dispatch;
use tracing::instrument::WithSubscriber;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const BATCH: u64 = 100_000;

/// Nanoseconds per call of `f`, over `BATCH` calls.
fn per_op(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..BATCH {
        f();
    }
    start.elapsed().as_nanos() as f64 / BATCH as f64
}

/// Enter+exit at the thread's base depth, alternating between two spans so that looplag
/// records a new poll-level span each time (as it does when different tasks are polled).
fn boundary(dispatch: &Dispatch) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        let a = tracing::info_span!("poll_a");
        let b = tracing::info_span!("poll_b");
        per_op(|| {
            drop(black_box(a.enter()));
            drop(black_box(b.enter()));
        }) / 2.0
    })
}

/// Enter+exit of a span inside an entered one: no poll boundary.
fn nested(dispatch: &Dispatch) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        let outer = tracing::info_span!("request");
        let inner = tracing::info_span!("inner");
        let _outer = outer.enter();
        per_op(|| drop(black_box(inner.enter())))
    })
}

#[derive(Default)]
struct Samples {
    registry: Vec<f64>,
    looplag: Vec<f64>,
    added: Vec<f64>,
}

impl Samples {
    fn push(&mut self, registry: f64, looplag: f64) {
        self.registry.push(registry);
        self.looplag.push(looplag);
        self.added.push(looplag - registry);
    }

    fn row(&mut self, what: &str) -> Row {
        let registry = median(&mut self.registry);
        let looplag = median(&mut self.looplag);
        Row {
            what: what.to_string(),
            registry,
            looplag,
            added: median(&mut self.added),
        }
    }
}

struct Row {
    what: String,
    registry: f64,
    looplag: f64,
    added: f64,
}

/// Alternating batches of boundary and nested enter+exit, registry alone vs with looplag.
fn measure_spans(rounds: usize, plain: &Dispatch, with_looplag: &Dispatch) -> (Samples, Samples) {
    let mut at_boundary = Samples::default();
    let mut inside = Samples::default();
    // Warm up caches, the allocator and the registry's slab.
    for _ in 0..3 {
        boundary(plain);
        boundary(with_looplag);
        nested(plain);
        nested(with_looplag);
    }
    for round in 0..rounds {
        let (r, l) = if round % 2 == 0 {
            let r = boundary(plain);
            (r, boundary(with_looplag))
        } else {
            let l = boundary(with_looplag);
            (boundary(plain), l)
        };
        at_boundary.push(r, l);
        let (r, l) = if round % 2 == 0 {
            let r = nested(plain);
            (r, nested(with_looplag))
        } else {
            let l = nested(with_looplag);
            (nested(plain), l)
        };
        inside.push(r, l);
    }
    (at_boundary, inside)
}

/// Runs a task that blocks inside a span for longer than the threshold and waits for its
/// exact stall report on this thread: proof that the thread's slot is registered. The task
/// runs on the calling worker (a current-thread runtime, or a one-worker multi-thread one).
async fn check_registered(reports: &Mutex<Vec<StallReport>>) -> String {
    let tid = unsafe_gettid();
    tokio::spawn(
        async { std::thread::sleep(Duration::from_millis(120)) }
            .instrument(tracing::info_span!("registration_check")),
    )
    .await
    .expect("check task");
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let found = reports.lock().unwrap().iter().any(|report| {
            report.state == StallState::Ended
                && report.exact
                && report.thread_id == Some(tid)
                && report.span_name == Some("registration_check")
        });
        if found {
            return "yes (exact stall report for this thread)".to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    "NO: no exact stall report for this thread; these numbers are not on a worker slot".to_string()
}

fn unsafe_gettid() -> i64 {
    // SAFETY: `gettid` takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

fn looplag_instance(reports: &Arc<Mutex<Vec<StallReport>>>) -> LoopLag {
    let sink = Arc::clone(reports);
    LoopLag::builder()
        .on_stall(move |report| sink.lock().unwrap().push(report.clone()))
        .build()
        .expect("looplag")
}

fn dispatches(looplag: &LoopLag) -> (Dispatch, Dispatch) {
    (
        Dispatch::new(tracing_subscriber::registry()),
        Dispatch::new(tracing_subscriber::registry().with(looplag.layer())),
    )
}

fn print_span_rows(rows: &[Row]) {
    println!("| thread | enter+exit | registry alone (ns) | registry + looplag (ns) | added (ns) | ratio |");
    println!("|---|---|---:|---:|---:|---:|");
    for row in rows {
        let (thread, kind) = row.what.split_once(" / ").unwrap_or((&row.what, ""));
        println!(
            "| {thread} | {kind} | {:.1} | {:.1} | {:+.1} | {:.2} |",
            row.registry,
            row.looplag,
            row.added,
            row.looplag / row.registry
        );
    }
}

/// Span enter+exit inside a hooked current-thread runtime's `block_on`.
fn current_thread_worker(rounds: usize) -> (Vec<Row>, String, ParkCost) {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let looplag = looplag_instance(&reports);
    let (plain, with_looplag) = dispatches(&looplag);
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    looplag.hook_runtime(&mut builder);
    let runtime = builder.build().expect("runtime");
    let watchdog = looplag.start(runtime.handle()).expect("start");
    let park = looplag.park_hook();
    let unpark = looplag.unpark_hook();
    let result = runtime.block_on(async {
        // Park once so that this thread registers its slot (the park hook does it).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (mut at_boundary, mut inside) = measure_spans(rounds, &plain, &with_looplag);
        let park_cost = park_unpark(rounds, &park, &unpark);
        let registered = check_registered(&reports)
            .with_subscriber(with_looplag.clone())
            .await;
        (
            vec![
                at_boundary.row("current-thread worker (in `block_on`) / poll boundary"),
                inside.row("current-thread worker (in `block_on`) / nested"),
            ],
            registered,
            park_cost,
        )
    });
    drop(watchdog);
    result
}

/// Span enter+exit inside a task on a hooked one-worker multi-thread runtime.
fn multi_thread_worker(rounds: usize) -> (Vec<Row>, String) {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let looplag = looplag_instance(&reports);
    let (plain, with_looplag) = dispatches(&looplag);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(1).enable_all();
    looplag.hook_runtime(&mut builder);
    let runtime = builder.build().expect("runtime");
    let watchdog = looplag.start(runtime.handle()).expect("start");
    let result = runtime
        .block_on(runtime.spawn(async move {
            let (mut at_boundary, mut inside) = measure_spans(rounds, &plain, &with_looplag);
            let registered = check_registered(&reports)
                .with_subscriber(with_looplag.clone())
                .await;
            (
                vec![
                    at_boundary.row("multi-thread worker (in a task) / poll boundary"),
                    inside.row("multi-thread worker (in a task) / nested"),
                ],
                registered,
            )
        }))
        .expect("measuring task");
    drop(watchdog);
    result
}

/// Span enter+exit on a plain thread (no slot): one thread-local read.
fn plain_thread(rounds: usize) -> Vec<Row> {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let looplag = looplag_instance(&reports);
    let (plain, with_looplag) = dispatches(&looplag);
    std::thread::spawn(move || {
        let (mut at_boundary, mut inside) = measure_spans(rounds, &plain, &with_looplag);
        vec![
            at_boundary.row("plain thread (no slot) / outermost"),
            inside.row("plain thread (no slot) / nested"),
        ]
    })
    .join()
    .expect("plain thread")
}

struct ParkCost {
    pair: f64,
}

/// Calls looplag's park and unpark hooks back to back on the registered worker.
fn park_unpark(
    rounds: usize,
    park: &(impl Fn() + Send + Sync),
    unpark: &(impl Fn() + Send + Sync),
) -> ParkCost {
    let mut pairs: Vec<f64> = (0..rounds)
        .map(|_| {
            per_op(|| {
                park();
                unpark();
            })
        })
        .collect();
    ParkCost {
        pair: median(&mut pairs),
    }
}

/// Two tasks that wake each other through `Notify`: every wake-up is one task poll, with no
/// syscall, so the difference between a hooked and an unhooked runtime is the poll hooks'
/// cost (zero on stable builds, which have no poll hooks).
fn ping_pong(runtime: &tokio::runtime::Runtime, polls: u64) -> f64 {
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
            }
            q1.notify_one();
        });
        let (p2, q2) = (Arc::clone(&ping), Arc::clone(&pong));
        let b = tokio::spawn(async move {
            for _ in 0..half {
                q2.notified().await;
                p2.notify_one();
            }
        });
        let start = Instant::now();
        a.await.unwrap();
        b.await.unwrap();
        start.elapsed().as_nanos() as f64 / (2 * half) as f64
    })
}

/// Ping-pong on an unhooked runtime, on one hooked by looplag and (under
/// `tokio_unstable`) on one with empty poll hooks: tokio's own cost of calling hooks.
/// Returns median ns per poll for each, and the medians of the per-round differences.
struct PollCost {
    unhooked: f64,
    looplag: f64,
    empty_hooks: Option<f64>,
    looplag_added: f64,
    empty_added: Option<f64>,
}

fn poll_hooks(rounds: usize) -> PollCost {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let looplag = looplag_instance(&reports);
    let mut hooked = tokio::runtime::Builder::new_current_thread();
    hooked.enable_all();
    looplag.hook_runtime(&mut hooked);
    let hooked = hooked.build().expect("runtime");
    let _watchdog = looplag.start(hooked.handle()).expect("start");
    let plain = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    #[cfg(tokio_unstable)]
    let empty = Some(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_before_task_poll(|_| {})
            .on_after_task_poll(|_| {})
            .build()
            .expect("runtime"),
    );
    #[cfg(not(tokio_unstable))]
    let empty: Option<tokio::runtime::Runtime> = None;
    hooked.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
    let polls = BATCH * 2;
    let (mut with, mut without, mut added) = (Vec::new(), Vec::new(), Vec::new());
    let (mut with_empty, mut empty_added) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        ping_pong(&plain, polls);
        ping_pong(&hooked, polls);
    }
    for round in 0..rounds {
        // Rotate the order of the runtimes from round to round.
        let (mut p, mut w, mut e) = (0.0, 0.0, None);
        for k in 0..3 {
            match (round + k) % 3 {
                0 => p = ping_pong(&plain, polls),
                1 => w = ping_pong(&hooked, polls),
                _ => e = empty.as_ref().map(|rt| ping_pong(rt, polls)),
            }
        }
        with.push(w);
        without.push(p);
        added.push(w - p);
        if let Some(e) = e {
            with_empty.push(e);
            empty_added.push(e - p);
        }
    }
    PollCost {
        unhooked: median(&mut without),
        looplag: median(&mut with),
        empty_hooks: empty.as_ref().map(|_| median(&mut with_empty)),
        looplag_added: median(&mut added),
        empty_added: empty.as_ref().map(|_| median(&mut empty_added)),
    }
}

/// The pieces the poll-boundary cost is made of, measured alone on this machine.
fn components(rounds: usize) -> Vec<(&'static str, f64)> {
    let clock = quanta::Clock::new();
    thread_local! {
        static CELL: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    let word = AtomicU64::new(0);
    let mut rows: Vec<(&'static str, Vec<f64>)> = vec![
        (
            "`quanta::Clock::raw()` (the TSC read looplag does)",
            Vec::new(),
        ),
        ("`_rdtsc()` alone", Vec::new()),
        ("`std::time::Instant::now()`", Vec::new()),
        ("`thread_local!` read (`Cell<usize>`)", Vec::new()),
        ("`tokio::runtime::worker_index()`", Vec::new()),
        ("atomic load + release store (same line)", Vec::new()),
    ];
    for _ in 0..rounds {
        rows[0].1.push(per_op(|| {
            black_box(clock.raw());
        }));
        rows[1].1.push(per_op(|| {
            // SAFETY: `rdtsc` is available on every x86_64 CPU.
            black_box(unsafe { core::arch::x86_64::_rdtsc() });
        }));
        rows[2].1.push(per_op(|| {
            black_box(Instant::now());
        }));
        rows[3].1.push(per_op(|| {
            black_box(CELL.with(|c| c.get()));
        }));
        rows[4].1.push(per_op(|| {
            black_box(tokio::runtime::worker_index());
        }));
        rows[5].1.push(per_op(|| {
            let v = black_box(&word).load(Ordering::Relaxed);
            word.store(v.wrapping_add(1), Ordering::Release);
        }));
    }
    rows.into_iter()
        .map(|(name, mut values)| (name, median(&mut values)))
        .collect()
}

fn main() {
    let rounds = pick(101, 21);
    header("Hot path: span enter+exit, park/unpark, poll hooks");
    println!(
        "{rounds} rounds × {BATCH} operations per variant, variants alternated within each round; \
         median ns per operation."
    );
    println!();

    let (mut rows, current_registered, park) = current_thread_worker(rounds);
    let (multi_rows, multi_registered) = multi_thread_worker(rounds);
    rows.extend(multi_rows);
    rows.extend(plain_thread(rounds));
    print_span_rows(&rows);
    println!();
    println!("- current-thread worker slot registered: {current_registered}");
    println!("- multi-thread worker slot registered: {multi_registered}");

    println!();
    println!("| hook | cost (ns) |");
    println!("|---|---:|");
    println!(
        "| looplag park hook + unpark hook (called back to back on the worker) | {:.1} |",
        park.pair
    );
    let polls = poll_hooks(rounds);
    println!(
        "| task poll, Notify ping-pong: unhooked runtime {:.1} ns/poll, hooked by looplag {:.1} ns/poll | {:+.1} per poll{} |",
        polls.unhooked,
        polls.looplag,
        polls.looplag_added,
        if cfg!(tokio_unstable) {
            " (poll hooks)"
        } else {
            " (stable: no poll hooks, expect ≈ 0)"
        }
    );
    if let (Some(empty), Some(empty_added)) = (polls.empty_hooks, polls.empty_added) {
        println!(
            "| task poll with empty poll hooks (tokio's own cost of calling two hooks): {empty:.1} ns/poll | {empty_added:+.1} per poll |"
        );
        println!(
            "| looplag's poll hook bodies alone (difference of the two rows above) | {:+.1} per poll |",
            polls.looplag_added - empty_added
        );
    }
    println!();
    println!("What a poll boundary is made of (each measured alone, median ns):");
    println!();
    println!("| piece | ns |");
    println!("|---|---:|");
    for (name, ns) in components(rounds) {
        println!("| {name} | {ns:.1} |");
    }
    footer();
}
