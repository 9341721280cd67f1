//! Finding stalls: exact detection from the slots' activity words, estimated detection from
//! tokio's worker metrics, and the end of an estimated stall.
//!
//! The decisions are plain functions over snapshots and durations (the top of this file),
//! unit-tested without a runtime; the `Watch` methods below gather the inputs and act.

use std::sync::Arc;
use std::time::Duration;

use super::stall::Source;
use super::workers::WorkerTrack;
use super::Watch;
use crate::clock::{self, Anchor};
use crate::hot::slots::{Flag, PollEnd, Slot, Snapshot, FLAGGED};
use crate::layer::SpanAccess;
use crate::victims;

/// Shortest wait between two checks of an undriven current-thread runtime (the wait is the
/// stall threshold, but not less): each check interrupts the thread.
const MIN_RECHECK: Duration = Duration::from_millis(20);

/// Most doublings of the recheck wait after runtime queries that timed out (64 thresholds).
const MAX_QUERY_BACKOFF: u32 = 6;

/// Exact detection: the poll in `snapshot` is a new stall when it is running, not already
/// flagged, has run for `elapsed >= threshold`, and its worker is `frozen` (see
/// [`frozen_since`]).
pub(super) fn is_exact_stall(
    snapshot: &Snapshot,
    elapsed: Duration,
    threshold: Duration,
    frozen: bool,
) -> bool {
    snapshot.busy() && !snapshot.flagged() && !snapshot.parked && elapsed >= threshold && frozen
}

/// Whether a multi-thread worker has published nothing since raw time `start`: read at least
/// twice, unparked (tokio publishes the park count as it parks and right after it unparks:
/// odd means the worker index is parked, so a thread stuck in a poll is not running it, as
/// after `block_in_place`), and unchanged since before `start`. A worker not known to the
/// metrics counts as frozen.
pub(super) fn frozen_since(track: Option<&WorkerTrack>, start: u64) -> bool {
    match track {
        Some(track) => track.observed >= 2 && !track.parked() && track.changed_after < start,
        None => true,
    }
}

/// Estimated detection: a worker is a candidate when it is not parked and its activity has
/// not changed for `unchanged` of at least the threshold, less half a sample interval.
/// `activity_since` is the first tick that saw the activity, up to an interval after it;
/// ticks land on a fixed grid, give or take the scheduler's jitter: without the
/// half-interval allowance, a tick that lands a little early next to one that landed a
/// little late postponed the detection by a whole interval.
pub(super) fn is_estimated_candidate(
    track: &WorkerTrack,
    unchanged: Duration,
    threshold: Duration,
    interval: Duration,
) -> bool {
    !track.parked() && unchanged >= threshold.saturating_sub(interval / 2)
}

/// An estimated stall ends when its worker's activity moves on from the one it began with,
/// the worker parks, or the runtime shuts down (its workers exit, and an exited worker looks
/// like a stuck one).
pub(super) fn estimated_moved(track: &WorkerTrack, activity: u64, shut_down: bool) -> bool {
    track.activity != activity || track.parked() || shut_down
}

/// A stall in progress is reported again each time its duration doubles: given `elapsed`
/// and the duration of the next report, returns the one after it when a report is due now.
pub(super) fn report_due(elapsed: Duration, next_report: Duration) -> Option<Duration> {
    (elapsed >= next_report).then(|| elapsed.saturating_mul(2))
}

/// How long to wait before asking an undriven current-thread runtime's thread again: the
/// threshold (at least [`MIN_RECHECK`]), doubled for each query in a row that timed out.
pub(super) fn recheck_wait(threshold: Duration, query_timeouts: u32) -> Duration {
    threshold
        .max(MIN_RECHECK)
        .saturating_mul(1 << query_timeouts.min(MAX_QUERY_BACKOFF))
}

impl Watch {
    /// Flags and begins every poll that has run for the threshold on a registered slot.
    pub(super) fn detect_exact(
        &mut self,
        slots: &[Arc<Slot>],
        now: u64,
        anchor: &Anchor,
        access: Option<&SpanAccess>,
    ) {
        let threshold = self.inner.config.stall_threshold;
        for slot in slots {
            if self.stalls.watches_slot(slot) {
                continue;
            }
            let snapshot = slot.snapshot();
            let elapsed = clock::delta(snapshot.start(), now);
            if !is_exact_stall(&snapshot, elapsed, threshold, true)
                || !self.workers.frozen_since(slot, snapshot.start())
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
                if let Some(active) = self.stalls.active.pop() {
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
    pub(super) fn detect_estimated(&mut self, slots: &[Arc<Slot>], now: u64, anchor: &Anchor) {
        let config = &self.inner.config;
        let (threshold, interval) = (config.stall_threshold, config.sample_interval);
        for index in 0..self.workers.tracks.len() {
            let track = self.workers.tracks[index];
            let unchanged = clock::delta(track.activity_since, now);
            if !is_estimated_candidate(&track, unchanged, threshold, interval)
                || self.stalls.watches_worker(index)
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
            let (slot, start) = if self.workers.multi_thread {
                let slot = match candidates.as_slice() {
                    [only] => Some(Arc::clone(only)),
                    _ => None,
                };
                (slot, track.activity_since)
            } else {
                let recheck = recheck_wait(threshold, track.query_timeouts);
                if track
                    .outside
                    .is_some_and(|checked| clock::delta(checked, now) < recheck)
                {
                    continue;
                }
                let asked = &mut self.workers.tracks[index];
                let driver = candidates
                    .iter()
                    .find(|slot| asked.ask_in_runtime(slot) == Some(true));
                let Some(driver) = driver else {
                    self.workers.tracks[index].outside = Some(now);
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

    /// Whether the estimated stall on `worker` (begun with `activity`, on `slot` when known)
    /// has ended.
    pub(super) fn estimated_ended(
        &mut self,
        worker: usize,
        activity: u64,
        slot: Option<&Arc<Slot>>,
    ) -> bool {
        let track = self.workers.tracks.get(worker).copied().unwrap_or_default();
        if estimated_moved(&track, activity, self.shut_down) {
            return true;
        }
        // Current-thread: `block_on` may return right after the blocking poll, leaving
        // tokio's metrics as frozen as during the stall. A thread that did not answer a query
        // before is not asked again every tick.
        if self.workers.multi_thread || track.query_timeouts != 0 {
            return false;
        }
        match (slot, self.workers.tracks.get_mut(worker)) {
            (Some(slot), Some(asked)) => asked.ask_in_runtime(slot) == Some(false),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The detector's decisions, driven by hand: a real slot written as its owner would
    //! (no runtime, no sleep), and durations given instead of waited for.

    use super::*;
    use crate::hot::slots::Registry;

    const MS: Duration = Duration::from_millis(1);

    /// A slot for this test thread, registered as a current-thread runtime's driver.
    fn slot() -> Arc<Slot> {
        crate::clock::init();
        let registry = Registry::new(u64::MAX - 7);
        registry.register_current_thread_driver();
        registry.live().pop().expect("the test thread's slot")
    }

    fn worker(observed: u32, parks: u64, changed_after: u64) -> WorkerTrack {
        WorkerTrack {
            metrics: (parks, Duration::ZERO),
            changed_after,
            observed,
            ..WorkerTrack::default()
        }
    }

    #[test]
    fn exact_a_poll_is_a_stall_from_the_threshold_on() {
        let slot = slot();
        slot.poll_start();
        let busy = slot.snapshot();
        assert!(!is_exact_stall(&busy, 49 * MS, 50 * MS, true));
        assert!(is_exact_stall(&busy, 50 * MS, 50 * MS, true));
        // Not on a worker that published since the poll began (block_in_place).
        assert!(!is_exact_stall(&busy, 80 * MS, 50 * MS, false));
        slot.poll_end();
        assert!(!is_exact_stall(&slot.snapshot(), 80 * MS, 50 * MS, true));
    }

    #[test]
    fn exact_a_flagged_poll_is_not_found_twice_and_its_end_is_published() {
        let slot = slot();
        slot.poll_start();
        let busy = slot.snapshot();
        assert!(slot.flag(busy.word));
        let flag = Flag {
            word: busy.word | FLAGGED,
            at: clock::raw(),
        };
        assert!(!is_exact_stall(&slot.snapshot(), 80 * MS, 50 * MS, true));
        assert!(slot.flagged_end(&flag).is_none(), "still in the poll");
        slot.poll_end();
        let end = slot.flagged_end(&flag).expect("the end is published");
        assert!(end.at >= busy.start(), "the end follows the start");
        assert!(!is_exact_stall(&slot.snapshot(), 80 * MS, 50 * MS, true));
    }

    #[test]
    fn exact_a_flag_that_lost_the_race_with_the_poll_end_is_refused() {
        let slot = slot();
        slot.poll_start();
        let busy = slot.snapshot();
        slot.poll_end();
        assert!(!slot.flag(busy.word), "the poll ended before the flag");
    }

    #[test]
    fn multi_thread_worker_frozen_only_after_two_readings_unparked_and_unchanged() {
        let start = 1_000;
        assert!(frozen_since(None, start));
        assert!(!frozen_since(Some(&worker(1, 2, 0)), start), "one reading");
        assert!(frozen_since(Some(&worker(2, 2, 0)), start));
        assert!(!frozen_since(Some(&worker(2, 3, 0)), start), "parked index");
        assert!(
            !frozen_since(Some(&worker(5, 2, start + 1)), start),
            "published since"
        );
    }

    #[test]
    fn estimated_candidate_from_the_threshold_less_half_an_interval() {
        let track = worker(3, 4, 0);
        assert!(!is_estimated_candidate(&track, 44 * MS, 50 * MS, 10 * MS));
        assert!(is_estimated_candidate(&track, 45 * MS, 50 * MS, 10 * MS));
        let parked = worker(3, 5, 0);
        assert!(!is_estimated_candidate(&parked, 500 * MS, 50 * MS, 10 * MS));
    }

    #[test]
    fn estimated_ends_when_activity_moves_the_worker_parks_or_the_runtime_stops() {
        let track = WorkerTrack {
            activity: 42,
            ..worker(3, 4, 0)
        };
        assert!(!estimated_moved(&track, 42, false));
        assert!(estimated_moved(&track, 41, false));
        assert!(estimated_moved(&track, 42, true));
        let parked = WorkerTrack {
            activity: 42,
            ..worker(3, 5, 0)
        };
        assert!(estimated_moved(&parked, 42, false));
    }

    #[test]
    fn reports_come_again_each_time_the_duration_doubles() {
        // Detected at 55 ms: the next report is due at 110 ms, then at twice that.
        let mut next = 110 * MS;
        let mut reported = Vec::new();
        for elapsed in (60..=1_000).step_by(10).map(|ms| ms * MS) {
            if let Some(after) = report_due(elapsed, next) {
                reported.push(elapsed);
                next = after;
            }
        }
        assert_eq!(reported, [110 * MS, 220 * MS, 440 * MS, 880 * MS]);
    }

    #[test]
    fn an_undriven_runtime_is_asked_again_less_often_when_it_does_not_answer() {
        assert_eq!(recheck_wait(5 * MS, 0), 20 * MS, "at least MIN_RECHECK");
        assert_eq!(recheck_wait(50 * MS, 0), 50 * MS);
        assert_eq!(recheck_wait(50 * MS, 2), 200 * MS);
        assert_eq!(
            recheck_wait(50 * MS, 99),
            50 * MS * 64,
            "at most 64 thresholds"
        );
    }
}
