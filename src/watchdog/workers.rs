//! What the watchdog tracks per tokio worker between ticks: when its published metrics and
//! its slot's activity last changed (for estimated detection and the multi-thread check of
//! exact detection), and the CPU time of a poll that outlived a tick (for the diagnosis).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::hot::slots::{Slot, FLAGGED};
use crate::stack::{self, StackError};

/// How long the watchdog waits for a thread to answer [`stack::in_runtime`]. The handler
/// runs within microseconds of delivery; a thread that does not answer in this time
/// (stopped, or in an uninterruptible wait) is taken as "cannot tell".
const RUNTIME_QUERY_TIMEOUT: Duration = Duration::from_millis(20);

/// Per tokio worker: when its published metrics last changed.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct WorkerTrack {
    /// `(park_unpark_count, busy_duration_total)` as last read.
    pub(super) metrics: (u64, Duration),
    /// Raw time of the tick before the one that saw `metrics` change: the change happened
    /// after this.
    pub(super) changed_after: u64,
    /// Metrics plus the worker's slot words, for uninstrumented stalls.
    pub(super) activity: u64,
    /// Raw time of the first tick that saw the current `activity`.
    pub(super) activity_since: u64,
    /// How many ticks have read this worker's metrics (saturating).
    pub(super) observed: u32,
    /// Current-thread runtimes on stable builds: raw time of the last check that found the
    /// driver thread outside `block_on` during the current `activity`; `None` while not
    /// asked.
    pub(super) outside: Option<u64>,
    /// Runtime queries of this worker's threads that timed out in a row (the thread blocks
    /// the stack signal, or is stopped): each doubles the wait before the next query, so
    /// that a thread that never answers does not hold up every tick.
    pub(super) query_timeouts: u32,
}

impl WorkerTrack {
    /// tokio publishes the park count as a worker parks and right after it unparks: odd
    /// means parked.
    pub(super) fn parked(&self) -> bool {
        self.metrics.0 % 2 == 1
    }

    /// Asks `slot`'s thread whether it is inside a runtime's scheduler
    /// ([`stack::in_runtime`]): the answer (an exited thread is outside), or `None` when it
    /// cannot tell. Counts the timeouts in a row (any answer resets them).
    pub(super) fn ask_in_runtime(&mut self, slot: &Slot) -> Option<bool> {
        match stack::in_runtime(&slot.stack_target, RUNTIME_QUERY_TIMEOUT) {
            Ok(inside) => {
                self.query_timeouts = 0;
                Some(inside)
            }
            Err(StackError::ThreadGone) => Some(false),
            Err(StackError::Timeout) => {
                self.query_timeouts = self.query_timeouts.saturating_add(1);
                None
            }
            Err(_) => None,
        }
    }
}

/// Every worker's track, and the CPU windows of the polls that outlived a tick.
#[derive(Debug)]
pub(super) struct Workers {
    pub(super) multi_thread: bool,
    pub(super) tracks: Vec<WorkerTrack>,
    /// Per slot (by thread uid): the activity word last seen, and once a second tick has
    /// seen the same word, the thread's CPU time and the raw time then.
    cpu_seen: HashMap<u64, (u64, Option<(Duration, u64)>)>,
    /// Raw time of the previous tick.
    previous_tick: u64,
}

impl Workers {
    pub(super) fn new(multi_thread: bool, now: u64) -> Self {
        Workers {
            multi_thread,
            tracks: Vec::new(),
            cpu_seen: HashMap::new(),
            previous_tick: now,
        }
    }

    /// Reads tokio's per-worker metrics and notes when each last changed.
    pub(super) fn track(
        &mut self,
        metrics: &tokio::runtime::RuntimeMetrics,
        slots: &[Arc<Slot>],
        now: u64,
    ) {
        let count = metrics.num_workers();
        self.tracks.resize(
            count,
            WorkerTrack {
                activity_since: now,
                ..WorkerTrack::default()
            },
        );
        for (index, track) in self.tracks.iter_mut().enumerate() {
            let current = (
                metrics.worker_park_unpark_count(index),
                metrics.worker_total_busy_duration(index),
            );
            if track.observed == 0 {
                // First sight: when these values were published is unknown. Recording the
                // watchdog's start as their change made a poll that began before the first
                // tick look moved away (never frozen), so a stall in progress when the
                // watchdog started was never detected. `frozen_since` waits for a second
                // reading instead.
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
        self.previous_tick = now;
    }

    /// Notes a running thread's CPU time when a second tick in a row sees the same activity
    /// (a poll that has lasted at least part of an interval: a possible stall), so a stall's
    /// CPU share can be measured from then on. Reading another thread's CPU clock is a system
    /// call with a thread lookup in the kernel; under load every tick sees a new poll on
    /// every worker, and reading at first sight made those reads almost half of the
    /// watchdog's CPU time. Nothing for parked threads.
    pub(super) fn track_cpu(&mut self, slots: &[Arc<Slot>], now: u64) {
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

    /// The CPU window of `slot`'s poll with activity `word`: its CPU time and the raw time
    /// when a tick first saw it running for a whole interval.
    pub(super) fn cpu_window(&self, slot: &Slot, word: u64) -> Option<(Duration, u64)> {
        self.cpu_seen
            .get(&slot.thread_uid)
            .filter(|(seen, _)| *seen == word & !FLAGGED)
            .and_then(|&(_, window)| window)
    }

    /// On a multi-thread runtime, a worker stuck in a poll publishes no metrics. If its
    /// metrics changed after the poll started, another thread runs that worker now (the
    /// thread called `block_in_place`) and the thread is not blocking the runtime.
    pub(super) fn frozen_since(&self, slot: &Slot, start: u64) -> bool {
        !self.multi_thread
            || super::detect::frozen_since(
                slot.worker_index.and_then(|index| self.tracks.get(index)),
                start,
            )
    }
}
