//! Where a stall report goes: the WARN log line (target `looplag`, rate limited, with a
//! summary line for what the limit held back) and the `on_stall` callback (every report).
//!
//! When the subscriber's filters drop looplag's WARN lines at the moment there is a stall to
//! report (a global `EnvFilter` at ERROR, as many servers install by default, or no global
//! subscriber at all), looplag says so once per process on stderr (see [`tell_if_silenced`]).

use std::io::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
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
        tell_if_silenced(&self.runtime_name);
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

/// Whether the process was told that looplag's WARN lines are filtered out.
static TOLD_SILENCED: AtomicBool = AtomicBool::new(false);

/// The text written to stderr, once per process, when looplag's WARN lines are filtered out
/// while it has a stall to report.
const SILENCED_NOTICE: &str = "looplag: a stall was detected but looplag's \
    WARN log lines (target `looplag`) are filtered out by the tracing subscriber (a global \
    filter such as an EnvFilter or RUST_LOG below WARN for `looplag`, or no global \
    subscriber): stall metrics, stall spans and the on_stall callback are unaffected; add \
    the directive `looplag=warn` to the filter, or filter per layer (README, \"Setup\"), to \
    see the stall lines. This note is written once per process.";

/// Writes [`SILENCED_NOTICE`] to stderr, once per process, if a WARN line of target
/// `looplag` would be dropped by the subscriber of this (the watchdog's) thread right now.
///
/// stderr because it is the one path that the filter in question cannot hide, and that a
/// user who set filters still reads (terminal, container log, journal); a `tracing` event of
/// any level could be dropped by the same filter. Once per process because it is about the
/// setup, not about a stall: the stall itself still reaches metrics, spans and `on_stall`.
/// The check is `tracing::enabled!`, which after the first call reads the callsite's cached
/// interest (and asks the subscriber only when that interest is "sometimes").
fn tell_if_silenced(runtime_name: &str) {
    if TOLD_SILENCED.load(Ordering::Relaxed)
        || tracing::enabled!(target: "looplag", tracing::Level::WARN)
        || TOLD_SILENCED.swap(true, Ordering::Relaxed)
    {
        return;
    }
    // Nothing else can be done if stderr is closed: never panic over it.
    let _ = writeln!(
        std::io::stderr().lock(),
        "{SILENCED_NOTICE} (runtime `{runtime_name}`)"
    );
}
