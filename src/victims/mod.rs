//! Marking the victims of a stall: the requests that were ready to run while a worker was
//! blocked, and could not.
//!
//! # Who waited
//!
//! A request waited on a stall when its task was woken (its I/O became ready, its timer
//! fired, a channel delivered) while the worker was blocked, and ran only once the stall was
//! over. On stable builds that is observed at the stalled worker's poll boundaries: the
//! polls it runs from the stall's end until it has worked off the backlog are the ones that
//! were queued behind it. The backlog is:
//!
//! - the tasks in the worker's run queue when the stall ended (they run before it parks);
//! - the tasks whose timers expired or whose I/O became ready during the stall: tokio's
//!   driver delivers them at the first park after the stall (or earlier, on a busy worker),
//!   which then returns at once, and they run right after it.
//!
//! So the owner of the stalled worker's slot opens a *victim window* when the flagged poll
//! ends, and closes it at the second park after the end, or at the first one when that park
//! slept: what woke the worker then came after the stall (see `Slot::window_park`). Every
//! poll that starts in the window marks its request (the local root span of the span the
//! poll enters) there and then, on the worker, while the request is surely open: a request
//! that finishes in its first poll after the stall is marked before its span closes, in
//! either layer order, and a request that was not woken during the stall (an idle long poll,
//! an SSE stream, a slow upstream) is never marked, however long it has been open. The
//! watchdog closes a window still open `WINDOW_GRACE` after it saw the stall end (a worker
//! that never parks), then counts the marks.
//!
//! Tasks stolen from the stalled worker's queue by another worker ran elsewhere, soon (an
//! idle worker steals at once): they are not marked. A task woken during the stall by a
//! driver another worker turned ran on that worker: not held up, not marked. A task stolen
//! late by a worker that was busy itself was held up until the steal and is not marked.
//!
//! # The wait
//!
//! Each victim event carries how long that request was held up: from the stall's start to
//! the start of its first poll in the window (the poll start is already read from the clock
//! at that boundary). When the request became ready is unknown on stable builds, so the
//! wait is an upper bound (`tokio.eventloop.stall.wait.exact` is `false`).
//!
//! # Cost
//!
//! Nothing per request outside stalls: no record when a span is created, and one load of an
//! owner-written slot field at each poll start (`Slot::enter`) and each park and unpark. The
//! watchdog's work per stall is bounded by `max_victims`, flat in the number of open
//! requests.
//!
//! # Before the stall span exists
//!
//! The watchdog registers a stall here before it flags the poll (`prepare`), and gives it
//! its span once built (`PendingGuard::start`, after the diagnosis, which can take a few
//! milliseconds). A poll that starts in the window before then is kept (its root's id and
//! poll start) and marked by the watchdog when it gives the span, unless its span closed
//! meanwhile: that one is counted in `victims_dropped`, as are the victims over
//! `max_victims`. Each (stall, request) pair is counted once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::KeyValue;

use crate::clock;
use crate::hot::slots::{Slot, WindowPoll, TS_MASK};
use crate::telemetry as names;

/// How long after the watchdog saw a stall end it closes a victim window the worker has not
/// closed by parking (a worker busy with new work right after the stall).
pub(crate) const WINDOW_GRACE: Duration = Duration::from_millis(20);

/// The stall span and what a victim event needs of the stall.
pub(crate) struct Pending {
    /// Raw clock and wall-clock time of the stall's start.
    pub(crate) start: u64,
    pub(crate) start_time: SystemTime,
    /// The stall span.
    pub(crate) stall: SpanContext,
    /// The span id of the culprit's own local root, never its own victim.
    pub(crate) exclude: Option<u64>,
}

/// Who has been marked for one stall.
#[derive(Default)]
struct Marks {
    /// The stall span, once the watchdog made it.
    stall: Option<Pending>,
    /// Span ids of the local roots marked.
    marked: HashSet<u64>,
    /// Span ids of the victims not marked: over `max_victims`, or closed before the stall
    /// span existed.
    dropped: HashSet<u64>,
    /// Victims whose poll started before the stall span existed: root span id and raw poll
    /// start.
    deferred: Vec<(u64, u64)>,
    /// The watchdog has counted the marks: nothing more is added.
    closed: bool,
}

/// A stall whose victims are being marked.
struct Entry {
    /// The stalled worker's slot.
    slot: Arc<Slot>,
    /// The flagged activity word of the stalled poll.
    flag_word: u64,
    /// `max_victims`.
    limit: usize,
    marks: Mutex<Marks>,
}

impl Entry {
    /// Marks the root `root` (found polled at raw time `poll_start` in the window), or keeps
    /// it for later, or counts it dropped. `context` gives its OpenTelemetry context.
    fn victim(
        &self,
        marks: &mut Marks,
        root: u64,
        poll_start: u64,
        context: impl FnOnce() -> Option<opentelemetry::Context>,
    ) {
        if marks.closed || marks.marked.contains(&root) || marks.dropped.contains(&root) {
            return;
        }
        let Some(stall) = &marks.stall else {
            if !marks.deferred.iter().any(|&(id, _)| id == root) {
                marks.deferred.push((root, poll_start));
            }
            return;
        };
        if Some(root) == stall.exclude {
            return;
        }
        if marks.marked.len() >= self.limit {
            marks.dropped.insert(root);
            return;
        }
        let Some(context) = context() else {
            // No OpenTelemetry span for this request: nothing to mark, nothing lost.
            return;
        };
        let duration = match self.slot.published_end(self.flag_word & TS_MASK) {
            Some(end) => clock::delta(stall.start, end.at),
            None => clock::delta(stall.start, poll_start),
        };
        let wait = clock::delta(stall.start, poll_start);
        mark(&context, stall, duration, wait, false);
        marks.marked.insert(root);
    }
}

struct Registry {
    /// How many stalls are registered: the fast path of the layer's checks.
    count: AtomicUsize,
    list: Mutex<Vec<Arc<Entry>>>,
}

/// Constant-initialised, so `any_pending` is one load with no initialisation check.
static REGISTRY: Registry = Registry {
    count: AtomicUsize::new(0),
    list: Mutex::new(Vec::new()),
};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn remove(entry: &Arc<Entry>) {
    let mut list = lock(&REGISTRY.list);
    if let Some(index) = list.iter().position(|e| Arc::ptr_eq(e, entry)) {
        list.swap_remove(index);
        REGISTRY.count.fetch_sub(1, Ordering::Release);
    }
}

/// Whether any stall is registered (one relaxed load).
#[inline]
pub(crate) fn any_pending() -> bool {
    REGISTRY.count.load(Ordering::Relaxed) != 0
}

/// Registers the stall of the poll with flagged word `flag_word` on `slot`, before the
/// watchdog flags it, so that no poll of its victim window goes unseen. `limit` is
/// `max_victims` (0: nothing registered). An entry of the same slot that never got its
/// stall span (`PendingGuard::start`) is dropped.
pub(crate) fn prepare(slot: &Arc<Slot>, flag_word: u64, limit: usize) {
    if limit == 0 {
        return;
    }
    let entry = Arc::new(Entry {
        slot: Arc::clone(slot),
        flag_word,
        limit,
        marks: Mutex::new(Marks::default()),
    });
    let mut list = lock(&REGISTRY.list);
    let before = list.len();
    list.retain(|e| !(Arc::ptr_eq(&e.slot, slot) && lock(&e.marks).stall.is_none()));
    let removed = before - list.len();
    list.push(entry);
    drop(list);
    REGISTRY.count.fetch_add(1, Ordering::Release);
    if removed > 0 {
        REGISTRY.count.fetch_sub(removed, Ordering::Release);
    }
}

/// A poll started on `slot` in its open victim window: marks its request as a victim of
/// the stall whose window it is. `root` gives the span id of the local root of the span the poll entered;
/// `context` the OpenTelemetry context of a root span id. Called by the layer on the
/// worker, with the span entered (so its root is open).
#[cold]
pub(crate) fn poll_in_window(
    slot: &Slot,
    poll: WindowPoll,
    root: impl FnOnce() -> Option<u64>,
    context: impl Fn(u64) -> Option<opentelemetry::Context>,
) {
    if !any_pending() {
        return;
    }
    let entries: Vec<Arc<Entry>> = lock(&REGISTRY.list)
        .iter()
        .filter(|e| std::ptr::eq(Arc::as_ptr(&e.slot), slot) && e.flag_word & TS_MASK == poll.stall)
        .cloned()
        .collect();
    if entries.is_empty() {
        return;
    }
    let Some(root) = root() else { return };
    for entry in entries {
        let mut marks = lock(&entry.marks);
        entry.victim(&mut marks, root, poll.start, || context(root));
    }
}

/// What the victim marking needs of the subscriber's spans (the layer's `SpanAccess`
/// provides it; this module sits below the layer and cannot name it).
pub(crate) trait SpanLookups {
    /// The OpenTelemetry context of the local root span `id`, if it is open and not closing.
    fn open_root_context(&self, id: u64) -> Option<opentelemetry::Context>;
    /// Whether the span `id` is still open.
    fn is_open(&self, id: u64) -> bool;
}

/// Keeps a stall registered until the watchdog has counted its victims.
pub(crate) struct PendingGuard(Arc<Entry>);

impl PendingGuard {
    /// The stall span of the stall `prepare`d for `slot` and `flag_word` exists: marks the
    /// victims polled before it did (those still open; the others are counted dropped), and
    /// returns the guard, or `None` when nothing was prepared (`max_victims(0)`).
    pub(crate) fn start(
        slot: &Arc<Slot>,
        flag_word: u64,
        stall: Pending,
        spans: Option<&dyn SpanLookups>,
    ) -> Option<Self> {
        let entry = lock(&REGISTRY.list)
            .iter()
            .find(|e| Arc::ptr_eq(&e.slot, slot) && e.flag_word == flag_word)
            .cloned()?;
        let mut marks = lock(&entry.marks);
        marks.stall = Some(stall);
        for (root, poll_start) in std::mem::take(&mut marks.deferred) {
            let context = spans.and_then(|spans| spans.open_root_context(root));
            if context.is_none() && spans.is_some_and(|spans| !spans.is_open(root)) {
                // Closed before it could be marked: a victim lost.
                let excluded = marks.stall.as_ref().and_then(|s| s.exclude) == Some(root);
                if !excluded {
                    marks.dropped.insert(root);
                }
                continue;
            }
            entry.victim(&mut marks, root, poll_start, || context);
        }
        drop(marks);
        Some(PendingGuard(entry))
    }

    /// Whether the victims are all known: the worker closed the window (it parked), or
    /// `WINDOW_GRACE` has passed since `since` (raw time the watchdog saw the stall end).
    pub(crate) fn settled(&self, since: u64, now: u64) -> bool {
        self.0.slot.window_closed(self.0.flag_word) || clock::delta(since, now) >= WINDOW_GRACE
    }

    /// Closes the window and the marks; returns how many victims were marked and how many
    /// were not (over `max_victims`, or lost).
    pub(crate) fn finish(self) -> (usize, usize) {
        self.0.slot.close_window(self.0.flag_word);
        let mut marks = lock(&self.0.marks);
        marks.closed = true;
        let lost = marks.deferred.len();
        (marks.marked.len(), marks.dropped.len().saturating_add(lost))
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        remove(&self.0);
    }
}

/// Adds the victim event (at the stall's start, with the stall's duration and ids, and
/// the request's wait) and a link to the stall span to the victim's span.
fn mark(
    victim: &opentelemetry::Context,
    stall: &Pending,
    duration: Duration,
    wait: Duration,
    exact: bool,
) {
    let span = victim.span();
    span.add_event_with_timestamp(
        names::VICTIM_EVENT,
        stall.start_time,
        vec![
            KeyValue::new(names::VICTIM_DURATION, duration.as_secs_f64()),
            KeyValue::new(names::VICTIM_WAIT, wait.as_secs_f64()),
            KeyValue::new(names::VICTIM_WAIT_EXACT, exact),
            KeyValue::new(names::VICTIM_TRACE_ID, stall.stall.trace_id().to_string()),
            KeyValue::new(names::VICTIM_SPAN_ID, stall.stall.span_id().to_string()),
        ],
    );
    span.add_link(stall.stall.clone(), Vec::new());
}

/// Attributes of a stall span whose `tracing` span (`name`) has no OpenTelemetry context:
/// the span's name, so the stall can still be told apart. Warns once per process, naming
/// the span and the likely fix: as a WARN line of target `looplag`, or on stderr when the
/// subscriber filters those out (the path that filter cannot hide, as for the stall lines
/// themselves, see `report::log`).
pub(crate) fn orphan_attributes(name: &'static str) -> Vec<KeyValue> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        let text = format!(
            "a stall happened in span `{name}`, which has no OpenTelemetry context: its stall \
             span is exported as the root of its own trace (with \
             {} = \"{name}\"), and the requests it held up cannot link to it. Most often \
             tracing-opentelemetry's layer has a filter that drops the span (a per-layer \
             filter or EnvFilter at `info` drops DEBUG spans, and tower-http's TraceLayer makes \
             its request spans at DEBUG): let that layer see the span's level, or make the \
             span at INFO",
            names::STALL_SPAN_NAME
        );
        if tracing::enabled!(target: "looplag", tracing::Level::WARN) {
            tracing::warn!(target: "looplag", span = name, "{text}");
        } else {
            use std::io::Write as _;
            // Never panic over a closed stderr.
            let _ = writeln!(
                std::io::stderr().lock(),
                "looplag: {text}. (looplag's WARN lines are filtered out, so this note is \
                 written to stderr, once per process.)"
            );
        }
    }
    vec![KeyValue::new(names::STALL_SPAN_NAME, name)]
}
