//! What looplag tells the `on_stall` callback and the log about one stall.

use std::fmt;
use std::panic::Location;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanId, TraceId};

use crate::diagnose::StallKind;

pub(crate) mod log;
mod ratelimit;

/// One frame of a stalled thread's stack, innermost first in [`StackCapture::Captured`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StackFrame {
    /// The demangled function name, or `<unknown>`.
    pub function: String,
    /// The source file, when debug info has it.
    pub file: Option<String>,
    /// The source line, when debug info has it.
    pub line: Option<u32>,
    /// The code address of the frame (the same for a function and the frames inlined into
    /// it); 0 when there is none, as for the marker of frames cut from a long stack.
    pub address: usize,
}

impl fmt::Display for StackFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.function)?;
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, " at {file}:{line}"),
            (Some(file), None) => write!(f, " at {file}"),
            (None, _) if self.address != 0 => write!(f, " at {:#x}", self.address),
            (None, _) => Ok(()),
        }
    }
}

/// The stack of the blocked thread, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StackCapture {
    /// Taken while the thread was blocked, innermost frame first, signal frames removed.
    Captured(Vec<StackFrame>),
    /// Pending: being taken (looplag's capture thread signals the blocked thread at
    /// detection and waits up to 100 ms for it) and symbolized (on looplag's symbolizer
    /// thread; debug info loads slowly the first time). No report waits for it: the first
    /// report of a stall usually says this, and later reports of the same stall, its span
    /// and its end report carry the frames, or why there are none.
    Symbolizing,
    /// Not taken: [`max_stacks_per_minute`](crate::Builder::max_stacks_per_minute) was
    /// reached. `suppressed` counts every capture skipped so far by this instance.
    RateLimited {
        /// Captures suppressed by the rate limit since the watchdog started.
        suppressed: u64,
    },
    /// Not taken: [`capture_stacks`](crate::Builder::capture_stacks) is off.
    Disabled,
    /// Not taken: stack capture is implemented for Linux x86_64 only.
    Unsupported,
    /// Not taken: the blocked thread is not known (a stall estimated from tokio's metrics).
    UnknownThread,
    /// The capture was attempted and failed; the text says why.
    Failed(String),
}

impl StackCapture {
    /// The frames, when the stack was captured.
    pub fn frames(&self) -> Option<&[StackFrame]> {
        match self {
            StackCapture::Captured(frames) => Some(frames),
            _ => None,
        }
    }

    /// A short machine-readable reason when no stack was taken (`rate_limited`, `disabled`,
    /// `unsupported`, `unknown_thread`, `failed`).
    pub fn status(&self) -> &'static str {
        match self {
            StackCapture::Captured(_) => "captured",
            StackCapture::Symbolizing => "symbolizing",
            StackCapture::RateLimited { .. } => "rate_limited",
            StackCapture::Disabled => "disabled",
            StackCapture::Unsupported => "unsupported",
            StackCapture::UnknownThread => "unknown_thread",
            StackCapture::Failed(_) => "failed",
        }
    }
}

/// The culprit of a stall: the first frame of the blocked thread's stack that belongs to the
/// application rather than to the standard library, tokio or the crates between (futures,
/// hyper, axum, tower, tonic, …), or why there is none.
///
/// Frames are told apart by their source file (the cargo registry and the Rust sources are
/// library code, the rest is the application's), by their crate name when the binary has no
/// line tables, and by [`library_prefixes`](crate::Builder::library_prefixes). When no frame
/// qualifies, looplag says so rather than guess.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Culprit {
    /// The first application frame, innermost first. Its `function` is the fully qualified
    /// path without `::{{closure}}` suffixes (`app::db::legacy_lookup`, also for the body of
    /// an `async fn`); `file` and `line` are those of the frame.
    Found(StackFrame),
    /// A stack was captured, but none of its frames could be told to be the application's:
    /// every frame is library code (or a function the settings mark as such).
    NotFound,
    /// No stack, so no culprit: see [`StallReport::stack`] for why (rate limited,
    /// unsupported platform, still being symbolized, …).
    NoStack,
}

impl Culprit {
    /// The culprit frame, when one was found.
    pub fn frame(&self) -> Option<&StackFrame> {
        match self {
            Culprit::Found(frame) => Some(frame),
            _ => None,
        }
    }

    /// A short machine-readable status: `found`, `not_found` or `no_stack`.
    pub fn status(&self) -> &'static str {
        match self {
            Culprit::Found(_) => "found",
            Culprit::NotFound => "not_found",
            Culprit::NoStack => "no_stack",
        }
    }
}

/// How many stack frames the one-line summary (and the WARN log) shows.
const TOP_FRAMES: usize = 8;

/// Whether a [`StallReport`] describes a stall that is still going on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StallState {
    /// The worker is still blocked; `duration` is how long it has been so far.
    InProgress,
    /// The blocking poll returned; `duration` is the whole stall.
    Ended,
}

/// One report about one stall, given to the [`on_stall`](crate::Builder::on_stall) callback.
///
/// A stall is reported when it is detected, again each time its duration doubles while it
/// lasts, and once when it ends. Fields that looplag could not learn are `None`.
///
/// # Examples
///
/// ```
/// use looplag::{StallReport, StallState};
///
/// fn alert(report: &StallReport) {
///     if report.state == StallState::Ended && report.duration.as_secs() >= 1 {
///         eprintln!("long stall: {report}");
///     }
/// }
/// # let _ = alert;
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StallReport {
    /// The runtime's `tokio.runtime.name`.
    pub runtime_name: String,
    /// In progress or ended.
    pub state: StallState,
    /// How long the worker has been (or was) blocked in the poll.
    pub duration: Duration,
    /// When the blocking poll started.
    pub started_at: SystemTime,
    /// `true` when start and end were taken at the poll's boundaries (a poll inside a span,
    /// or any poll with tokio's poll hooks); `false` when they were estimated from the
    /// watchdog's samples, to within one sample interval.
    pub exact: bool,
    /// 1 for the first report of this stall, then 2, 3, …
    pub report_number: u32,
    /// OS thread id of the blocked thread, when known.
    pub thread_id: Option<i64>,
    /// Name of the blocked thread, when known.
    pub thread_name: Option<String>,
    /// Tokio worker index of the blocked worker, when known.
    pub worker_index: Option<usize>,
    /// Name of the innermost span entered on the blocked thread, when there is one.
    pub span_name: Option<&'static str>,
    /// Trace id of the stall span.
    pub trace_id: Option<TraceId>,
    /// Span id of the stall span.
    pub span_id: Option<SpanId>,
    /// Id of the blocked task (with `--cfg tokio_unstable`).
    pub task_id: Option<u64>,
    /// Where the blocked task was spawned (with `--cfg tokio_unstable`).
    pub spawn_location: Option<&'static Location<'static>>,
    /// What the thread was doing: on the CPU, blocked in the kernel, or both (Linux).
    pub kind: Option<StallKind>,
    /// CPU time the thread used during the stall (Linux; estimated from the observed part
    /// of the stall while it is in progress).
    pub cpu_time: Option<Duration>,
    /// The system call the thread was blocked in when the stall was detected (Linux).
    pub syscall: Option<&'static str>,
    /// How long the thread was runnable but waiting for a CPU during the stall (the run
    /// queue delay, Linux; ended stalls only): time a busy machine took from the poll, not
    /// time the poll's code spent. Measured from detection to the end and applied to the
    /// whole stall in proportion.
    pub run_queue_wait: Option<Duration>,
    /// The blocked thread's stack, taken once when the stall was detected.
    pub stack: StackCapture,
    /// The application frame the thread was blocked in, found in [`stack`](Self::stack).
    pub culprit: Culprit,
    /// Number of waiting request spans that got the victim event (ended stalls only).
    pub victims: usize,
    /// Number of waiting request spans over the [`max_victims`](crate::Builder::max_victims)
    /// bound that did not (ended stalls only).
    pub victims_dropped: usize,
}

impl fmt::Display for StallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.state {
            StallState::InProgress => "has been blocked for",
            StallState::Ended => "was blocked for",
        };
        match &self.culprit {
            Culprit::Found(frame) => {
                write!(f, "blocked in `{}`", frame.function)?;
                match (&frame.file, frame.line) {
                    (Some(file), Some(line)) => write!(f, " at {file}:{line}")?,
                    (Some(file), None) => write!(f, " at {file}")?,
                    (None, _) => {}
                }
                write!(f, ": ")?;
            }
            Culprit::NotFound => write!(
                f,
                "blocked in library code only (no application frame in the stack): "
            )?,
            Culprit::NoStack => {}
        }
        write!(
            f,
            "runtime `{}` {verb} {:.1} ms",
            self.runtime_name,
            self.duration.as_secs_f64() * 1e3
        )?;
        if !self.exact {
            write!(f, " (estimated)")?;
        }
        match (&self.thread_name, self.thread_id) {
            (Some(name), Some(id)) => write!(f, " on thread `{name}` (tid {id})")?,
            (None, Some(id)) => write!(f, " on thread tid {id}")?,
            _ => write!(f, " on an unidentified worker thread")?,
        }
        if let Some(index) = self.worker_index {
            write!(f, ", worker {index}")?;
        }
        match self.span_name {
            Some(span) => write!(f, ", in span `{span}`")?,
            None => write!(f, ", outside any span")?,
        }
        if let (Some(id), Some(location)) = (self.task_id, self.spawn_location) {
            write!(f, ", task {id} spawned at {location}")?;
        }
        if self.state == StallState::Ended {
            write!(f, "; {} waiting request(s) marked", self.victims)?;
            if self.victims_dropped > 0 {
                write!(
                    f,
                    ", {} more not marked (max_victims)",
                    self.victims_dropped
                )?;
            }
        }
        if let Some(kind) = self.kind {
            write!(f, "; {}", kind.as_str())?;
            if let Some(cpu) = self.cpu_time {
                write!(f, " ({:.1} ms on CPU)", cpu.as_secs_f64() * 1e3)?;
            }
            if let Some(syscall) = self.syscall {
                write!(f, ", waiting in {syscall}")?;
            }
        }
        if let Some(trace_id) = self.trace_id {
            write!(f, " [trace {trace_id}]")?;
        }
        match &self.stack {
            StackCapture::Captured(frames) => {
                for frame in frames.iter().take(TOP_FRAMES) {
                    write!(f, "\n    at {frame}")?;
                }
                if frames.len() > TOP_FRAMES {
                    write!(f, "\n    ... {} more frames", frames.len() - TOP_FRAMES)?;
                }
            }
            StackCapture::RateLimited { suppressed } => write!(
                f,
                "\n    (no stack: rate limited, {suppressed} capture(s) suppressed so far)"
            )?,
            StackCapture::Failed(reason) => write!(f, "\n    (no stack: {reason})")?,
            StackCapture::Symbolizing => {
                write!(f, "\n    (stack pending: being taken and symbolized)")?
            }
            StackCapture::Disabled | StackCapture::Unsupported | StackCapture::UnknownThread => {}
        }
        if let Some(kind) = self.kind {
            write!(f, "\n    advice: {}", crate::diagnose::advice(kind))?;
        }
        Ok(())
    }
}
