//! Every name looplag puts on the wire, and the OpenTelemetry instruments that carry them.
//!
//! Dashboards, alert rules and tests depend on these names (see DESIGN.md, "Telemetry
//! contract"); change one only together with all of its users.

use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::KeyValue;

/// Instrumentation scope name of every meter and tracer looplag creates.
pub(crate) const SCOPE: &str = "looplag";

/// Histogram `s`: delay between a probe becoming runnable and its first poll.
pub(crate) const DELAY: &str = "tokio.eventloop.delay";
const DELAY_DESCRIPTION: &str =
    "Delay between a probe task becoming runnable on the runtime and its first poll";

/// Counter `{stall}`: stalls detected (counted when detected, not when ended).
pub(crate) const STALLS: &str = "tokio.eventloop.stalls";
const STALLS_DESCRIPTION: &str =
    "Stalls detected: a runtime worker busy in one poll for at least the stall threshold";
const STALLS_UNIT: &str = "{stall}";

/// Histogram `s`: blocked time of each ended stall.
pub(crate) const STALL_DURATION: &str = "tokio.eventloop.stall.duration";
const STALL_DURATION_DESCRIPTION: &str = "Blocked time of each ended stall";

/// Unit of both histograms.
const SECONDS: &str = "s";

/// Name of the stall span and of the victim event.
pub(crate) const STALL_SPAN: &str = "tokio.eventloop.stall";
/// Name of the event added to every request span that waited during a stall.
pub(crate) const VICTIM_EVENT: &str = "tokio.eventloop.stall";

/// Attribute: the runtime's name, on every metric and span.
pub(crate) const RUNTIME_NAME: &str = "tokio.runtime.name";
/// Attribute: OS thread id of the blocked thread (int).
pub(crate) const THREAD_ID: &str = "thread.id";
/// Attribute: name of the blocked thread.
pub(crate) const THREAD_NAME: &str = "thread.name";
/// Attribute: the stack of the blocking code, when captured.
pub(crate) const CODE_STACKTRACE: &str = "code.stacktrace";
/// Attribute: id of the blocked task (int), when known.
pub(crate) const TASK_ID: &str = "tokio.task.id";
/// Attribute: file of the blocked task's spawn location, when known.
pub(crate) const CODE_FILE_PATH: &str = "code.file.path";
/// Attribute: line of the blocked task's spawn location (int), when known.
pub(crate) const CODE_LINE_NUMBER: &str = "code.line.number";
/// Attribute: tokio worker index of the blocked worker (int), when known.
pub(crate) const WORKER_INDEX: &str = "tokio.worker.index";
/// Attribute: `true` when start and end were taken at poll boundaries, `false` when they
/// were estimated from the watchdog's samples (uninstrumented stall on a stable build).
pub(crate) const STALL_EXACT: &str = "tokio.eventloop.stall.exact";

/// Attribute (stall span, stall counter, stall duration histogram): what the blocked thread
/// was doing: `cpu`, `blocked` or `mixed` (bounded cardinality).
pub(crate) const STALL_KIND: &str = "tokio.eventloop.stall.kind";
/// Stall span attribute: CPU time the blocked thread used during the stall (f64, s).
pub(crate) const STALL_CPU_TIME: &str = "tokio.eventloop.stall.cpu_time";
/// Stall span attribute: the system call the blocked thread was waiting in, when known.
pub(crate) const STALL_SYSCALL: &str = "tokio.eventloop.stall.syscall";
/// Stall span attribute: the name of the `tracing` span the stall happened in, set when that
/// span has no OpenTelemetry context (the stall span is then a root of its own trace).
pub(crate) const STALL_SPAN_NAME: &str = "tokio.eventloop.stall.span.name";
/// Stall span attribute: why no stack was taken (`rate_limited`, `unsupported`, …).
pub(crate) const STACK_STATUS: &str = "tokio.eventloop.stall.stack_status";

/// Victim event attribute: the stall's duration (f64, s).
pub(crate) const VICTIM_DURATION: &str = "tokio.eventloop.stall.duration";
/// Victim event attribute: trace id of the stall span (hex).
pub(crate) const VICTIM_TRACE_ID: &str = "tokio.eventloop.stall.trace_id";
/// Victim event attribute: span id of the stall span (hex).
pub(crate) const VICTIM_SPAN_ID: &str = "tokio.eventloop.stall.span_id";
/// Victim event attribute: how long that request was held up by the stall (f64, s): from
/// the stall's start (or from when the request became ready, when known) to its first poll
/// after the stall.
pub(crate) const VICTIM_WAIT: &str = "tokio.eventloop.stall.wait";
/// Victim event attribute: whether `tokio.eventloop.stall.wait` is exact (`true`) or an
/// upper bound (`false`: when the request became ready during the stall is unknown).
pub(crate) const VICTIM_WAIT_EXACT: &str = "tokio.eventloop.stall.wait.exact";
/// Stall span attribute: how many victim spans were marked.
pub(crate) const VICTIMS: &str = "tokio.eventloop.stall.victims";
/// Stall span attribute: how many victim spans were not marked because of the bound.
pub(crate) const VICTIMS_DROPPED: &str = "tokio.eventloop.stall.victims_dropped";

/// Default explicit bucket boundaries (s) of both histograms, from DESIGN.md.
pub(crate) const DEFAULT_BOUNDARIES: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The instruments of one looplag instance, with its runtime attribute.
#[derive(Clone)]
pub(crate) struct Instruments {
    pub(crate) delay: Histogram<f64>,
    pub(crate) stalls: Counter<u64>,
    pub(crate) stall_duration: Histogram<f64>,
    pub(crate) attributes: [KeyValue; 1],
}

impl std::fmt::Debug for Instruments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instruments")
            .field("attributes", &self.attributes)
            .finish_non_exhaustive()
    }
}

impl Instruments {
    /// Creates the three instruments on `meter`.
    pub(crate) fn new(meter: &Meter, runtime_name: &str) -> Self {
        Instruments {
            delay: meter
                .f64_histogram(DELAY)
                .with_unit(SECONDS)
                .with_description(DELAY_DESCRIPTION)
                .with_boundaries(DEFAULT_BOUNDARIES.to_vec())
                .build(),
            stalls: meter
                .u64_counter(STALLS)
                .with_unit(STALLS_UNIT)
                .with_description(STALLS_DESCRIPTION)
                .build(),
            stall_duration: meter
                .f64_histogram(STALL_DURATION)
                .with_unit(SECONDS)
                .with_description(STALL_DURATION_DESCRIPTION)
                .with_boundaries(DEFAULT_BOUNDARIES.to_vec())
                .build(),
            attributes: [KeyValue::new(RUNTIME_NAME, runtime_name.to_string())],
        }
    }
}

/// The meter looplag uses when none is given: the global meter provider's `looplag` scope.
pub(crate) fn default_meter() -> Meter {
    opentelemetry::global::meter_with_scope(scope())
}

/// The tracer looplag uses when none is given: the global tracer provider's `looplag` scope.
pub(crate) fn default_tracer() -> opentelemetry::global::BoxedTracer {
    opentelemetry::global::tracer_with_scope(scope())
}

/// The instrumentation scope `looplag` with this crate's version.
pub(crate) fn scope() -> opentelemetry::InstrumentationScope {
    opentelemetry::InstrumentationScope::builder(SCOPE)
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}
