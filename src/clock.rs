//! The one clock of the hot path: a calibrated TSC read through `quanta`.
//!
//! `raw()` is the only clock read a worker thread ever does, once per poll start (and once
//! more at the end of a poll the watchdog has flagged). Raw values are converted to
//! nanoseconds and to wall-clock time on the watchdog thread only.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();

/// Calibrates the clock if needed. Called from `build()`, never from a hook.
pub(crate) fn init() {
    CLOCK.get_or_init(quanta::Clock::new);
}

/// The current raw counter value, masked to 62 bits (see `slots`). Zero before `init`.
#[inline]
pub(crate) fn raw() -> u64 {
    match CLOCK.get() {
        Some(clock) => clock.raw() & crate::slots::TS_MASK,
        None => 0,
    }
}

/// Nanoseconds from `start` to `end` (zero when `end` is not after `start`).
pub(crate) fn delta(start: u64, end: u64) -> Duration {
    match CLOCK.get() {
        Some(clock) => clock.delta(start, end),
        None => Duration::ZERO,
    }
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
