//! The one clock of the hot path: a calibrated TSC read through `quanta`.
//!
//! `raw()` is the only clock read a worker thread ever does, once per poll start (and once
//! more at the end of a poll the watchdog has flagged). Raw values are converted to
//! nanoseconds and to wall-clock time on the watchdog thread only.

#[cfg(not(all(test, looplag_loom)))]
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// The bits of a raw timestamp: 62, so that a slot's activity word has two flag bits above
/// them (see `hot::slots`).
pub(crate) const TS_MASK: u64 = (1 << 62) - 1;

#[cfg(not(all(test, looplag_loom)))]
static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();

/// Calibrates the clock if needed. Called from `build()`, never from a hook.
#[cfg(not(all(test, looplag_loom)))]
pub(crate) fn init() {
    CLOCK.get_or_init(quanta::Clock::new);
}

/// The current raw counter value, masked to 62 bits (see `slots`). Zero before `init`.
#[cfg(not(all(test, looplag_loom)))]
#[inline]
pub(crate) fn raw() -> u64 {
    match CLOCK.get() {
        Some(clock) => clock.raw() & TS_MASK,
        None => 0,
    }
}

/// Nanoseconds from `start` to `end` (zero when `end` is not after `start`).
#[cfg(not(all(test, looplag_loom)))]
pub(crate) fn delta(start: u64, end: u64) -> Duration {
    match CLOCK.get() {
        Some(clock) => clock.delta(start, end),
        None => Duration::ZERO,
    }
}

/// Model checking (`--cfg looplag_loom`): a fake clock that ticks once per read, so every read is
/// strictly later than every read before it in the execution loom is exploring (loom runs
/// one modelled thread at a time), and runs are deterministic.
#[cfg(all(test, looplag_loom))]
static FAKE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Model checking: nothing to calibrate.
#[cfg(all(test, looplag_loom))]
pub(crate) fn init() {}

/// Model checking: the next tick of the fake clock.
#[cfg(all(test, looplag_loom))]
pub(crate) fn raw() -> u64 {
    FAKE.fetch_add(1, std::sync::atomic::Ordering::SeqCst) & TS_MASK
}

/// Model checking: one tick is one nanosecond.
#[cfg(all(test, looplag_loom))]
pub(crate) fn delta(start: u64, end: u64) -> Duration {
    Duration::from_nanos(end.saturating_sub(start))
}

/// A pairing of a raw counter value with the wall clock, taken together, used to convert
/// raw timestamps to `SystemTime` for OpenTelemetry. The watchdog takes a fresh one every
/// tick, so TSC drift against the wall clock never accumulates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Anchor {
    pub(crate) raw: u64,
    pub(crate) system: SystemTime,
}

impl Anchor {
    /// Reads both clocks now.
    pub(crate) fn now() -> Self {
        let raw = raw();
        Anchor {
            raw,
            system: SystemTime::now(),
        }
    }

    /// The wall-clock time of raw timestamp `at`.
    pub(crate) fn system_time(&self, at: u64) -> SystemTime {
        if at <= self.raw {
            let back = delta(at, self.raw);
            self.system.checked_sub(back).unwrap_or(self.system)
        } else {
            let ahead = delta(self.raw, at);
            self.system.checked_add(ahead).unwrap_or(self.system)
        }
    }
}
