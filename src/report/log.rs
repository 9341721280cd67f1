//! Where a stall report goes: the WARN log line (target `looplag`, rate limited, with a
//! summary line for what the limit held back) and the `on_stall` callback (every report).

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use super::ratelimit::LogLimiter;
use super::{StallReport, StallState};

/// The `on_stall` callback.
pub(crate) type StallCallback = Arc<dyn Fn(&StallReport) + Send + Sync>;

/// Publishes one instance's stall reports; lives on the watchdog thread.
pub(crate) struct Publisher {
    runtime_name: String,
    /// `max_stall_logs_per_second`, quoted by the summary line.
    max_per_second: u32,
    limiter: LogLimiter,
    callback: Option<StallCallback>,
}

impl Publisher {
    pub(crate) fn new(
        runtime_name: String,
        max_per_second: u32,
        callback: Option<StallCallback>,
    ) -> Self {
        Publisher {
            runtime_name,
            max_per_second,
            limiter: LogLimiter::new(max_per_second),
            callback,
        }
    }

    /// Logs the report (within the log's rate limit) and hands it to the callback (always).
    pub(crate) fn publish(&mut self, report: &StallReport) {
        let now = Instant::now();
        self.roll(now);
        if self.limiter.admit(now) {
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
        if let Some(callback) = &self.callback {
            if panic::catch_unwind(AssertUnwindSafe(|| callback(report))).is_err() {
                tracing::error!(target: "looplag", "the on_stall callback panicked");
            }
        }
    }

    /// Ends the log's window if it is a second old, writing the summary line for the lines
    /// it held back.
    pub(crate) fn roll(&mut self, now: Instant) {
        if let Some(suppressed) = self.limiter.roll(now) {
            self.log_suppressed(suppressed);
        }
    }

    /// Ends the log's window now (the watchdog is stopping).
    pub(crate) fn close(&mut self) {
        if let Some(suppressed) = self.limiter.close() {
            self.log_suppressed(suppressed);
        }
    }

    /// The summary line for stall log lines over the rate limit.
    fn log_suppressed(&self, suppressed: u64) {
        tracing::warn!(
            target: "looplag",
            runtime = %self.runtime_name,
            suppressed,
            "{suppressed} stall reports suppressed in the last second (max_stall_logs_per_second \
             is {}); metrics, spans and the on_stall callback still got every one",
            self.max_per_second
        );
    }
}
