//! Marking the victims of a stall: the in-flight requests (local root spans) that waited on
//! the stalled worker get a `tokio.eventloop.stall` event and a link to the stall span.
//!
//! The watchdog marks victims when it sees a stall end, at its next tick. A request that
//! resumes the moment the stall ends can finish, and its span close, before that tick:
//! exported without the event. So from detection until the watchdog has marked the victims,
//! the stall is *pending* here, and looplag's layer checks every closing root span against
//! the pending stalls (`root_closing`, called from `on_close`, which runs before
//! `tracing-opentelemetry`'s). A root that waited on a stall that has ended is marked there,
//! on the closing thread, while its OpenTelemetry span is still open.
//!
//! Each (stall, root) pair is marked once: the watchdog and a closing thread both claim it
//! under the stall's lock. With no stall pending a span close costs one relaxed load.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::KeyValue;

use crate::clock;
use crate::hot::slots::{Flag, Slot};
use crate::telemetry as names;
use roots::roots;
use roots::RootInfo;

pub(crate) mod roots;

/// An exact stall whose victims are not all marked yet.
pub(crate) struct Pending {
    /// The stalled worker's slot and the flag, which give the stall's end once the owner
    /// publishes it.
    pub(crate) slot: Arc<Slot>,
    pub(crate) flag: Flag,
    /// Raw clock and wall-clock time of the stall's start.
    pub(crate) start: u64,
    pub(crate) start_time: SystemTime,
    /// The stall span.
    pub(crate) stall: SpanContext,
    /// The culprit's own root, never its own victim.
    pub(crate) exclude: Option<u64>,
    /// `max_victims`.
    pub(crate) limit: usize,
}

/// Who has been marked for one pending stall.
#[derive(Default)]
pub(crate) struct Marks {
    /// Tokens of the roots marked.
    marked: HashSet<u64>,
    /// Victims not marked because `limit` was reached.
    dropped: usize,
    /// The watchdog has marked the rest: nothing more is added.
    closed: bool,
}

impl Marks {
    /// How many victims were marked.
    pub(crate) fn marked(&self) -> usize {
        self.marked.len()
    }

    /// How many victims were left unmarked for `max_victims`.
    pub(crate) fn dropped(&self) -> usize {
        self.dropped
    }

    /// Whether the root with `token` was marked.
    pub(crate) fn contains(&self, token: u64) -> bool {
        self.marked.contains(&token)
    }

    /// Room left under the limit.
    pub(crate) fn room(&self, limit: usize) -> usize {
        limit.saturating_sub(self.marked.len())
    }

    /// Records a marked root.
    pub(crate) fn insert(&mut self, token: u64) {
        self.marked.insert(token);
    }

    /// Adds victims left unmarked for the limit.
    pub(crate) fn add_dropped(&mut self, dropped: usize) {
        self.dropped = self.dropped.saturating_add(dropped);
    }

    /// No more victims are marked for this stall.
    pub(crate) fn close(&mut self) {
        self.closed = true;
    }
}

/// A pending stall and its marks.
struct Entry {
    stall: Pending,
    marks: Mutex<Marks>,
}

struct Registry {
    /// How many stalls are pending: the layer's fast path.
    count: AtomicUsize,
    list: Mutex<Vec<Arc<Entry>>>,
}

/// Constant-initialised, so `any_pending` (on every span close) is one load with no
/// initialisation check.
static REGISTRY: Registry = Registry {
    count: AtomicUsize::new(0),
    list: Mutex::new(Vec::new()),
};

#[inline]
fn registry() -> &'static Registry {
    &REGISTRY
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Keeps a stall pending until dropped.
pub(crate) struct PendingGuard(Arc<Entry>);

impl PendingGuard {
    /// Makes an exact stall pending.
    pub(crate) fn register(stall: Pending) -> Self {
        let pending = Arc::new(Entry {
            stall,
            marks: Mutex::new(Marks::default()),
        });
        let registry = registry();
        lock(&registry.list).push(Arc::clone(&pending));
        registry.count.fetch_add(1, Ordering::Release);
        PendingGuard(pending)
    }

    /// The marks so far, locked: the watchdog marks the remaining victims under this lock,
    /// then closes the marks.
    pub(crate) fn marks(&self) -> MutexGuard<'_, Marks> {
        lock(&self.0.marks)
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let registry = registry();
        let mut list = lock(&registry.list);
        if let Some(index) = list.iter().position(|p| Arc::ptr_eq(p, &self.0)) {
            list.swap_remove(index);
            registry.count.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Whether any stall is pending (one relaxed load).
#[inline]
pub(crate) fn any_pending() -> bool {
    registry().count.load(Ordering::Relaxed) != 0
}

/// A local root span is closing: mark it as a victim of every pending stall that it waited
/// on and that has ended. `context` gives the root's OpenTelemetry context (only asked for
/// when needed).
pub(crate) fn root_closing(
    root: &RootInfo,
    mut context: impl FnMut() -> Option<opentelemetry::Context>,
) {
    let pending: Vec<Arc<Entry>> = lock(&registry().list).clone();
    for entry in pending {
        let stall = &entry.stall;
        if Some(root.token) == stall.exclude || !root.waited_on(stall.slot.thread_uid) {
            continue;
        }
        // Still stalled: this request was not held up by it (it ran elsewhere).
        let Some(end) = stall.slot.flagged_end(&stall.flag) else {
            continue;
        };
        if root.epoch >= end.roots_before {
            continue;
        }
        let mut marks = lock(&entry.marks);
        if marks.closed || marks.contains(root.token) {
            continue;
        }
        if marks.room(stall.limit) == 0 {
            marks.add_dropped(1);
            continue;
        }
        if let Some(context) = context() {
            mark(
                &context,
                &stall.stall,
                stall.start_time,
                clock::delta(stall.start, end.at),
            );
            marks.insert(root.token);
        }
    }
}

/// Adds the victim event (at the stall's start, with its duration and ids) and a link to
/// the stall span to the victim's span.
pub(crate) fn mark(
    victim: &opentelemetry::Context,
    stall: &SpanContext,
    start_time: SystemTime,
    duration: Duration,
) {
    let span = victim.span();
    span.add_event_with_timestamp(
        names::VICTIM_EVENT,
        start_time,
        vec![
            KeyValue::new(names::VICTIM_DURATION, duration.as_secs_f64()),
            KeyValue::new(names::VICTIM_TRACE_ID, stall.trace_id().to_string()),
            KeyValue::new(names::VICTIM_SPAN_ID, stall.span_id().to_string()),
        ],
    );
    span.add_link(stall.clone(), Vec::new());
}

/// A stall that just ended, as the victim marking needs it.
pub(crate) struct EndedStall<'a> {
    /// `thread_uid` of the stalled worker thread.
    pub(crate) thread: u64,
    /// Roots with an epoch below this were created before the end.
    pub(crate) roots_before: u64,
    /// The token of the culprit's own root, never its own victim.
    pub(crate) culprit: Option<u64>,
    /// `max_victims`.
    pub(crate) limit: usize,
    /// The stall span.
    pub(crate) span: &'a SpanContext,
    pub(crate) start_time: SystemTime,
    pub(crate) duration: Duration,
}

/// Marks the victims of a stall that ended (the watchdog, at the tick that saw the end):
/// every in-flight root that waited on the stalled worker and was not marked already as it
/// closed (see [`root_closing`]), under the pending stall's lock, then closes its marks.
/// `context` gives a root's OpenTelemetry context while it is open. Returns how many were
/// marked and how many were left unmarked for the limit.
pub(crate) fn mark_ended(
    stall: &EndedStall<'_>,
    pending: Option<PendingGuard>,
    context: impl Fn(&RootInfo) -> Option<opentelemetry::Context>,
) -> (usize, usize) {
    let mut own = Marks::default();
    let mut guard = pending.as_ref().map(|pending| pending.marks());
    let marks = guard.as_deref_mut().unwrap_or(&mut own);
    let (chosen, dropped) = roots().victims(
        stall.thread,
        stall.roots_before,
        |token| Some(token) == stall.culprit || marks.contains(token),
        marks.room(stall.limit),
    );
    marks.add_dropped(dropped);
    for root in &chosen {
        if let Some(context) = context(root) {
            mark(&context, stall.span, stall.start_time, stall.duration);
            marks.insert(root.token);
        }
    }
    marks.close();
    (marks.marked(), marks.dropped())
}

/// Follows on which worker each in-flight request was last polled, from the poll-level span
/// ids the slots record (watchdog side, once per tick).
#[derive(Debug, Default)]
pub(crate) struct PolledRoots {
    /// Per slot (by thread uid): how far its ring of poll-level span ids has been read.
    cursors: HashMap<u64, usize>,
}

impl PolledRoots {
    /// Records on which worker each in-flight trace was last polled.
    ///
    /// A poll-level span is most often the request's root itself; the others are resolved
    /// to their root with `root_id_of` (a registry lookup). The roots are then looked up in
    /// the root tables once for the whole tick.
    pub(crate) fn track(&mut self, slots: &[Arc<Slot>], root_id_of: impl Fn(u64) -> Option<u64>) {
        self.cursors
            .retain(|thread, _| slots.iter().any(|slot| slot.thread_uid == *thread));
        // (worker thread, span id), oldest first per worker.
        let mut polled: Vec<(u64, u64)> = Vec::new();
        for slot in slots {
            let cursor = self.cursors.entry(slot.thread_uid).or_insert(0);
            let mut previous = 0;
            slot.drain_poll_spans(cursor, |id| {
                if id != previous {
                    previous = id;
                    polled.push((slot.thread_uid, id));
                }
            });
        }
        if polled.is_empty() {
            return;
        }
        let ids: HashSet<u64> = polled.iter().map(|&(_, id)| id).collect();
        let mut found: HashMap<u64, Arc<RootInfo>> = roots()
            .find(&ids)
            .into_iter()
            .map(|root| (root.id, root))
            .collect();
        let root_of: HashMap<u64, u64> = ids
            .iter()
            .filter(|id| !found.contains_key(id))
            .filter_map(|&id| Some((id, root_id_of(id)?)))
            .collect();
        let missing: HashSet<u64> = root_of
            .values()
            .filter(|root| !found.contains_key(root))
            .copied()
            .collect();
        if !missing.is_empty() {
            found.extend(
                roots()
                    .find(&missing)
                    .into_iter()
                    .map(|root| (root.id, root)),
            );
        }
        for (thread, id) in polled {
            let root_id = root_of.get(&id).copied().unwrap_or(id);
            if let Some(root) = found.get(&root_id) {
                root.last_polled_on.store(thread, Ordering::Relaxed);
            }
        }
    }
}
