//! Hot path: what looplag adds to a span enter+exit, to the runtime's park/unpark, and
//! (under `--cfg tokio_unstable`) to every task poll.
//!
//! Span enter+exit is measured with the `tracing_subscriber` registry alone, with the
//! registry plus a layer that does nothing (what layering itself costs), and with the
//! registry plus looplag's layer, on the same thread, in alternating batches:
//!
//! - on a registered worker slot of a hooked current-thread runtime (inside `block_on`) and
//!   of a hooked one-worker multi-thread runtime (inside a task), each checked at the end by
//!   injecting a stall and getting an exact `StallReport` for that thread;
//! - at the poll boundary (a span entered at the thread's base depth: looplag reads the TSC)
//!   and nested (a span entered inside another: no clock read);
//! - on a plain thread, which has no slot.
//!
//! Every number is the median over many short batches (each batch is 10 000 operations, so
//! that few batches include a preemption on a shared machine);
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

const BATCH: u64 = 10_000;

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

/// Enter+exit at the base depth of the same span every time: looplag skips recording the
/// poll-level span (it is the last one recorded), which isolates that part of the cost.
fn boundary_same_span(dispatch: &Dispatch) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        let a = tracing::info_span!("poll_a");
        per_op(|| drop(black_box(a.enter())))
    })
}

/// Creating and closing a root span (no parent): looplag tracks it as a possible victim.
fn new_root(dispatch: &Dispatch) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        per_op(|| drop(black_box(tracing::info_span!("request"))))
    })
}

/// Creating and closing a child span: looplag only checks that it is not a root.
fn new_child(dispatch: &Dispatch) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        let parent = tracing::info_span!("parent");
        per_op(|| drop(black_box(tracing::info_span!(parent: &parent, "child"))))
    })
}

/// The span work of one HTTP request as tower-http's `TraceLayer` and a handler's
/// `#[instrument]` produce it (the counts measured in the server benchmark): a root span
/// polled three times (three enters at the poll boundary), a child span entered twice inside
/// the last poll, both closed. Measured under subscribers that also carry
/// `tracing-opentelemetry`'s layer, as in a real service: its extensions are there, and
/// each closed span is built into an OpenTelemetry span (the tracer has no processor, so
/// nothing is exported).
fn request(dispatch: &Dispatch) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        per_op_n(REQUEST_BATCH, || {
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
        })
    })
}

/// Requests per batch: one request costs about 2 µs under these subscribers.
const REQUEST_BATCH: u64 = 1_000;

/// Nanoseconds per call of `f`, over `n` calls.
fn per_op_n(n: u64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed().as_nanos() as f64 / n as f64
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
    empty: Vec<f64>,
    looplag: Vec<f64>,
    added: Vec<f64>,
    over_empty: Vec<f64>,
}

impl Samples {
    fn push(&mut self, [registry, empty, looplag]: [f64; 3]) {
        self.registry.push(registry);
        self.empty.push(empty);
        self.looplag.push(looplag);
        self.added.push(looplag - registry);
        self.over_empty.push(looplag - empty);
    }

    fn row(&mut self, what: &str) -> Row {
        Row {
            what: what.to_string(),
            registry: median(&mut self.registry),
            empty: median(&mut self.empty),
            looplag: median(&mut self.looplag),
            added: median(&mut self.added),
            over_empty: median(&mut self.over_empty),
        }
    }
}

struct Row {
    what: String,
    registry: f64,
    empty: f64,
    looplag: f64,
    added: f64,
    over_empty: f64,
}

/// The three subscribers compared: the registry alone, the registry with a layer that does
/// nothing (the cost of any layer), and the registry with looplag's layer.
struct Subscribers {
    registry: Dispatch,
    empty_layer: Dispatch,
    looplag: Dispatch,
}

/// A layer with no hooks: what `tracing-subscriber` charges for layering itself.
struct EmptyLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for EmptyLayer {}

/// One batch of `measure` under each subscriber, in an order that rotates with `round`.
fn three(round: usize, subscribers: &Subscribers, measure: Measure) -> [f64; 3] {
    let mut out = [0.0; 3];
    let all = [
        &subscribers.registry,
        &subscribers.empty_layer,
        &subscribers.looplag,
    ];
    for k in 0..3 {
        let i = (round + k) % 3;
        out[i] = measure(all[i]);
    }
    out
}

/// Measures one operation under a subscriber: ns per operation.
type Measure = fn(&Dispatch) -> f64;

/// The span operations measured, with the label of their row.
const OPERATIONS: [(&str, Measure); 5] = [
    ("enter+exit, poll boundary", boundary),
    (
        "enter+exit, poll boundary, same span each time",
        boundary_same_span,
    ),
    ("enter+exit, nested", nested),
    ("new root span + close", new_root),
    ("new child span + close", new_child),
];

/// Rounds of batches of every operation under the three subscribers.
fn measure_spans(rounds: usize, subscribers: &Subscribers, thread: &str) -> Vec<Row> {
    measure(rounds, subscribers, thread, &OPERATIONS)
}

/// Rounds of batches of `operations` under the three subscribers.
fn measure(
    rounds: usize,
    subscribers: &Subscribers,
    thread: &str,
    operations: &[(&str, Measure)],
) -> Vec<Row> {
    let mut samples = warm_up(subscribers, operations);
    for round in 0..rounds {
        measure_round(round, subscribers, operations, &mut samples);
    }
    rows(samples, thread, operations)
}

/// `measure` inside a task, yielding between rounds: one round is a few milliseconds, and
/// a task that measured every round in one poll would be a stall (under `--cfg
/// tokio_unstable`, where every task poll is watched), measured while looplag reports it.
async fn measure_in_task(
    rounds: usize,
    subscribers: &Subscribers,
    thread: &str,
    operations: &[(&str, Measure)],
) -> Vec<Row> {
    let mut samples = warm_up(subscribers, operations);
    for round in 0..rounds {
        measure_round(round, subscribers, operations, &mut samples);
        tokio::task::yield_now().await;
    }
    rows(samples, thread, operations)
}

/// Warms up caches, the allocator and the registry's slab; returns empty samples.
fn warm_up(subscribers: &Subscribers, operations: &[(&str, Measure)]) -> Vec<Samples> {
    for round in 0..3 {
        for (_, operation) in operations {
            three(round, subscribers, *operation);
        }
    }
    operations.iter().map(|_| Samples::default()).collect()
}

fn measure_round(
    round: usize,
    subscribers: &Subscribers,
    operations: &[(&str, Measure)],
    samples: &mut [Samples],
) {
    for (i, (_, operation)) in operations.iter().enumerate() {
        samples[i].push(three(round, subscribers, *operation));
    }
}

fn rows(mut samples: Vec<Samples>, thread: &str, operations: &[(&str, Measure)]) -> Vec<Row> {
    samples
        .iter_mut()
        .zip(operations)
        .map(|(samples, (label, _))| samples.row(&format!("{thread} / {label}")))
        .collect()
}

/// The same three subscribers, each with `tracing-opentelemetry`'s layer added last (after
/// looplag's, as documented), over a tracer with no span processor.
fn dispatches_with_otel(looplag: &LoopLag) -> Subscribers {
    use opentelemetry::trace::TracerProvider as _;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let tracer = provider.tracer("bench");
    Subscribers {
        registry: Dispatch::new(
            tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(tracer.clone())),
        ),
        empty_layer: Dispatch::new(
            tracing_subscriber::registry()
                .with(EmptyLayer)
                .with(tracing_opentelemetry::layer().with_tracer(tracer.clone())),
        ),
        looplag: Dispatch::new(
            tracing_subscriber::registry()
                .with(looplag.layer())
                .with(tracing_opentelemetry::layer().with_tracer(tracer)),
        ),
    }
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
    let deadline = Instant::now() + Duration::from_secs(5);
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

fn dispatches(looplag: &LoopLag) -> Subscribers {
    Subscribers {
        registry: Dispatch::new(tracing_subscriber::registry()),
        empty_layer: Dispatch::new(tracing_subscriber::registry().with(EmptyLayer)),
        looplag: Dispatch::new(tracing_subscriber::registry().with(looplag.layer())),
    }
}

/// Span enter+exit inside a hooked current-thread runtime's `block_on`.
fn current_thread_worker(rounds: usize) -> (Vec<Row>, String, ParkCost) {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let looplag = looplag_instance(&reports);
    let subscribers = dispatches(&looplag);
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
        let rows = measure_spans(
            rounds,
            &subscribers,
            "current-thread worker (in `block_on`)",
        );
        let park_cost = park_unpark(rounds, &park, &unpark);
        let registered = check_registered(&reports)
            .with_subscriber(subscribers.looplag.clone())
            .await;
        (rows, registered, park_cost)
    });
    drop(watchdog);
    result
}

/// Span enter+exit inside a task on a hooked one-worker multi-thread runtime.
fn multi_thread_worker(rounds: usize) -> (Vec<Row>, String) {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let looplag = looplag_instance(&reports);
    // Victim marking off: the layer records no request spans (its only per-root work).
    let without_victims = dispatches_with_otel(
        &LoopLag::builder()
            .max_victims(0)
            .build()
            .expect("looplag, max_victims(0)"),
    );
    // Built before `subscribers`: looplag resolves span ids through the subscriber
    // registered last (one per process, see the crate docs), which must be the one the
    // registration check's span lives in.
    let with_otel = dispatches_with_otel(&looplag);
    let subscribers = dispatches(&looplag);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(1).enable_all();
    looplag.hook_runtime(&mut builder);
    let runtime = builder.build().expect("runtime");
    let watchdog = looplag.start(runtime.handle()).expect("start");
    let result = runtime
        .block_on(runtime.spawn(async move {
            let mut rows = measure_in_task(
                rounds,
                &subscribers,
                "multi-thread worker (in a task)",
                &OPERATIONS,
            )
            .await;
            rows.extend(
                measure_in_task(
                    rounds,
                    &with_otel,
                    "multi-thread worker (in a task), with tracing-opentelemetry",
                    &[(
                        "one request: root + child span, 3 boundary + 2 nested enters",
                        request,
                    )],
                )
                .await,
            );
            rows.extend(
                measure_in_task(
                    rounds,
                    &without_victims,
                    "multi-thread worker (in a task), with tracing-opentelemetry, looplag with \
                     max_victims(0)",
                    &[(
                        "one request: root + child span, 3 boundary + 2 nested enters",
                        request,
                    )],
                )
                .await,
            );
            let registered = check_registered(&reports)
                .with_subscriber(subscribers.looplag.clone())
                .await;
            (rows, registered)
        }))
        .expect("measuring task");
    drop(watchdog);
    result
}

/// Span enter+exit on a plain thread (no slot): one thread-local read.
fn plain_thread(rounds: usize) -> Vec<Row> {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let looplag = looplag_instance(&reports);
    let subscribers = dispatches(&looplag);
    std::thread::spawn(move || measure_spans(rounds, &subscribers, "plain thread (no slot)"))
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

/// One measuring process: prints tab-separated lines for the parent to aggregate.
fn child(rounds: usize) {
    let (mut rows, current_registered, park) = current_thread_worker(rounds);
    let (multi_rows, multi_registered) = multi_thread_worker(rounds);
    rows.extend(multi_rows);
    rows.extend(plain_thread(rounds));
    for row in &rows {
        let (thread, kind) = row.what.split_once(" / ").unwrap_or((&row.what, ""));
        println!(
            "SPAN\t{thread}\t{kind}\t{}\t{}\t{}\t{}\t{}",
            row.registry, row.looplag, row.added, row.empty, row.over_empty
        );
    }
    println!("NOTE\tcurrent-thread worker slot registered: {current_registered}");
    println!("NOTE\tmulti-thread worker slot registered: {multi_registered}");
    println!(
        "HOOK\tlooplag park hook + unpark hook, called back to back on the worker\t{}",
        park.pair
    );
    let polls = poll_hooks(rounds);
    println!(
        "HOOK\ttask poll on an unhooked runtime (Notify ping-pong)\t{}",
        polls.unhooked
    );
    println!(
        "HOOK\ttask poll on a runtime hooked by looplag\t{}",
        polls.looplag
    );
    println!(
        "HOOK\tadded per task poll by looplag's hooks{}\t{}",
        if cfg!(tokio_unstable) {
            " (poll hooks)"
        } else {
            " (stable: no poll hooks, expect ≈ 0)"
        },
        polls.looplag_added
    );
    if let (Some(empty), Some(empty_added)) = (polls.empty_hooks, polls.empty_added) {
        println!("HOOK\ttask poll with two empty poll hooks\t{empty}");
        println!(
            "HOOK\tadded per task poll by two empty poll hooks (tokio's own cost)\t{empty_added}"
        );
        println!(
            "HOOK\tadded per task poll by looplag's hook bodies (difference of the two)\t{}",
            polls.looplag_added - empty_added
        );
    }
    for (name, ns) in components(rounds) {
        println!("PIECE\t{name}\t{ns}");
    }
}

/// Values of one key across processes, in first-seen key order.
#[derive(Default)]
struct Collected {
    order: Vec<String>,
    values: std::collections::HashMap<String, Vec<Vec<f64>>>,
    notes: Vec<String>,
}

impl Collected {
    fn add(&mut self, key: String, values: Vec<f64>) {
        if !self.values.contains_key(&key) {
            self.order.push(key.clone());
        }
        self.values.entry(key).or_default().push(values);
    }

    /// Median across processes of value `i` of `key`, and its range.
    fn stat(&self, key: &str, i: usize) -> (f64, f64, f64) {
        let mut v: Vec<f64> = self.values[key].iter().map(|vals| vals[i]).collect();
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (median(&mut v), lo, hi)
    }
}

fn main() {
    let rounds = pick(301, 101);
    if std::env::args().any(|a| a == "--child") {
        child(rounds);
        return;
    }
    let processes = pick(7, 3);
    header("Hot path: span enter+exit, park/unpark, poll hooks");
    println!(
        "{processes} processes × {rounds} rounds × {BATCH} operations per variant, variants \
         alternated within each round. Per process: the median over rounds; shown: the median \
         over processes, and for \"added\" the range over processes (code placement and the \
         machine's load move these numbers by a few ns from one process to the next)."
    );
    println!();
    let exe = std::env::current_exe().expect("own path");
    let mut collected = Collected::default();
    for _ in 0..processes {
        let mut command = std::process::Command::new(&exe);
        command.arg("--child");
        if quick() {
            command.arg("--quick");
        }
        let out = command.output().expect("run child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            panic!(
                "child failed: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for line in stdout.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            match fields[0] {
                "SPAN" => collected.add(
                    format!("SPAN\t{}\t{}", fields[1], fields[2]),
                    fields[3..].iter().map(|v| v.parse().unwrap()).collect(),
                ),
                "HOOK" | "PIECE" => collected.add(
                    format!("{}\t{}", fields[0], fields[1]),
                    vec![fields[2].parse().unwrap()],
                ),
                "NOTE" => collected.notes.push(fields[1].to_string()),
                _ => {}
            }
        }
    }
    println!("| thread | enter+exit | registry alone (ns) | registry + looplag (ns) | added (ns) | added, range over processes | ratio | registry + empty layer (ns) | looplag over the empty layer (ns) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for key in collected.order.iter().filter(|k| k.starts_with("SPAN")) {
        let mut parts = key.split('\t').skip(1);
        let (thread, kind) = (parts.next().unwrap(), parts.next().unwrap());
        let (registry, _, _) = collected.stat(key, 0);
        let (looplag, _, _) = collected.stat(key, 1);
        let (added, lo, hi) = collected.stat(key, 2);
        let (empty, _, _) = collected.stat(key, 3);
        let (over_empty, _, _) = collected.stat(key, 4);
        println!(
            "| {thread} | {kind} | {registry:.1} | {looplag:.1} | {added:+.1} | {lo:+.1} … {hi:+.1} | {:.2} | {empty:.1} | {over_empty:+.1} |",
            looplag / registry
        );
    }
    println!();
    let mut notes = collected.notes.clone();
    notes.sort();
    notes.dedup();
    for note in notes {
        println!("- {note}");
    }
    println!();
    println!("| hook | ns (median over processes) | range |");
    println!("|---|---:|---:|");
    for key in collected.order.iter().filter(|k| k.starts_with("HOOK")) {
        let (v, lo, hi) = collected.stat(key, 0);
        println!("| {} | {v:.1} | {lo:.1} … {hi:.1} |", &key[5..]);
    }
    println!();
    println!("What a poll boundary is made of (each piece measured alone in a loop):");
    println!();
    println!("| piece | ns (median over processes) |");
    println!("|---|---:|");
    for key in collected.order.iter().filter(|k| k.starts_with("PIECE")) {
        let (v, _, _) = collected.stat(key, 0);
        println!("| {} | {v:.1} |", &key[6..]);
    }
    footer();
}
