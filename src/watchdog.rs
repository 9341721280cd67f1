//! The watchdog thread: a plain OS thread that scans the workers' slots every sample
//! interval, runs the delay probe, and turns stalls into telemetry.
//!
//! It never waits on the runtime, so it keeps working (and reporting) while every worker
//! is stuck.

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::global::BoxedSpan;
use opentelemetry::trace::{Span as _, SpanContext, SpanKind, Tracer as _};
use opentelemetry::{Context, KeyValue};

use crate::clock::{self, Anchor};
use crate::config::StackSupport;
use crate::diagnosis::{self, StallKind};
use crate::doze::IDLE_SAMPLE_INTERVALS;
use crate::instance::Inner;
use crate::layer::{self, SpanAccess, SpanInfo};
use crate::probe::{Collected, Probe};
use crate::ratelimit::LogLimiter;
use crate::report::{StackCapture, StackFrame};
use crate::slots::{Flag, PollEnd, Slot, FLAGGED};
use crate::stack::StackError;
use crate::symbolizer::Symbolizer;
use crate::telemetry as names;
use crate::victims::{self, Pending, PendingGuard};
use crate::{StallReport, StallState};

/// How long a hooked runtime may run without any worker registering before looplag warns.
const UNHOOKED_GRACE: Duration = Duration::from_secs(2);

/// How long the watchdog waits for a thread to answer [`crate::stack::in_runtime`]. The
/// handler runs within microseconds of delivery; a thread that does not answer in this time
/// (stopped, or in an uninterruptible wait) is taken as "cannot tell".
const RUNTIME_QUERY_TIMEOUT: Duration = Duration::from_millis(20);

/// Shortest wait between two checks of an undriven current-thread runtime (the wait is the
/// stall threshold, but not less): each check interrupts the thread.
const MIN_RECHECK: Duration = Duration::from_millis(20);

/// Most doublings of the recheck wait after runtime queries that timed out (64 thresholds).
const MAX_QUERY_BACKOFF: u32 = 6;

/// Asks `slot`'s thread whether it is inside a runtime's scheduler (`stack::in_runtime`):
/// the answer (an exited thread is outside), or `None` when it cannot tell. Counts the
/// timeouts in a row in `track` (any answer resets them).
fn ask_in_runtime(track: &mut WorkerTrack, slot: &Slot) -> Option<bool> {
    match crate::stack::in_runtime(&slot.stack_target, RUNTIME_QUERY_TIMEOUT) {
        Ok(inside) => {
            track.query_timeouts = 0;
            Some(inside)
        }
        Err(StackError::ThreadGone) => Some(false),
        Err(StackError::Timeout) => {
            track.query_timeouts = track.query_timeouts.saturating_add(1);
            None
        }
        Err(_) => None,
    }
}

/// The watchdog thread's main loop; returns when `stop` is set.
///
/// Ticks every sample interval on a fixed grid. After a tick that found the runtime idle
/// (every worker parked) it dozes instead, for `IDLE_SAMPLE_INTERVALS` intervals or until a
/// worker unparks (see `doze.rs`), then ticks at once.
pub(crate) fn run(inner: Arc<Inner>, handle: tokio::runtime::Handle, stop: Arc<AtomicBool>) {
    let interval = inner.config.sample_interval;
    let idle_sleep = interval.saturating_mul(IDLE_SAMPLE_INTERVALS);
    inner.doze.set_watchdog(Some(std::thread::current()));
    let mut watch = Watch::new(Arc::clone(&inner), handle);
    let mut next = Instant::now() + interval;
    let mut tick_panicked = false;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now < next {
            std::thread::park_timeout(next - now);
            continue;
        }
        next += interval;
        if next <= now {
            next = now + interval;
        }
        let ticked = panic::catch_unwind(AssertUnwindSafe(|| watch.tick()));
        let idle = match ticked {
            Ok(idle) => idle,
            Err(_) => {
                if !tick_panicked {
                    tick_panicked = true;
                    tracing::error!(
                        target: "looplag",
                        "looplag's watchdog recovered from a panic; please report this bug"
                    );
                }
                false
            }
        };
        if idle && inner.doze.begin(|| watch.all_parked()) {
            let dozed = doze(&inner, &stop, idle_sleep);
            watch.woke(dozed);
            next = Instant::now();
        } else {
            watch.spawn_probe();
        }
    }
    inner.doze.end();
    inner.doze.set_watchdog(None);
    let _ = panic::catch_unwind(AssertUnwindSafe(|| watch.finish()));
}

/// Sleeps until `idle_sleep` has passed, a worker unparks or `stop` is set; returns how long
/// it slept.
fn doze(inner: &Inner, stop: &AtomicBool, idle_sleep: Duration) -> Duration {
    let began = Instant::now();
    let until = began + idle_sleep;
    loop {
        let now = Instant::now();
        if now >= until || !inner.doze.dozing() || stop.load(Ordering::Acquire) {
            break;
        }
        std::thread::park_timeout(until - now);
    }
    inner.doze.end();
    began.elapsed()
}

/// Per tokio worker: when its published metrics last changed.
#[derive(Debug, Default, Clone, Copy)]
struct WorkerTrack {
    /// `(park_unpark_count, busy_duration_total)` as last read.
    metrics: (u64, Duration),
    /// Raw time of the tick before the one that saw `metrics` change: the change happened
    /// after this.
    changed_after: u64,
    /// Metrics plus the worker's slot words, for uninstrumented stalls.
    activity: u64,
    /// Raw time of the first tick that saw the current `activity`.
    activity_since: u64,
    /// How many ticks have read this worker's metrics (saturating).
    observed: u32,
    /// Current-thread runtimes on stable builds: raw time of the last check that found the
    /// driver thread outside `block_on` during the current `activity`; `None` while not
    /// asked.
    outside: Option<u64>,
    /// Runtime queries of this worker's threads that timed out in a row (the thread blocks
    /// the stack signal, or is stopped): each doubles the wait before the next query, so
    /// that a thread that never answers does not hold up every tick.
    query_timeouts: u32,
}

enum Source {
    /// A poll with known boundaries, flagged in its slot's activity word.
    Exact { slot: Arc<Slot>, flag: Flag },
    /// A worker whose tokio metrics froze while it was unparked, found without hooks.
    Estimated {
        worker: usize,
        slot: Option<Arc<Slot>>,
        activity: u64,
    },
}

struct Active {
    /// Watchdog-local id, to match the symbolized stack.
    id: u64,
    source: Source,
    start: u64,
    /// Wall-clock time of `start`; the end time is derived from it, so the span's duration
    /// is exactly the measured one.
    start_time: SystemTime,
    info: Option<SpanInfo>,
    span: BoxedSpan,
    span_context: SpanContext,
    reports: u32,
    next_report: Duration,
    task: Option<(u64, &'static std::panic::Location<'static>)>,
    diagnosis: Diagnosis,
    /// Exact stalls: pending for the layer until the watchdog marks the victims.
    pending: Option<PendingGuard>,
}

/// What the watchdog learned about the blocked thread's activity.
#[derive(Debug, Clone)]
struct Diagnosis {
    /// CPU time and raw clock at the first tick that saw this poll busy.
    window: Option<(Duration, u64)>,
    /// Time spent waiting for a CPU (run queue) and raw clock, at detection.
    run_delay: Option<(Duration, u64)>,
    kind: Option<StallKind>,
    cpu_time: Option<Duration>,
    syscall: Option<&'static str>,
    stack: StackCapture,
    /// The stack was captured and is being symbolized (`stack` is `Symbolizing`).
    stack_pending: bool,
}

impl Active {
    fn slot(&self) -> Option<&Arc<Slot>> {
        match &self.source {
            Source::Exact { slot, .. } => Some(slot),
            Source::Estimated { slot, .. } => slot.as_ref(),
        }
    }
    fn worker(&self) -> Option<usize> {
        match &self.source {
            Source::Exact { slot, .. } => slot.worker_index,
            Source::Estimated { worker, .. } => Some(*worker),
        }
    }
    fn exact(&self) -> bool {
        matches!(self.source, Source::Exact { .. })
    }
}

/// A stall that ended, waiting for its stack to be symbolized and its victims marked.
struct Ended {
    active: Active,
    duration: Duration,
    since: u64,
}

impl Ended {
    /// Whether every victim of the stall has been marked, at raw time `now`.
    fn victims_settled(&self, now: u64) -> bool {
        self.active
            .pending
            .as_ref()
            .is_none_or(|pending| pending.settled(self.since, now))
    }
}

struct Watch {
    inner: Arc<Inner>,
    handle: tokio::runtime::Handle,
    probe: Probe,
    /// How long the watchdog dozed since it last spawned a probe.
    dozed: Duration,
    multi_thread: bool,
    workers: Vec<WorkerTrack>,
    active: Vec<Active>,
    previous_tick: u64,
    started: Instant,
    warned_unhooked: bool,
    /// Per slot (by thread uid): the activity word last seen, and once a second tick has
    /// seen the same word, the thread's CPU time and the raw time then.
    cpu_seen: HashMap<u64, (u64, Option<(Duration, u64)>)>,
    stacks: StackBudget,
    finishing: Vec<Ended>,
    symbolizer: Option<Symbolizer>,
    next_stall_id: u64,
    /// The stall log's rate limit (the callback and telemetry are not limited).
    logs: LogLimiter,
    /// The runtime has shut down: its workers exit, and a worker that exited looks like one
    /// stuck in an uninstrumented poll (unparked, metrics frozen), so estimation stops.
    shut_down: bool,
}

/// Token bucket for stack captures: `per_minute` tokens, refilled continuously.
#[derive(Debug)]
struct StackBudget {
    per_minute: u32,
    tokens: f64,
    refilled_at: u64,
    suppressed: u64,
}

impl StackBudget {
    fn new(per_minute: u32, now: u64) -> Self {
        StackBudget {
            per_minute,
            tokens: f64::from(per_minute),
            refilled_at: now,
            suppressed: 0,
        }
    }

    /// Takes a token if one is left; otherwise counts a suppressed capture.
    fn take(&mut self, now: u64) -> bool {
        let capacity = f64::from(self.per_minute);
        let elapsed = clock::delta(self.refilled_at, now).as_secs_f64();
        self.tokens = (self.tokens + elapsed * capacity / 60.0).min(capacity);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            false
        }
    }
}

impl Watch {
    fn new(inner: Arc<Inner>, handle: tokio::runtime::Handle) -> Self {
        let multi_thread = matches!(
            handle.runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        let hooked = inner.hooked.load(Ordering::Relaxed);
        if !hooked {
            if multi_thread {
                tracing::warn!(
                    target: "looplag",
                    runtime = %inner.config.runtime_name,
                    "exact stall detection is off for runtime `{}`: LoopLag::hook_runtime was \
                     not called on its builder, so looplag cannot tell its workers from blocking \
                     threads; stalls are estimated from tokio's worker metrics instead, without \
                     the culprit's span or thread",
                    inner.config.runtime_name
                );
            } else {
                tracing::warn!(
                    target: "looplag",
                    runtime = %inner.config.runtime_name,
                    "stall detection is off for runtime `{}`: LoopLag::hook_runtime was not \
                     called on its builder; only tokio.eventloop.delay is exported",
                    inner.config.runtime_name
                );
            }
        }
        let max_stacks = inner.config.max_stacks_per_minute;
        let logs = LogLimiter::new(inner.config.max_stall_logs_per_second);
        Watch {
            probe: Probe::new(inner.config.sample_interval),
            dozed: Duration::ZERO,
            inner,
            handle,
            multi_thread,
            workers: Vec::new(),
            active: Vec::new(),
            previous_tick: clock::raw(),
            started: Instant::now(),
            warned_unhooked: !hooked,
            cpu_seen: HashMap::new(),
            stacks: StackBudget::new(max_stacks, clock::raw()),
            finishing: Vec::new(),
            // Started at the first captured stack: no thread while nothing stalls.
            symbolizer: None,
            next_stall_id: 1,
            logs,
            shut_down: false,
        }
    }

    /// One tick. Returns whether the runtime looks idle enough to doze: every worker
    /// parked, the probe's sample just taken, and no stall being tracked or finished.
    fn tick(&mut self) -> bool {
        let anchor = Anchor::now();
        let now = anchor.raw;
        let instruments = &self.inner.instruments;
        let collected = self.probe.collect(now, |seconds| {
            instruments.delay.record(seconds, &instruments.attributes)
        });
        self.shut_down = self.shut_down || self.probe.runtime_shut_down();
        let slots = self.inner.registry.live();
        let access = layer::shared().access();
        self.track_workers(&slots, now);
        self.track_cpu(&slots, now);
        self.check_active(now);
        self.detect_exact(&slots, now, &anchor, access.as_ref());
        if !self.inner.registry.poll_hooks.load(Ordering::Relaxed)
            && (self.multi_thread || self.inner.config.stacks == StackSupport::Enabled)
            && !self.shut_down
        {
            self.detect_estimated(&slots, now, &anchor);
        }
        self.collect_stacks();
        self.finish_waiting(now, false);
        self.warn_if_unhooked(&slots);
        if let Some(suppressed) = self.logs.roll(Instant::now()) {
            self.log_suppressed(suppressed);
        }
        self.previous_tick = now;
        collected == Collected::Sample
            && !self.shut_down
            && self.active.is_empty()
            && self.finishing.is_empty()
            && self.covers_all_workers(&slots)
            && slots.iter().all(|slot| slot.snapshot().parked)
    }

    /// Every worker of the runtime has a registered slot (on a runtime that was not hooked,
    /// none has: it never dozes).
    fn covers_all_workers(&self, slots: &[Arc<Slot>]) -> bool {
        !slots.is_empty()
            && (0..self.workers.len())
                .all(|index| slots.iter().any(|slot| slot.worker_index == Some(index)))
    }

    /// Every registered slot is parked, read after announcing a doze (see `doze.rs`).
    fn all_parked(&self) -> bool {
        let slots = self.inner.registry.live();
        self.covers_all_workers(&slots) && slots.iter().all(|slot| slot.snapshot().parked)
    }

    /// Spawns the next probe, counting it for the intervals the watchdog dozed through.
    fn spawn_probe(&mut self) {
        let interval = self.inner.config.sample_interval.as_secs_f64();
        let dozed = std::mem::take(&mut self.dozed).as_secs_f64();
        let weight = 1.0 + (dozed / interval).round();
        self.probe
            .spawn(&self.handle, weight.min(f64::from(u32::MAX)) as u32);
    }

    /// The watchdog woke from a doze of `dozed`.
    fn woke(&mut self, dozed: Duration) {
        self.dozed = self.dozed.saturating_add(dozed);
    }

    /// Reads tokio's per-worker metrics and notes when each last changed.
    fn track_workers(&mut self, slots: &[Arc<Slot>], now: u64) {
        let metrics = self.handle.metrics();
        let count = metrics.num_workers();
        self.workers.resize(
            count,
            WorkerTrack {
                activity_since: now,
                ..WorkerTrack::default()
            },
        );
        for (index, track) in self.workers.iter_mut().enumerate() {
            let current = (
                metrics.worker_park_unpark_count(index),
                metrics.worker_total_busy_duration(index),
            );
            if track.observed == 0 {
                // First sight: when these values were published is unknown. Recording the
                // watchdog's start as their change made a poll that began before the first
                // tick look moved away (never frozen), so a stall in progress when the
                // watchdog started was never detected. `worker_frozen_since` waits for a
                // second reading instead.
                track.metrics = current;
                track.changed_after = 0;
            } else if current != track.metrics {
                track.metrics = current;
                track.changed_after = self.previous_tick;
            }
            track.observed = track.observed.saturating_add(1);
            let mut activity = current.0 ^ (current.1.as_nanos() as u64).rotate_left(17);
            for slot in slots.iter().filter(|slot| slot.worker_index == Some(index)) {
                activity = activity.rotate_left(5) ^ (slot.word() & !FLAGGED);
            }
            if activity != track.activity {
                track.activity = activity;
                track.activity_since = now;
                track.outside = None;
            }
        }
    }

    /// Notes a running thread's CPU time when a second tick in a row sees the same activity
    /// (a poll that has lasted at least part of an interval: a possible stall), so a stall's
    /// CPU share can be measured from then on. Reading another thread's CPU clock is a system
    /// call with a thread lookup in the kernel; under load every tick sees a new poll on
    /// every worker, and reading at first sight made those reads almost half of the
    /// watchdog's CPU time. Nothing for parked threads.
    fn track_cpu(&mut self, slots: &[Arc<Slot>], now: u64) {
        self.cpu_seen
            .retain(|thread, _| slots.iter().any(|slot| slot.thread_uid == *thread));
        for slot in slots {
            let snapshot = slot.snapshot();
            if snapshot.parked {
                continue;
            }
            let word = snapshot.word & !FLAGGED;
            match self.cpu_seen.get_mut(&slot.thread_uid) {
                Some((seen, window)) if *seen == word => {
                    if window.is_none() {
                        *window = slot.cpu_time().map(|cpu| (cpu, now));
                    }
                }
                _ => {
                    self.cpu_seen.insert(slot.thread_uid, (word, None));
                }
            }
        }
    }

    /// Stack, CPU share and system call of a thread just found stalled.
    fn diagnose(&mut self, slot: Option<&Arc<Slot>>, word: u64, now: u64) -> Diagnosis {
        let Some(slot) = slot else {
            return Diagnosis {
                window: None,
                run_delay: None,
                kind: None,
                cpu_time: None,
                syscall: None,
                stack: StackCapture::UnknownThread,
                stack_pending: false,
            };
        };
        let tid = slot.stack_target.tid();
        // Everything about the thread's state first: the stack signal interrupts its system
        // call and briefly runs it.
        let syscall = match diagnosis::thread_state(tid) {
            Some('R') | None => None,
            Some(_) => diagnosis::blocked_syscall(tid),
        };
        let cpu_now = slot.cpu_time();
        let run_delay = diagnosis::run_delay(tid).map(|delay| (delay, clock::raw()));
        let window = self
            .cpu_seen
            .get(&slot.thread_uid)
            .filter(|(seen, _)| *seen == word & !FLAGGED)
            .and_then(|&(_, window)| window);
        let (kind, cpu_time) = match (window, cpu_now) {
            (Some((cpu0, at)), Some(cpu)) if clock::delta(at, now) > Duration::ZERO => {
                let wall = clock::delta(at, now);
                let used = cpu.saturating_sub(cpu0).min(wall);
                (Some(diagnosis::classify(used, wall)), Some(used))
            }
            _ => (None, None),
        };
        let stack = self.capture_stack(slot, now);
        Diagnosis {
            window,
            run_delay,
            kind,
            cpu_time,
            syscall,
            stack_pending: stack == StackCapture::Symbolizing,
            stack,
        }
    }

    /// Takes the stack (microseconds) and queues it for the symbolizer thread, so that
    /// reading debug info never delays a report or the next detection.
    fn capture_stack(&mut self, slot: &Slot, now: u64) -> StackCapture {
        const CAPTURE_TIMEOUT: Duration = Duration::from_millis(100);
        match self.inner.config.stacks {
            StackSupport::Disabled => return StackCapture::Disabled,
            StackSupport::Unsupported => return StackCapture::Unsupported,
            StackSupport::Enabled => {}
        }
        if !self.stacks.take(now) {
            let suppressed = self.stacks.suppressed;
            return StackCapture::RateLimited { suppressed };
        }
        match crate::stack::capture(&slot.stack_target, CAPTURE_TIMEOUT) {
            Ok(raw) => {
                // Once its caches are warm the symbolizer answers within a millisecond or
                // two; wait that long so the first report usually names the culprit.
                const FIRST_REPORT_WAIT: Duration = Duration::from_millis(3);
                let id = self.next_stall_id;
                let symbolizer = self.symbolizer.get_or_insert_with(Symbolizer::start);
                match symbolizer.submit(id, raw) {
                    Ok(()) => symbolizer
                        .wait(id, FIRST_REPORT_WAIT)
                        .unwrap_or(StackCapture::Symbolizing),
                    Err(why) => why,
                }
            }
            Err(err) => StackCapture::Failed(err.to_string()),
        }
    }

    /// Attaches the stacks the symbolizer finished to their stalls.
    fn collect_stacks(&mut self) {
        let Some(symbolizer) = &mut self.symbolizer else {
            return;
        };
        for (id, stack) in symbolizer.ready() {
            let diagnosis = self
                .active
                .iter_mut()
                .find(|active| active.id == id)
                .map(|active| &mut active.diagnosis)
                .or_else(|| {
                    self.finishing
                        .iter_mut()
                        .find(|ended| ended.active.id == id)
                        .map(|ended| &mut ended.active.diagnosis)
                });
            if let Some(diagnosis) = diagnosis {
                diagnosis.stack = stack;
                diagnosis.stack_pending = false;
            }
        }
    }

    /// On a multi-thread runtime, a worker stuck in a poll publishes no metrics. If its
    /// metrics changed after the poll started, another thread runs that worker now (the
    /// thread called `block_in_place`) and the thread is not blocking the runtime.
    fn worker_frozen_since(&self, slot: &Slot, start: u64) -> bool {
        if !self.multi_thread {
            return true;
        }
        match slot.worker_index.and_then(|index| self.workers.get(index)) {
            // Read twice, unparked (tokio publishes the park count as it parks and right
            // after it unparks: odd means the worker index is parked, so the thread stuck
            // in this poll is not running it, as after `block_in_place`), and unchanged
            // since before the poll began.
            Some(track) => {
                track.observed >= 2 && track.metrics.0 % 2 == 0 && track.changed_after < start
            }
            None => true,
        }
    }

    fn detect_exact(
        &mut self,
        slots: &[Arc<Slot>],
        now: u64,
        anchor: &Anchor,
        access: Option<&SpanAccess>,
    ) {
        let threshold = self.inner.config.stall_threshold;
        for slot in slots {
            if self
                .active
                .iter()
                .any(|active| active.slot().is_some_and(|s| Arc::ptr_eq(s, slot)))
            {
                continue;
            }
            let snapshot = slot.snapshot();
            if !snapshot.busy()
                || snapshot.flagged()
                || snapshot.parked
                || clock::delta(snapshot.start(), now) < threshold
                || !self.worker_frozen_since(slot, snapshot.start())
            {
                continue;
            }
            let entered: Vec<u64> = slot.entered_spans(snapshot.depth).collect();
            victims::prepare(slot, snapshot.word | FLAGGED, self.inner.config.max_victims);
            let flagged = slot.flag(snapshot.word);
            let flag = Flag {
                word: snapshot.word | FLAGGED,
                at: clock::raw(),
            };
            let info =
                access.and_then(|access| entered.iter().rev().find_map(|&id| access.span_info(id)));
            let source = Source::Exact {
                slot: Arc::clone(slot),
                flag,
            };
            let task = slot.task();
            self.begin(source, snapshot.start(), info, task, now, anchor);
            if !flagged {
                // The poll returned between the snapshot and the flag: it lasted at least
                // the threshold and ended just now.
                if let Some(active) = self.active.pop() {
                    let end = PollEnd {
                        at: flag.at,
                        cpu: None,
                    };
                    self.end(active, end);
                }
            }
        }
    }

    /// Stable builds: a worker unparked, with frozen metrics and no instrumented poll, for
    /// the threshold, is stuck in an uninstrumented poll.
    ///
    /// On a current-thread runtime the same frozen state also describes a runtime nobody
    /// drives (`block_on` returned, the thread does other work), so the thread is asked with
    /// a signal whether it is inside the runtime's scheduler (`stack::in_runtime`) before
    /// anything is reported. While it is not, it is asked again every threshold (at least
    /// [`MIN_RECHECK`]): a `block_on` entered again that blocks before it first parks
    /// changes nothing tokio publishes, so only such a check finds it, up to a threshold
    /// late, with its start known only to be after the last check that found the thread
    /// outside.
    fn detect_estimated(&mut self, slots: &[Arc<Slot>], now: u64, anchor: &Anchor) {
        // `activity_since` is the first tick that saw the worker's last activity, up to an
        // interval after it. Ticks land on a fixed grid, give or take the scheduler's jitter:
        // without the half-interval allowance, a tick that lands a little early next to one
        // that landed a little late postponed the detection by a whole interval.
        let threshold = self
            .inner
            .config
            .stall_threshold
            .saturating_sub(self.inner.config.sample_interval / 2);
        for index in 0..self.workers.len() {
            let track = self.workers[index];
            let active_parked = track.metrics.0 % 2 == 1;
            if active_parked
                || clock::delta(track.activity_since, now) < threshold
                || self
                    .active
                    .iter()
                    .any(|active| active.worker() == Some(index))
            {
                continue;
            }
            let candidates: Vec<&Arc<Slot>> = slots
                .iter()
                .filter(|slot| slot.worker_index == Some(index))
                .collect();
            if candidates
                .iter()
                .any(|slot| slot.snapshot().busy() || slot.snapshot().parked)
            {
                // Inside a span (the exact path owns it) or parked (not stuck).
                continue;
            }
            let (slot, start) = if self.multi_thread {
                let slot = match candidates.as_slice() {
                    [only] => Some(Arc::clone(only)),
                    _ => None,
                };
                (slot, track.activity_since)
            } else {
                let recheck = self
                    .inner
                    .config
                    .stall_threshold
                    .max(MIN_RECHECK)
                    .saturating_mul(1 << track.query_timeouts.min(MAX_QUERY_BACKOFF));
                if track
                    .outside
                    .is_some_and(|checked| clock::delta(checked, now) < recheck)
                {
                    continue;
                }
                let asked = &mut self.workers[index];
                let driver = candidates
                    .iter()
                    .find(|slot| ask_in_runtime(asked, slot) == Some(true));
                let Some(driver) = driver else {
                    self.workers[index].outside = Some(now);
                    continue;
                };
                // A runtime found undriven earlier was entered again after that check.
                let start = track.outside.map_or(track.activity_since, |checked| {
                    track.activity_since.max(checked)
                });
                (Some(Arc::clone(driver)), start)
            };
            let source = Source::Estimated {
                worker: index,
                slot,
                activity: track.activity,
            };
            self.begin(source, start, None, None, now, anchor);
        }
    }

    fn check_active(&mut self, now: u64) {
        let mut index = 0;
        while index < self.active.len() {
            let ended_now = || PollEnd { at: now, cpu: None };
            let ended = match &self.active[index].source {
                Source::Exact { slot, flag } => {
                    if slot.is_dead() {
                        Some(ended_now())
                    } else {
                        slot.flagged_end(flag)
                    }
                }
                Source::Estimated {
                    worker,
                    activity,
                    slot,
                } => {
                    let track = self.workers.get(*worker).copied().unwrap_or_default();
                    let moved =
                        track.activity != *activity || track.metrics.0 % 2 == 1 || self.shut_down;
                    // Current-thread: `block_on` may return right after the blocking poll,
                    // leaving tokio's metrics as frozen as during the stall. A thread that
                    // did not answer a query before is not asked again every tick.
                    let query = (!moved && !self.multi_thread && track.query_timeouts == 0)
                        .then(|| slot.clone())
                        .flatten();
                    let left_runtime = match (query, self.workers.get_mut(*worker)) {
                        (Some(slot), Some(asked)) => ask_in_runtime(asked, &slot) == Some(false),
                        _ => false,
                    };
                    (moved || left_runtime).then(ended_now)
                }
            };
            match ended {
                Some(end) => {
                    let active = self.active.swap_remove(index);
                    self.end(active, end);
                }
                None => {
                    let active = &mut self.active[index];
                    let elapsed = clock::delta(active.start, now);
                    if elapsed >= active.next_report {
                        active.reports = active.reports.saturating_add(1);
                        active.next_report = elapsed.saturating_mul(2);
                        let report =
                            self.report(&self.active[index], elapsed, StallState::InProgress);
                        self.publish(&report, None);
                    }
                    index += 1;
                }
            }
        }
    }

    fn begin(
        &mut self,
        source: Source,
        start: u64,
        info: Option<SpanInfo>,
        task: Option<(u64, &'static std::panic::Location<'static>)>,
        now: u64,
        anchor: &Anchor,
    ) {
        let (diagnosed_slot, word) = match &source {
            Source::Exact { slot, flag } => (Some(Arc::clone(slot)), flag.word),
            Source::Estimated { slot, .. } => (slot.clone(), slot.as_ref().map_or(0, |s| s.word())),
        };
        let diagnosis = self.diagnose(diagnosed_slot.as_ref(), word, now);
        let instruments = &self.inner.instruments;
        instruments
            .stalls
            .add(1, &self.metric_attributes(diagnosis.kind));

        let mut attributes = vec![
            KeyValue::new(names::RUNTIME_NAME, self.inner.config.runtime_name.clone()),
            KeyValue::new(names::STALL_EXACT, matches!(source, Source::Exact { .. })),
        ];
        let slot = match &source {
            Source::Exact { slot, .. } => Some(slot),
            Source::Estimated { slot, .. } => slot.as_ref(),
        };
        if let Some(slot) = slot {
            attributes.push(KeyValue::new(names::THREAD_ID, slot.os_tid));
            if !slot.thread_name.is_empty() {
                attributes.push(KeyValue::new(names::THREAD_NAME, slot.thread_name.clone()));
            }
        }
        let worker = match &source {
            Source::Exact { slot, .. } => slot.worker_index,
            Source::Estimated { worker, .. } => Some(*worker),
        };
        if let Some(worker) = worker.and_then(|w| i64::try_from(w).ok()) {
            attributes.push(KeyValue::new(names::WORKER_INDEX, worker));
        }
        if let Some((id, location)) = task {
            if let Ok(id) = i64::try_from(id) {
                attributes.push(KeyValue::new(names::TASK_ID, id));
            }
            attributes.push(KeyValue::new(names::CODE_FILE_PATH, location.file()));
            attributes.push(KeyValue::new(
                names::CODE_LINE_NUMBER,
                i64::from(location.line()),
            ));
        }
        if let Some(syscall) = diagnosis.syscall {
            attributes.push(KeyValue::new(names::STALL_SYSCALL, syscall));
        }
        match &diagnosis.stack {
            StackCapture::Captured(frames) => {
                attributes.push(KeyValue::new(names::CODE_STACKTRACE, format_stack(frames)))
            }
            other => attributes.push(KeyValue::new(names::STACK_STATUS, other.status())),
        }
        if let Some(info) = info.as_ref().filter(|info| info.context.is_none()) {
            attributes.extend(victims::orphan_attributes(info.name));
        }
        let parent = info
            .as_ref()
            .and_then(|info| info.context.clone())
            .unwrap_or_default();
        let tracer = &self.inner.tracer;
        let builder = tracer
            .span_builder(names::STALL_SPAN)
            .with_kind(SpanKind::Internal)
            .with_start_time(anchor.system_time(start))
            .with_attributes(attributes);
        let start_time = anchor.system_time(start);
        let span = tracer.build_with_context(builder, &parent);
        let span_context = span.span_context().clone();
        let elapsed = clock::delta(start, now);
        let pending = match &source {
            Source::Exact { slot, flag } => PendingGuard::start(
                slot,
                flag.word,
                Pending {
                    start,
                    start_time,
                    stall: span_context.clone(),
                    exclude: info.as_ref().and_then(|info| info.root),
                },
                layer::shared().access().as_ref(),
            ),
            _ => None,
        };
        let active = Active {
            id: self.next_stall_id,
            source,
            start,
            start_time,
            info,
            span,
            span_context,
            reports: 1,
            next_report: elapsed.saturating_mul(2),
            task,
            diagnosis,
            pending,
        };
        let report = self.report(&active, elapsed, StallState::InProgress);
        self.publish(&report, None);
        self.active.push(active);
        self.next_stall_id = self.next_stall_id.wrapping_add(1);
    }

    fn end(&mut self, mut active: Active, end: PollEnd) {
        let PollEnd {
            at: end,
            cpu: end_cpu,
        } = end;
        let duration = clock::delta(active.start, end);
        if let Some((cpu0, at)) = active.diagnosis.window {
            let cpu_end = end_cpu.or_else(|| active.slot().and_then(|slot| slot.cpu_time()));
            let wall = clock::delta(at, end);
            if let Some(cpu_end) = cpu_end.filter(|_| wall > Duration::ZERO) {
                // The share of the observed part of the stall that was on the CPU, applied to
                // the whole stall.
                let used = cpu_end.saturating_sub(cpu0).min(wall);
                // Time spent runnable but waiting for a CPU counts as CPU-bound: on a busy
                // machine a spinning thread is not always on a core. Only the wait before
                // the stall's end counts: the thread may have queued for a CPU again between
                // the end and now (up to `now - end`), running the next polls, which is not
                // this stall's; counting it made a sleeping thread look `mixed` on a loaded
                // machine.
                let waiting_share = active.diagnosis.run_delay.and_then(|(delay0, at0)| {
                    let tid = active.slot()?.stack_target.tid();
                    let now = clock::raw();
                    let delay = diagnosis::run_delay(tid)?
                        .saturating_sub(delay0)
                        .saturating_sub(clock::delta(end, now));
                    let span = clock::delta(at0, end);
                    (span > Duration::ZERO).then(|| delay.as_secs_f64() / span.as_secs_f64())
                });
                let share = (used.as_secs_f64() / wall.as_secs_f64()).clamp(0.0, 1.0);
                let busy_share = (share + waiting_share.unwrap_or(0.0)).clamp(0.0, 1.0);
                let cpu_time = duration.mul_f64(share);
                active.diagnosis.cpu_time = Some(cpu_time);
                active.diagnosis.kind =
                    Some(diagnosis::classify(duration.mul_f64(busy_share), duration));
            }
        }
        if let Some(kind) = active.diagnosis.kind {
            active
                .span
                .set_attribute(KeyValue::new(names::STALL_KIND, kind.as_str()));
        }
        if let Some(cpu_time) = active.diagnosis.cpu_time {
            active
                .span
                .set_attribute(KeyValue::new(names::STALL_CPU_TIME, cpu_time.as_secs_f64()));
        }
        let attributes = self.metric_attributes(active.diagnosis.kind);
        self.inner
            .instruments
            .stall_duration
            .record(duration.as_secs_f64(), &attributes);

        let ended = Ended {
            active,
            duration,
            since: clock::raw(),
        };
        if ended.active.diagnosis.stack_pending || !ended.victims_settled(ended.since) {
            // Everything time-critical is done (metrics); the span and the final report wait
            // for the symbols and for the victims (marked on the worker as it runs the
            // stall's backlog, see `victims`), a moment at most, so that a stall right after
            // start-up still gets its stack without making the watchdog miss the next stalls.
            self.finishing.push(ended);
        } else {
            self.finish_ended(ended);
        }
    }

    /// Symbolizes the stack if needed, ends the stall span and publishes the final report.
    fn finish_ended(&mut self, mut ended: Ended) {
        let active = &mut ended.active;
        let (victims, dropped) = active.pending.take().map_or((0, 0), PendingGuard::finish);
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        active
            .span
            .set_attribute(KeyValue::new(names::VICTIMS, as_i64(victims)));
        if dropped > 0 {
            active
                .span
                .set_attribute(KeyValue::new(names::VICTIMS_DROPPED, as_i64(dropped)));
        }
        if active.diagnosis.stack_pending {
            active.diagnosis.stack =
                StackCapture::Failed("symbolizing the stack took too long".to_string());
        }
        match &active.diagnosis.stack {
            StackCapture::Captured(frames) => active
                .span
                .set_attribute(KeyValue::new(names::CODE_STACKTRACE, format_stack(frames))),
            other => active
                .span
                .set_attribute(KeyValue::new(names::STACK_STATUS, other.status())),
        }
        active
            .span
            .end_with_timestamp(active.start_time + ended.duration);
        active.reports = active.reports.saturating_add(1);
        let mut report = self.report(active, ended.duration, StallState::Ended);
        report.victims = victims;
        report.victims_dropped = dropped;
        self.publish(&report, None);
    }

    /// Finishes ended stalls that waited for the symbols, once they are loaded (or after
    /// `SYMBOLS_WAIT`, or when `force`d at shutdown).
    fn finish_waiting(&mut self, now: u64, force: bool) {
        const SYMBOLS_WAIT: Duration = Duration::from_secs(10);
        if self.finishing.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.finishing);
        for ended in waiting {
            if force
                || (!ended.active.diagnosis.stack_pending && ended.victims_settled(now))
                || clock::delta(ended.since, now) >= SYMBOLS_WAIT
            {
                self.finish_ended(ended);
            } else {
                self.finishing.push(ended);
            }
        }
    }

    /// `tokio.runtime.name`, plus `tokio.eventloop.stall.kind` when known.
    fn metric_attributes(&self, kind: Option<StallKind>) -> Vec<KeyValue> {
        let mut attributes = self.inner.instruments.attributes.to_vec();
        if let Some(kind) = kind {
            attributes.push(KeyValue::new(names::STALL_KIND, kind.as_str()));
        }
        attributes
    }

    fn report(&self, active: &Active, duration: Duration, state: StallState) -> StallReport {
        let slot = active.slot();
        let valid = active.span_context.is_valid();
        StallReport {
            runtime_name: self.inner.config.runtime_name.clone(),
            state,
            duration,
            started_at: active.start_time,
            exact: active.exact(),
            report_number: active.reports,
            thread_id: slot.map(|slot| slot.os_tid),
            thread_name: slot
                .filter(|slot| !slot.thread_name.is_empty())
                .map(|slot| slot.thread_name.clone()),
            worker_index: active.worker(),
            span_name: active.info.as_ref().map(|info| info.name),
            trace_id: valid.then(|| active.span_context.trace_id()),
            span_id: valid.then(|| active.span_context.span_id()),
            task_id: active.task.map(|(id, _)| id),
            spawn_location: active.task.map(|(_, location)| location),
            kind: active.diagnosis.kind,
            cpu_time: active.diagnosis.cpu_time,
            syscall: active.diagnosis.syscall,
            stack: active.diagnosis.stack.clone(),
            victims: 0,
            victims_dropped: 0,
        }
    }

    /// Logs the report (within the log's rate limit) and hands it to the callback (always).
    fn publish(&mut self, report: &StallReport, _context: Option<&Context>) {
        let now = Instant::now();
        if let Some(suppressed) = self.logs.roll(now) {
            self.log_suppressed(suppressed);
        }
        if self.logs.admit(now) {
            match report.state {
                StallState::InProgress => tracing::warn!(
                    target: "looplag",
                    runtime = %report.runtime_name,
                    duration_ms = report.duration.as_secs_f64() * 1e3,
                    "stall in progress: {report}"
                ),
                StallState::Ended => tracing::warn!(
                    target: "looplag",
                    runtime = %report.runtime_name,
                    duration_ms = report.duration.as_secs_f64() * 1e3,
                    "stall ended: {report}"
                ),
            }
        }
        if let Some(callback) = &self.inner.on_stall {
            if panic::catch_unwind(AssertUnwindSafe(|| callback(report))).is_err() {
                tracing::error!(target: "looplag", "the on_stall callback panicked");
            }
        }
    }

    /// The summary line for stall log lines over the rate limit.
    fn log_suppressed(&self, suppressed: u64) {
        tracing::warn!(
            target: "looplag",
            runtime = %self.inner.config.runtime_name,
            suppressed,
            "{suppressed} stall reports suppressed in the last second (max_stall_logs_per_second \
             is {}); metrics, spans and the on_stall callback still got every one",
            self.inner.config.max_stall_logs_per_second
        );
    }

    fn warn_if_unhooked(&mut self, slots: &[Arc<Slot>]) {
        if self.warned_unhooked || !slots.is_empty() || self.started.elapsed() < UNHOOKED_GRACE {
            return;
        }
        self.warned_unhooked = true;
        tracing::warn!(
            target: "looplag",
            runtime = %self.inner.config.runtime_name,
            "stall detection is off for runtime `{}`: none of its worker threads has run \
             looplag's park hooks; call LoopLag::hook_runtime on the builder of the runtime \
             passed to LoopLag::start",
            self.inner.config.runtime_name
        );
    }

    /// The watchdog is stopping: close every open stall at the current time.
    fn finish(&mut self) {
        let anchor = Anchor::now();
        while let Some(active) = self.active.pop() {
            let end = PollEnd {
                at: anchor.raw,
                cpu: None,
            };
            self.end(active, end);
        }
        // Give pending stacks a moment to arrive before ending their spans without them.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.finishing.is_empty() && Instant::now() < deadline {
            self.collect_stacks();
            self.finish_waiting(clock::raw(), false);
            std::thread::sleep(Duration::from_millis(5));
        }
        self.finish_waiting(anchor.raw, true);
        if let Some(suppressed) = self.logs.close() {
            self.log_suppressed(suppressed);
        }
    }
}

/// The `code.stacktrace` value: one frame per line, innermost first.
fn format_stack(frames: &[StackFrame]) -> String {
    let frames: Vec<crate::stack::Frame> = frames
        .iter()
        .map(|frame| crate::stack::Frame {
            function: frame.function.clone(),
            file: frame.file.clone(),
            line: frame.line,
            addr: 0,
        })
        .collect();
    crate::stack::format_stacktrace(&frames)
}
