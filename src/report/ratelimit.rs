//! The stall log's rate limit: at most N stall log lines per second per instance, and one
//! summary line for the ones that were not written.
//!
//! Only the log is limited. Every stall is still counted, spanned and handed to the
//! `on_stall` callback: logs are for people, and a person learns nothing more from the
//! thousandth line of a second than from the tenth, while a process that formats and
//! writes a thousand lines a second gets slower exactly when it is already in trouble.
//!
//! Stack capture (signal + unwinding, built separately) is a different cost with its own
//! budget; it should get its own limiter and counter rather than share this one, so that a
//! quiet log setting never hides stacks and a stack budget never hides log lines.

use std::time::{Duration, Instant};

/// The length of one window.
const WINDOW: Duration = Duration::from_secs(1);

/// Counts stall log lines in one-second windows.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    limit: u32,
    /// When the current window began; `None` until a line is asked for.
    window_start: Option<Instant>,
    /// Lines written in the current window.
    written: u32,
    /// Lines not written in the current window.
    suppressed: u64,
}

impl LogLimiter {
    pub(crate) fn new(limit: u32) -> Self {
        LogLimiter {
            limit,
            window_start: None,
            written: 0,
            suppressed: 0,
        }
    }

    /// Ends the current window if it is a second old: returns how many lines it
    /// suppressed, when there were any, so the caller can log the summary.
    pub(crate) fn roll(&mut self, now: Instant) -> Option<u64> {
        let start = self.window_start?;
        if now.saturating_duration_since(start) < WINDOW {
            return None;
        }
        self.close()
    }

    /// Ends the current window now, whatever its age (the watchdog is stopping).
    pub(crate) fn close(&mut self) -> Option<u64> {
        self.window_start = None;
        self.written = 0;
        let suppressed = std::mem::take(&mut self.suppressed);
        (suppressed > 0).then_some(suppressed)
    }

    /// Whether one more stall line may be written now; counts it either way. Call
    /// [`roll`](LogLimiter::roll) first.
    pub(crate) fn admit(&mut self, now: Instant) -> bool {
        if self.window_start.is_none() {
            self.window_start = Some(now);
        }
        if self.written < self.limit {
            self.written = self.written.saturating_add(1);
            true
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_limit_lines_per_window_and_the_rest_is_counted() {
        let t0 = Instant::now();
        let mut limiter = LogLimiter::new(3);
        let admitted = (0..10)
            .filter(|i| {
                let now = t0 + Duration::from_millis(*i * 50);
                assert_eq!(limiter.roll(now), None);
                limiter.admit(now)
            })
            .count();
        assert_eq!(admitted, 3);
        // Not yet a second after the first line.
        assert_eq!(limiter.roll(t0 + Duration::from_millis(999)), None);
        assert_eq!(limiter.roll(t0 + WINDOW), Some(7));
        // A new window starts with the next line.
        let later = t0 + Duration::from_millis(1500);
        assert!(limiter.admit(later));
        assert_eq!(limiter.roll(later + Duration::from_millis(999)), None);
        assert_eq!(limiter.roll(later + WINDOW), None, "nothing suppressed");
    }

    #[test]
    fn zero_writes_no_line_and_counts_every_one() {
        let t0 = Instant::now();
        let mut limiter = LogLimiter::new(0);
        assert!(!limiter.admit(t0));
        assert!(!limiter.admit(t0));
        assert_eq!(limiter.close(), Some(2));
        assert_eq!(limiter.close(), None);
    }
}
