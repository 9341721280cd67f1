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
use opentelemetry::trace::{Span as _, SpanContext, SpanKind, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};

use crate::clock::{self, Anchor};
use crate::instance::Inner;
use crate::layer::{self, SpanAccess, SpanInfo};
use crate::probe::Probe;
use crate::ratelimit::LogLimiter;
use crate::slots::{Slot, FLAGGED};
use crate::telemetry as names;
use crate::{StallReport, StallState};

/// How long a hooked runtime may run without any worker registering before looplag warns.
const UNHOOKED_GRACE: Duration = Duration::from_secs(2);

/// The watchdog thread's main loop; returns when `stop` is set.
pub(crate) fn run(inner: Arc<Inner>, handle: tokio::runtime::Handle, stop: Arc<AtomicBool>) {
    let interval = inner.config.sample_interval;
    let mut watch = Watch::new(inner, handle);
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
        if ticked.is_err() && !tick_panicked {
            tick_panicked = true;
            tracing::error!(
                target: "looplag",
                "looplag's watchdog recovered from a panic; please report this bug"
            );
        }
    }
    let _ = panic::catch_unwind(AssertUnwindSafe(|| watch.finish()));
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
}

enum Source {
    /// A poll with known boundaries, flagged in its slot's activity word.
    Exact {
        slot: Arc<Slot>,
        flagged_word: u64,
        flagged_at: u64,
    },
    /// A worker whose tokio metrics froze while it was unparked, found without hooks.
    Estimated {
        worker: usize,
        slot: Option<Arc<Slot>>,
        activity: u64,
    },
}

struct Active {
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

struct Watch {
    inner: Arc<Inner>,
    handle: tokio::runtime::Handle,
    probe: Probe,
    multi_thread: bool,
    cursors: HashMap<u64, usize>,
    workers: Vec<WorkerTrack>,
    active: Vec<Active>,
    previous_tick: u64,
    started: Instant,
    warned_unhooked: bool,
    /// The stall log's rate limit (the callback and telemetry are not limited).
    logs: LogLimiter,
    /// The runtime has shut down: its workers exit, and a worker that exited looks like one
    /// stuck in an uninstrumented poll (unparked, metrics frozen), so estimation stops.
    shut_down: bool,
}

impl Watch {
    fn new(inner: Arc<Inner>, handle: tokio::runtime::Handle) -> Self {
        let multi_thread = matches!(
            handle.runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        let hooked = inner.hooked.load(Ordering::Relaxed);
        if !hooked {
            tracing::warn!(
                target: "looplag",
                runtime = %inner.config.runtime_name,
                "stall detection is off for runtime `{}`: LoopLag::hook_runtime was not called \
                 on its builder, so looplag cannot tell its workers from blocking threads; only \
                 tokio.eventloop.delay is exported",
                inner.config.runtime_name
            );
        }
        let logs = LogLimiter::new(inner.config.max_stall_logs_per_second);
        Watch {
            probe: Probe::new(inner.config.sample_interval),
            inner,
            handle,
            multi_thread,
            cursors: HashMap::new(),
            workers: Vec::new(),
            active: Vec::new(),
            previous_tick: clock::raw(),
            started: Instant::now(),
            warned_unhooked: !hooked,
            logs,
            shut_down: false,
        }
    }

    fn tick(&mut self) {
        let anchor = Anchor::now();
        let now = anchor.raw;
        let instruments = &self.inner.instruments;
        self.probe.tick(now, &self.handle, |seconds| {
            instruments.delay.record(seconds, &instruments.attributes)
        });
        self.shut_down = self.shut_down || self.probe.runtime_shut_down();
        let slots = self.inner.registry.live();
        let access = layer::shared().access();
        if let Some(access) = &access {
            self.track_polled_roots(&slots, access);
        }
        self.track_workers(&slots, now);
        self.check_active(now, access.as_ref());
        self.detect_exact(&slots, now, &anchor, access.as_ref());
        if !self.inner.registry.poll_hooks.load(Ordering::Relaxed)
            && self.multi_thread
            && !self.shut_down
        {
            self.detect_estimated(&slots, now, &anchor);
        }
        self.warn_if_unhooked(&slots);
        if let Some(suppressed) = self.logs.roll(Instant::now()) {
            self.log_suppressed(suppressed);
        }
        self.previous_tick = now;
    }

    /// Records on which worker each in-flight trace was last polled.
    fn track_polled_roots(&mut self, slots: &[Arc<Slot>], access: &SpanAccess) {
        self.cursors
            .retain(|thread, _| slots.iter().any(|slot| slot.thread_uid == *thread));
        for slot in slots {
            let cursor = self.cursors.entry(slot.thread_uid).or_insert(0);
            let mut previous = 0;
            slot.drain_poll_spans(cursor, |id| {
                if id == previous {
                    return;
                }
                previous = id;
                if let Some(root) = access.root_of(id) {
                    root.last_polled_on
                        .store(slot.thread_uid, Ordering::Relaxed);
                }
            });
        }
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
            let flagged = slot.flag(snapshot.word);
            let flagged_at = clock::raw();
            let info =
                access.and_then(|access| entered.iter().rev().find_map(|&id| access.span_info(id)));
            let source = Source::Exact {
                slot: Arc::clone(slot),
                flagged_word: snapshot.word | FLAGGED,
                flagged_at,
            };
            let task = slot.task();
            self.begin(source, snapshot.start(), info, task, now, anchor);
            if !flagged {
                // The poll returned between the snapshot and the flag: it lasted at least
                // the threshold and ended just now.
                if let Some(active) = self.active.pop() {
                    self.end(active, flagged_at, access);
                }
            }
        }
    }

    /// Stable builds, multi-thread runtime: a worker unparked, with frozen metrics and no
    /// instrumented poll, for the threshold, is stuck in an uninstrumented poll.
    fn detect_estimated(&mut self, slots: &[Arc<Slot>], now: u64, anchor: &Anchor) {
        let threshold = self.inner.config.stall_threshold;
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
            let slot = match candidates.as_slice() {
                [only] => Some(Arc::clone(only)),
                _ => None,
            };
            let source = Source::Estimated {
                worker: index,
                slot,
                activity: track.activity,
            };
            self.begin(source, track.activity_since, None, None, now, anchor);
        }
    }

    fn check_active(&mut self, now: u64, access: Option<&SpanAccess>) {
        let mut index = 0;
        while index < self.active.len() {
            let ended_at = match &self.active[index].source {
                Source::Exact {
                    slot,
                    flagged_word,
                    flagged_at,
                } => {
                    if slot.is_dead() {
                        Some(now)
                    } else {
                        slot.flagged_end(*flagged_word, *flagged_at)
                    }
                }
                Source::Estimated {
                    worker, activity, ..
                } => {
                    let track = self.workers.get(*worker).copied().unwrap_or_default();
                    (track.activity != *activity || track.metrics.0 % 2 == 1 || self.shut_down)
                        .then_some(now)
                }
            };
            match ended_at {
                Some(end) => {
                    let active = self.active.swap_remove(index);
                    self.end(active, end, access);
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
        let instruments = &self.inner.instruments;
        instruments.stalls.add(1, &instruments.attributes);

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
        let active = Active {
            source,
            start,
            start_time,
            info,
            span,
            span_context,
            reports: 1,
            next_report: elapsed.saturating_mul(2),
            task,
        };
        let report = self.report(&active, elapsed, StallState::InProgress);
        self.publish(&report, None);
        self.active.push(active);
    }

    fn end(&mut self, mut active: Active, end: u64, access: Option<&SpanAccess>) {
        let duration = clock::delta(active.start, end);
        let instruments = &self.inner.instruments;
        instruments
            .stall_duration
            .record(duration.as_secs_f64(), &instruments.attributes);

        let (victims, dropped) = match (access, active.slot()) {
            (Some(access), Some(slot)) if self.inner.config.max_victims > 0 => {
                let exclude = active
                    .info
                    .as_ref()
                    .and_then(|info| info.root.as_ref())
                    .map(|root| root.token);
                let (roots, dropped) = layer::shared().victims(
                    slot.thread_uid,
                    exclude,
                    self.inner.config.max_victims,
                );
                let start_time = active.start_time;
                let mut marked = 0usize;
                for root in &roots {
                    let Some(context) = access.root_context(root) else {
                        continue;
                    };
                    let span = context.span();
                    span.add_event_with_timestamp(
                        names::VICTIM_EVENT,
                        start_time,
                        vec![
                            KeyValue::new(names::VICTIM_DURATION, duration.as_secs_f64()),
                            KeyValue::new(
                                names::VICTIM_TRACE_ID,
                                active.span_context.trace_id().to_string(),
                            ),
                            KeyValue::new(
                                names::VICTIM_SPAN_ID,
                                active.span_context.span_id().to_string(),
                            ),
                        ],
                    );
                    span.add_link(active.span_context.clone(), Vec::new());
                    marked += 1;
                }
                (marked, dropped)
            }
            _ => (0, 0),
        };
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        active
            .span
            .set_attribute(KeyValue::new(names::VICTIMS, as_i64(victims)));
        if dropped > 0 {
            active
                .span
                .set_attribute(KeyValue::new(names::VICTIMS_DROPPED, as_i64(dropped)));
        }
        active.span.end_with_timestamp(active.start_time + duration);
        active.reports = active.reports.saturating_add(1);
        let mut report = self.report(&active, duration, StallState::Ended);
        report.victims = victims;
        report.victims_dropped = dropped;
        self.publish(&report, None);
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
        let access = layer::shared().access();
        while let Some(active) = self.active.pop() {
            self.end(active, anchor.raw, access.as_ref());
        }
        if let Some(suppressed) = self.logs.close() {
            self.log_suppressed(suppressed);
        }
    }
}
