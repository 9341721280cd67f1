//! One stall's life on the watchdog: begin (counter, stall span, diagnosis, stack request,
//! first report, all at once), the reports each time its duration doubles (with the stack
//! once it has arrived), and the end (kind, victims), then, once the stack and its symbols
//! are there (they may still be on their way at the end), the duration histogram with the
//! culprit's function, the final span attributes and the last report.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::global::BoxedSpan;
use opentelemetry::trace::{Span as _, SpanBuilder, SpanContext, SpanKind};
use opentelemetry::KeyValue;

use super::detect::report_due;
use super::Watch;
use crate::clock::{self, Anchor};
use crate::diagnose::{Diagnosis, StallKind};
use crate::hot::slots::{Flag, PollEnd, Slot};
use crate::layer::SpanInfo;
use crate::report::{Culprit, StackCapture, StallReport, StallState};
use crate::stack;
use crate::stack::culprit::{MetricNames, MetricValue};
use crate::stack::symbolizer::Symbolized;
use crate::telemetry::{self, self as names};
use crate::victims::{self, Pending, PendingGuard, SpanLookups};

/// How long an ended stall's span and last report wait for its stack's symbols.
const SYMBOLS_WAIT: Duration = Duration::from_secs(10);

/// How a stall was found.
pub(super) enum Source {
    /// A poll with known boundaries, flagged in its slot's activity word.
    Exact { slot: Arc<Slot>, flag: Flag },
    /// A worker whose tokio metrics froze while it was unparked, found without hooks.
    Estimated {
        worker: usize,
        slot: Option<Arc<Slot>>,
        activity: u64,
    },
}

/// A stall in progress: everything its later reports, its end and its span need, gathered
/// at detection (the thirteen fields are what a `StallReport` and the span carry).
pub(super) struct Active {
    /// Watchdog-local id, to match the symbolized stack.
    id: u64,
    source: Source,
    /// Raw clock of the poll's start.
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
    /// The blocked thread's stack; [`StackCapture::Symbolizing`] until it is taken and
    /// symbolized (or fails).
    stack: StackCapture,
    /// The stack's culprit frame, found with its symbols.
    culprit: Culprit,
    /// Exact stalls: pending for the layer until the watchdog marks the victims.
    pending: Option<PendingGuard>,
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
pub(super) struct Ended {
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

/// The stalls the watchdog is following.
pub(super) struct Stalls {
    pub(super) active: Vec<Active>,
    /// Ended, waiting for their symbols.
    pub(super) finishing: Vec<Ended>,
    next_id: u64,
    /// The culprit function names this instance put on its duration histogram.
    culprit_names: MetricNames,
}

impl Stalls {
    /// No stall yet; at most `max_culprit_functions` distinct names on the histogram.
    pub(super) fn new(max_culprit_functions: usize) -> Self {
        Stalls {
            active: Vec::new(),
            finishing: Vec::new(),
            next_id: 0,
            culprit_names: MetricNames::new(max_culprit_functions),
        }
    }

    /// Whether a stall in progress is on `slot`.
    pub(super) fn watches_slot(&self, slot: &Arc<Slot>) -> bool {
        self.active
            .iter()
            .any(|active| active.slot().is_some_and(|s| Arc::ptr_eq(s, slot)))
    }

    /// Whether a stall in progress is on worker `index`.
    pub(super) fn watches_worker(&self, index: usize) -> bool {
        self.active
            .iter()
            .any(|active| active.worker() == Some(index))
    }

    /// Nothing in progress or waiting for symbols.
    pub(super) fn is_empty(&self) -> bool {
        self.active.is_empty() && self.finishing.is_empty()
    }

    /// Attaches the stacks the symbolizer finished to their stalls.
    fn attach(&mut self, ready: Vec<(u64, Symbolized)>) {
        for (id, symbolized) in ready {
            let found = self
                .active
                .iter_mut()
                .find(|active| active.id == id)
                .or_else(|| {
                    self.finishing
                        .iter_mut()
                        .map(|ended| &mut ended.active)
                        .find(|active| active.id == id)
                });
            if let Some(active) = found {
                active.stack = symbolized.stack;
                active.culprit = symbolized.culprit;
            }
        }
    }
}

impl Watch {
    /// A stall was found: counts it, opens its span under the culprit's span, diagnoses the
    /// blocked thread, asks for its stack and publishes the first report. Nothing here waits:
    /// the first report says the stack is pending ([`StackCapture::Symbolizing`]), and the
    /// stack joins the later reports, the span and the end report when it arrives.
    pub(super) fn begin(
        &mut self,
        source: Source,
        start: u64,
        info: Option<SpanInfo>,
        task: Option<(u64, &'static std::panic::Location<'static>)>,
        now: u64,
        anchor: &Anchor,
    ) {
        let id = self.stalls.next_id;
        self.stalls.next_id = id.wrapping_add(1);
        let (slot, word) = match &source {
            Source::Exact { slot, flag } => (Some(Arc::clone(slot)), flag.word),
            Source::Estimated { slot, .. } => (slot.clone(), slot.as_ref().map_or(0, |s| s.word())),
        };
        let (diagnosis, symbolized) = match &slot {
            Some(slot) => {
                let window = self.workers.cpu_window(slot, word);
                let tid = slot.stack_target.tid();
                let diagnosis = Diagnosis::at_detection(tid, window, slot.cpu_time(), now);
                let stack = self.stacks.capture(id, &slot.stack_target, Instant::now());
                (diagnosis, stack)
            }
            None => (
                Diagnosis::default(),
                Symbolized::without_frames(StackCapture::UnknownThread),
            ),
        };
        self.telemetry
            .instruments()
            .stalls
            .add(1, &self.metric_attributes(diagnosis.kind));

        let start_time = anchor.system_time(start);
        let mut attributes = self.span_attributes(&source, slot.as_deref(), task, &diagnosis);
        if let Some(info) = info.as_ref().filter(|info| info.context.is_none()) {
            attributes.extend(victims::orphan_attributes(info.name));
        }
        let parent = info
            .as_ref()
            .and_then(|info| info.context.clone())
            .unwrap_or_default();
        let builder = SpanBuilder::from_name(names::STALL_SPAN)
            .with_kind(SpanKind::Internal)
            .with_start_time(start_time)
            .with_attributes(attributes);
        let span = telemetry::start_span(self.inner.tracer.as_ref(), builder, &parent);
        let span_context = span.span_context().clone();
        let elapsed = clock::delta(start, now);
        let access = crate::layer::access();
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
                access.as_ref().map(|access| access as &dyn SpanLookups),
            ),
            _ => None,
        };
        let active = Active {
            id,
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
            stack: symbolized.stack,
            culprit: symbolized.culprit,
            pending,
        };
        let report = self.report(&active, elapsed, StallState::InProgress);
        self.publisher.publish(&report);
        self.stalls.active.push(active);
    }

    /// The stall span's attributes known at detection. The stack (`code.stacktrace`, or
    /// `tokio.eventloop.stall.stack_status` without one) and its culprit frame (`code.*`)
    /// are set once, when the span ends: what an exported span says is final.
    fn span_attributes(
        &self,
        source: &Source,
        slot: Option<&Slot>,
        task: Option<(u64, &'static std::panic::Location<'static>)>,
        diagnosis: &Diagnosis,
    ) -> Vec<KeyValue> {
        let mut attributes = vec![
            KeyValue::new(names::RUNTIME_NAME, self.inner.config.runtime_name.clone()),
            KeyValue::new(names::STALL_EXACT, matches!(source, Source::Exact { .. })),
        ];
        if let Some(slot) = slot {
            attributes.push(KeyValue::new(names::THREAD_ID, slot.os_tid));
            if !slot.thread_name.is_empty() {
                attributes.push(KeyValue::new(names::THREAD_NAME, slot.thread_name.clone()));
            }
        }
        let worker = match source {
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
            attributes.push(KeyValue::new(names::TASK_SPAWN_FILE, location.file()));
            attributes.push(KeyValue::new(
                names::TASK_SPAWN_LINE,
                i64::from(location.line()),
            ));
        }
        if let Some(syscall) = diagnosis.syscall {
            attributes.push(KeyValue::new(names::STALL_SYSCALL, syscall));
        }
        attributes
    }

    /// Ends the stalls whose poll returned (or whose estimate moved on), and publishes a
    /// report for each one still going whose duration doubled since its last report.
    pub(super) fn check_active(&mut self, now: u64) {
        let mut index = 0;
        while index < self.stalls.active.len() {
            let ended_now = || PollEnd { at: now, cpu: None };
            let ended = match &self.stalls.active[index].source {
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
                    let (worker, activity, slot) = (*worker, *activity, slot.clone());
                    self.estimated_ended(worker, activity, slot.as_ref())
                        .then(ended_now)
                }
            };
            match ended {
                Some(end) => {
                    let active = self.stalls.active.swap_remove(index);
                    self.end(active, end);
                }
                None => {
                    let active = &mut self.stalls.active[index];
                    let elapsed = clock::delta(active.start, now);
                    if let Some(next) = report_due(elapsed, active.next_report) {
                        active.reports = active.reports.saturating_add(1);
                        active.next_report = next;
                        let report = self.report(
                            &self.stalls.active[index],
                            elapsed,
                            StallState::InProgress,
                        );
                        self.publisher.publish(&report);
                    }
                    index += 1;
                }
            }
        }
    }

    /// A stall ended: its kind now; the duration histogram, its span and last report once its
    /// stack is symbolized and its victims are marked (on the worker, as it runs the stall's
    /// backlog: see `victims`). The histogram carries the culprit's function, known only
    /// then; its value is the duration measured now.
    pub(super) fn end(&mut self, mut active: Active, end: PollEnd) {
        let duration = clock::delta(active.start, end.at);
        let tid = active.slot().map(|slot| slot.stack_target.tid());
        let end_cpu = end
            .cpu
            .or_else(|| active.slot().and_then(|slot| slot.cpu_time()));
        active.diagnosis.at_end(tid, duration, end.at, end_cpu);
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
        let ended = Ended {
            active,
            duration,
            since: clock::raw(),
        };
        if ended.active.stack == StackCapture::Symbolizing || !ended.victims_settled(ended.since) {
            // Everything time-critical is done (the counter at detection); the histogram, the
            // span and the final report wait for the symbols and the victims, a moment at
            // most, so that a stall right after start-up still gets its stack and culprit
            // without making the watchdog miss the next stalls.
            self.stalls.finishing.push(ended);
        } else {
            self.finish_ended(ended);
        }
    }

    /// Records the duration histogram with the culprit's function, sets the stack and the
    /// culprit on the span (once), ends it and publishes the final report.
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
        if active.stack == StackCapture::Symbolizing {
            active.stack = StackCapture::Failed("symbolizing the stack took too long".to_string());
            active.culprit = Culprit::NoStack;
        }
        let function = match self.stalls.culprit_names.value(&active.culprit) {
            MetricValue::Function(name) => name,
            MetricValue::Other => names::CULPRIT_OTHER.to_owned(),
            MetricValue::Unknown => names::CULPRIT_UNKNOWN.to_owned(),
        };
        let mut attributes = self.metric_attributes(active.diagnosis.kind);
        attributes.push(KeyValue::new(names::CODE_FUNCTION_NAME, function));
        self.telemetry
            .instruments()
            .stall_duration
            .record(ended.duration.as_secs_f64(), &attributes);
        match &active.culprit {
            Culprit::Found(frame) => {
                active.span.set_attribute(KeyValue::new(
                    names::CODE_FUNCTION_NAME,
                    frame.function.clone(),
                ));
                if let Some(file) = &frame.file {
                    active
                        .span
                        .set_attribute(KeyValue::new(names::CODE_FILE_PATH, file.clone()));
                }
                if let Some(line) = frame.line {
                    active
                        .span
                        .set_attribute(KeyValue::new(names::CODE_LINE_NUMBER, i64::from(line)));
                }
            }
            Culprit::NotFound => active.span.set_attribute(KeyValue::new(
                names::CULPRIT_STATUS,
                Culprit::NotFound.status(),
            )),
            Culprit::NoStack => {}
        }
        let stack_attribute = match &active.stack {
            StackCapture::Captured(frames) => {
                KeyValue::new(names::CODE_STACKTRACE, stack::format_stacktrace(frames))
            }
            other => KeyValue::new(names::STACK_STATUS, other.status()),
        };
        active.span.set_attribute(stack_attribute);
        active
            .span
            .end_with_timestamp(active.start_time + ended.duration);
        active.reports = active.reports.saturating_add(1);
        let mut report = self.report(active, ended.duration, StallState::Ended);
        report.victims = victims;
        report.victims_dropped = dropped;
        self.publisher.publish(&report);
    }

    /// Attaches the stacks that arrived since the last call to their stalls, so that the
    /// reports published next carry them.
    pub(super) fn attach_stacks(&mut self) {
        let ready = self.stacks.ready();
        self.stalls.attach(ready);
    }

    /// Attaches the stacks that arrived, then finishes the ended stalls that waited for them
    /// (or for [`SYMBOLS_WAIT`], or all of them when `force`d at shutdown).
    pub(super) fn finish_waiting(&mut self, now: u64, force: bool) {
        self.attach_stacks();
        if self.stalls.finishing.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.stalls.finishing);
        for ended in waiting {
            if force
                || (ended.active.stack != StackCapture::Symbolizing && ended.victims_settled(now))
                || clock::delta(ended.since, now) >= SYMBOLS_WAIT
            {
                self.finish_ended(ended);
            } else {
                self.stalls.finishing.push(ended);
            }
        }
    }

    /// `tokio.runtime.name`, plus `tokio.eventloop.stall.kind` when known.
    fn metric_attributes(&self, kind: Option<StallKind>) -> Vec<KeyValue> {
        let mut attributes = self.telemetry.instruments().attributes.to_vec();
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
            run_queue_wait: active.diagnosis.run_queue_wait,
            stack: active.stack.clone(),
            culprit: active.culprit.clone(),
            victims: 0,
            victims_dropped: 0,
        }
    }
}
