//! The delay probe: a tiny task injected into the runtime every sample interval, which
//! records how long it waited to be polled.
//!
//! At most one probe is in flight. While the runtime is stuck the watchdog does not spawn
//! more; when the stuck probe finally runs, every sample that was skipped is recorded with
//! the delay a probe spawned at that tick would have seen (coordinated omission
//! correction), so a 1 s stall weighs like 1 s of bad latency, not like one sample.
//!
//! While the runtime idles the watchdog dozes (`doze.rs`) and spawns no probe; the first
//! probe after a doze counts once for every interval the doze lasted, so the histogram still
//! holds one sample per sample interval of the runtime's life.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock;

/// Most back-filled samples recorded for one stuck probe (100 000 × 10 ms = 1000 s).
const MAX_BACKFILL: u64 = 100_000;
/// Most samples one probe's delay counts for after a doze.
const MAX_WEIGHT: u32 = 1_000;

/// What collecting the in-flight probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Collected {
    /// No probe was in flight.
    Nothing,
    /// The probe has not been polled yet.
    Stuck,
    /// The probe ran; its delay was recorded.
    Sample,
}

#[derive(Debug)]
pub(crate) struct Probe {
    /// Raw time of the in-flight probe's first poll; 0 while it waits.
    polled: Arc<AtomicU64>,
    /// Raw time the in-flight probe was spawned.
    in_flight: Option<u64>,
    /// The in-flight probe's task: finished without being polled means the runtime shut
    /// down (tokio cancels the tasks of a runtime that shuts down, and any task spawned
    /// after).
    task: Option<tokio::task::JoinHandle<()>>,
    /// How many samples the in-flight probe's delay counts for.
    weight: u32,
    /// Ticks skipped while the probe waited: how many, and the raw time of the first.
    skipped: u64,
    first_skipped: u64,
    interval: Duration,
}

impl Probe {
    pub(crate) fn new(interval: Duration) -> Self {
        Probe {
            polled: Arc::new(AtomicU64::new(0)),
            in_flight: None,
            task: None,
            weight: 1,
            skipped: 0,
            first_skipped: 0,
            interval,
        }
    }

    /// Collects the in-flight probe, if any, calling `record` with each sample (in seconds).
    pub(crate) fn collect(&mut self, now: u64, mut record: impl FnMut(f64)) -> Collected {
        let Some(spawned) = self.in_flight else {
            return Collected::Nothing;
        };
        let polled = self.polled.load(Ordering::Acquire);
        if polled == 0 {
            if self.skipped == 0 {
                self.first_skipped = now;
            }
            self.skipped = self.skipped.saturating_add(1);
            return Collected::Stuck;
        }
        let delay = clock::delta(spawned, polled).as_secs_f64();
        // A probe that stands for several intervals (spawned after the watchdog dozed)
        // counts that many times, unless it got stuck: then the back-fill below accounts
        // for the time instead.
        let weight = if self.skipped == 0 { self.weight } else { 1 };
        for _ in 0..weight {
            record(delay);
        }
        self.backfill(polled, &mut record);
        self.in_flight = None;
        Collected::Sample
    }

    /// Spawns the next probe. `weight` is how many sample intervals its sample stands for:
    /// 1, or more after the watchdog dozed and sampled nothing for a while.
    pub(crate) fn spawn(&mut self, handle: &tokio::runtime::Handle, weight: u32) {
        if self.in_flight.is_some() {
            return;
        }
        self.weight = weight.clamp(1, MAX_WEIGHT);
        self.polled.store(0, Ordering::Release);
        let polled = Arc::clone(&self.polled);
        let spawned = clock::raw();
        self.in_flight = Some(spawned);
        // The probe must be as cheap as possible: one clock read and one store.
        self.task = Some(handle.spawn(async move {
            polled.store(clock::raw().max(1), Ordering::Release);
        }));
    }

    /// Records, for every skipped tick, the delay a probe spawned then would have seen.
    fn backfill(&mut self, polled: u64, record: &mut impl FnMut(f64)) {
        if self.skipped == 0 {
            return;
        }
        let waited_from_first = clock::delta(self.first_skipped, polled);
        let interval = self.interval.as_secs_f64();
        let mut delay = waited_from_first.as_secs_f64();
        for _ in 0..self.skipped.min(MAX_BACKFILL) {
            if delay <= 0.0 {
                break;
            }
            record(delay);
            delay -= interval;
        }
        self.skipped = 0;
    }

    /// Whether the runtime has shut down: the in-flight probe was cancelled unpolled.
    ///
    /// `is_finished` is read first: a probe that ran stored `polled` before finishing, so
    /// once it is seen finished, its store is visible.
    pub(crate) fn runtime_shut_down(&self) -> bool {
        self.task.as_ref().is_some_and(|task| task.is_finished())
            && self.polled.load(Ordering::Acquire) == 0
    }
}
