//! Every name looplag puts on the wire, and the OpenTelemetry instruments that carry them.
//!
//! Dashboards, alert rules and tests depend on these names (README's "What you get" and
//! `collector/`, whose Prometheus series `collector/series.txt` lists and this module's test
//! derives); change one only together with all of its users.

use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider};
use opentelemetry::trace::{SpanBuilder, Tracer as _};
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

/// Histogram `s`: blocked time of each ended stall, recorded when the stall ends and its
/// culprit frame is known (the stack's symbols may arrive a moment after the end).
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
/// Attribute (stall span, stall duration histogram): the culprit frame's function, fully
/// qualified, without `::{{closure}}` suffixes. On the histogram, bounded per instance
/// (`max_culprit_functions`, then [`CULPRIT_OTHER`]), and [`CULPRIT_UNKNOWN`] without one.
pub(crate) const CODE_FUNCTION_NAME: &str = "code.function.name";
/// Stall span attribute: source file of the culprit frame, when debug info has it.
pub(crate) const CODE_FILE_PATH: &str = "code.file.path";
/// Stall span attribute: source line of the culprit frame (int), when debug info has it.
pub(crate) const CODE_LINE_NUMBER: &str = "code.line.number";
/// `code.function.name` on the histogram for a stall without a culprit frame.
pub(crate) const CULPRIT_UNKNOWN: &str = "unknown";
/// `code.function.name` on the histogram past `max_culprit_functions` distinct names.
pub(crate) const CULPRIT_OTHER: &str = "other";
/// Stall span attribute: `not_found` when a stack was captured but none of its frames is
/// the application's (only set then; without a stack, `stack_status` says why).
pub(crate) const CULPRIT_STATUS: &str = "tokio.eventloop.stall.culprit_status";
/// Attribute: file of the blocked task's spawn location, when known (`tokio_unstable`).
pub(crate) const TASK_SPAWN_FILE: &str = "tokio.task.spawn.file";
/// Attribute: line of the blocked task's spawn location (int), when known (`tokio_unstable`).
pub(crate) const TASK_SPAWN_LINE: &str = "tokio.task.spawn.line";
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

/// Default explicit bucket boundaries (s) of both histograms (the product's telemetry contract).
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

/// An instance's instruments, kept on the watchdog thread.
///
/// Without a meter given to the builder they come from the global meter provider, and follow
/// it: instruments made from the no-op provider stay no-op forever, and with
/// `#[looplag::main]` the instance exists before `main`'s body installs the application's
/// providers. [`refresh`](Telemetry::refresh) (once per tick) makes them anew from the
/// provider installed since.
pub(crate) struct Telemetry {
    instruments: Instruments,
    /// The address of the global meter provider the instruments come from; `None` when a
    /// meter was given.
    global: Option<usize>,
    runtime_name: String,
}

impl Telemetry {
    /// The instruments on `meter`, or on the global meter provider's `looplag` scope.
    pub(crate) fn new(meter: Option<&Meter>, runtime_name: &str) -> Self {
        let (instruments, global) = match meter {
            Some(meter) => (Instruments::new(meter, runtime_name), None),
            None => {
                let provider = opentelemetry::global::meter_provider();
                let meter = provider.meter_with_scope(scope());
                let address = provider_address(&provider);
                (Instruments::new(&meter, runtime_name), Some(address))
            }
        };
        Telemetry {
            instruments,
            global,
            runtime_name: runtime_name.to_string(),
        }
    }

    /// Makes the instruments anew if they come from the global meter provider and another
    /// one was installed since (a read lock and a pointer comparison otherwise).
    pub(crate) fn refresh(&mut self) {
        let Some(address) = self.global else {
            return;
        };
        let provider = opentelemetry::global::meter_provider();
        let current = provider_address(&provider);
        if current != address {
            let meter = provider.meter_with_scope(scope());
            self.instruments = Instruments::new(&meter, &self.runtime_name);
            self.global = Some(current);
        }
    }

    pub(crate) fn instruments(&self) -> &Instruments {
        &self.instruments
    }
}

fn provider_address(provider: &std::sync::Arc<dyn MeterProvider + Send + Sync>) -> usize {
    std::sync::Arc::as_ptr(provider).cast::<()>() as usize
}

/// Starts a span with `tracer`, or without one with the global tracer provider's `looplag`
/// scope as it is now (stall spans are rare: asking the global provider each time follows a
/// provider installed after looplag was built).
pub(crate) fn start_span(
    tracer: Option<&BoxedTracer>,
    builder: SpanBuilder,
    parent: &opentelemetry::Context,
) -> BoxedSpan {
    match tracer {
        Some(tracer) => tracer.build_with_context(builder, parent),
        None => {
            opentelemetry::global::tracer_with_scope(scope()).build_with_context(builder, parent)
        }
    }
}

/// The instrumentation scope `looplag` with this crate's version.
pub(crate) fn scope() -> opentelemetry::InstrumentationScope {
    opentelemetry::InstrumentationScope::builder(SCOPE)
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// The table of Prometheus series and OpenTelemetry names that `collector/` may use
/// (`collector/series.txt`, read by `scripts/check_collector_config.py`), derived from the
/// instruments above as the collector's `prometheus` exporter names them.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::StallKind;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    use std::collections::{BTreeMap, BTreeSet};

    /// The committed table, relative to the crate root.
    const TABLE: &str = "collector/series.txt";
    /// Set to `1` to rewrite [`TABLE`] instead of comparing with it.
    const BLESS: &str = "LOOPLAG_BLESS";

    /// Labels the collector's `prometheus` exporter puts on every series: `job` and `instance`
    /// from the resource's `service.name` and `service.instance.id`, and the instrumentation
    /// scope (opentelemetry-collector-contrib#40004).
    const EXPORTER_LABELS: [&str; 5] = [
        "job",
        "instance",
        "otel_scope_name",
        "otel_scope_version",
        "otel_scope_schema_url",
    ];

    /// Every stall kind, by an exhaustive match: a new kind fails to compile here.
    fn stall_kinds() -> Vec<StallKind> {
        let all = [StallKind::Cpu, StallKind::Blocked, StallKind::Mixed];
        for kind in all {
            match kind {
                StallKind::Cpu | StallKind::Blocked | StallKind::Mixed => {}
            }
        }
        all.to_vec()
    }

    /// Attribute names of the stall span and the victim event. The metrics' attributes (as
    /// labels) come from the exported data points instead.
    const SPAN_ATTRIBUTES: [&str; 22] = [
        RUNTIME_NAME,
        THREAD_ID,
        THREAD_NAME,
        CODE_STACKTRACE,
        TASK_ID,
        TASK_SPAWN_FILE,
        TASK_SPAWN_LINE,
        CODE_FUNCTION_NAME,
        CODE_FILE_PATH,
        CODE_LINE_NUMBER,
        CULPRIT_STATUS,
        WORKER_INDEX,
        STALL_EXACT,
        STALL_KIND,
        STALL_CPU_TIME,
        STALL_SYSCALL,
        STACK_STATUS,
        VICTIM_DURATION,
        VICTIM_TRACE_ID,
        VICTIM_SPAN_ID,
        VICTIMS,
        VICTIMS_DROPPED,
    ];

    /// OpenTelemetry name to Prometheus name, as otlptranslator's `MetricNamer` does with
    /// suffixes and without UTF-8 (the exporter's default `UnderscoreEscapingWithSuffixes`):
    /// every character outside `[a-zA-Z0-9:]` becomes `_`, then the unit's word.
    fn prometheus_base(name: &str, unit: &str) -> String {
        let mut out: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == ':' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let word = match unit {
            "s" => Some("seconds"),
            // A unit in braces is an annotation ({stall}); "1" is dimensionless.
            "1" => None,
            u if u.starts_with('{') && u.ends_with('}') => None,
            other => panic!(
                "unit {other:?}: add its Prometheus word (otlptranslator unit_namer.go) here"
            ),
        };
        if let Some(word) = word {
            if !out.split('_').any(|token| token == word) {
                out.push('_');
                out.push_str(word);
            }
        }
        out
    }

    /// Attribute key to label: every character outside `[a-zA-Z0-9_]` becomes `_`.
    fn prometheus_label(key: &str) -> String {
        key.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// A bucket bound as the exporter writes `le` (Go `strconv.FormatFloat(b, 'g', -1, 64)`),
    /// which Rust's `{}` matches in this range.
    fn le_value(bound: f64) -> String {
        assert!(
            (1e-4..1e6).contains(&bound),
            "bound {bound}: Go writes it with an exponent; teach le_value that form"
        );
        format!("{bound}")
    }

    /// Builds the crate's instruments on an in-memory SDK, records one value with every
    /// attribute set the crate uses, and renders the table.
    fn expected_table() -> String {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        let instruments = Instruments::new(&provider.meter_with_scope(scope()), "main");
        instruments.delay.record(0.001, &instruments.attributes);
        let kinds = stall_kinds();
        for kind in &kinds {
            // As the watchdog records stalls: the runtime attribute plus the stall kind.
            let mut attributes = instruments.attributes.to_vec();
            attributes.push(KeyValue::new(STALL_KIND, kind.as_str()));
            instruments.stalls.add(1, &attributes);
            // The duration histogram also carries the culprit's function (bounded, open-ended
            // values: no `values` line).
            attributes.push(KeyValue::new(CODE_FUNCTION_NAME, "app::handler"));
            instruments.stall_duration.record(1.0, &attributes);
        }
        provider.force_flush().expect("flush metrics");
        let exports = exporter.get_finished_metrics().expect("read metrics");

        let mut metrics = BTreeMap::new(); // OTel name -> line
        let mut series = BTreeMap::new(); // Prometheus name -> labels
        let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut le: Vec<f64> = Vec::new();
        for scope_metrics in exports.iter().flat_map(|e| e.scope_metrics()) {
            assert_eq!(scope_metrics.scope().name(), SCOPE);
            for metric in scope_metrics.metrics() {
                let mut labels = BTreeSet::new();
                let mut note = |key: &str, value: String| {
                    let label = prometheus_label(key);
                    if key == STALL_KIND {
                        values.entry(label.clone()).or_default().insert(value);
                    }
                    labels.insert(label);
                };
                let base = prometheus_base(metric.name(), metric.unit());
                let (kind, names) = match metric.data() {
                    AggregatedMetrics::U64(MetricData::Sum(sum)) if sum.is_monotonic() => {
                        for point in sum.data_points() {
                            for kv in point.attributes() {
                                note(kv.key.as_str(), kv.value.to_string());
                            }
                        }
                        ("counter", vec![(format!("{base}_total"), false)])
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(histogram)) => {
                        for point in histogram.data_points() {
                            for kv in point.attributes() {
                                note(kv.key.as_str(), kv.value.to_string());
                            }
                            for bound in point.bounds() {
                                if !le.contains(&bound) {
                                    le.push(bound);
                                }
                            }
                        }
                        let names = vec![
                            (format!("{base}_bucket"), true),
                            (format!("{base}_sum"), false),
                            (format!("{base}_count"), false),
                        ];
                        ("histogram", names)
                    }
                    other => panic!(
                        "{}: {other:?}: teach this test its Prometheus names",
                        metric.name()
                    ),
                };
                let unit = metric.unit();
                metrics.insert(
                    metric.name().to_string(),
                    format!("metric {} {kind} {unit} {base}", metric.name()),
                );
                for (name, bucket) in names {
                    let mut labels = labels.clone();
                    if bucket {
                        labels.insert("le".to_string());
                    }
                    series.insert(name, labels);
                }
            }
        }
        assert_eq!(metrics.len(), 3, "one entry per instrument of Instruments");
        le.sort_by(f64::total_cmp);
        let mut le: Vec<String> = le.into_iter().map(le_value).collect();
        le.push("+Inf".to_string());

        let mut out = String::new();
        out.push_str(concat!(
            "# What looplag emits, as collector/ (alerts, their tests, dashboard, collector\n",
            "# config) may name it. Generated by the unit test in src/telemetry.rs from the crate's\n",
            "# instruments and names: do not edit; regenerate with\n",
            "#     LOOPLAG_BLESS=1 cargo test --lib telemetry\n",
            "# Read by scripts/check_collector_config.py.\n",
            "#\n",
            "# Prometheus names are those of the collector's prometheus exporter with its default\n",
            "# translation_strategy UnderscoreEscapingWithSuffixes (otlptranslator): characters\n",
            "# outside [a-zA-Z0-9:] become _, unit s adds _seconds, a unit in braces adds nothing,\n",
            "# counters add _total, histograms are _bucket (with le), _sum and _count.\n",
            "#\n",
            "# metric <OpenTelemetry name> <instrument> <unit> <Prometheus base name>\n",
        ));
        for line in metrics.values() {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("# series <Prometheus name> <label>... (besides the exporter labels)\n");
        for (name, labels) in &series {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            out.push_str(&format!("series {name} {}\n", labels.join(" ")));
        }
        out.push_str("# exporter_labels <label>... (on every series)\n");
        out.push_str(&format!("exporter_labels {}\n", EXPORTER_LABELS.join(" ")));
        out.push_str("# values <label> <value>... (every value the label takes)\n");
        out.push_str(&format!("values le {}\n", le.join(" ")));
        for (label, set) in &values {
            let set: Vec<&str> = set.iter().map(String::as_str).collect();
            out.push_str(&format!("values {label} {}\n", set.join(" ")));
        }
        out.push_str("# span <name>, event <name>, attribute <name>: the traces side\n");
        out.push_str(&format!("span {STALL_SPAN}\nevent {VICTIM_EVENT}\n"));
        let attributes: BTreeSet<&str> = SPAN_ATTRIBUTES.into_iter().collect();
        for attribute in attributes {
            out.push_str(&format!("attribute {attribute}\n"));
        }
        out
    }

    #[test]
    fn collector_series_table_matches_the_instruments() {
        let expected = expected_table();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(TABLE);
        if std::env::var(BLESS).is_ok_and(|v| v == "1") {
            std::fs::write(&path, &expected).expect("write the table");
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == expected,
            "{TABLE} does not match the instruments and names of src/telemetry.rs.\n\
             Regenerate it with `{BLESS}=1 cargo test --lib telemetry`, then update what in \
             collector/ uses a changed name (scripts/check_collector_config.py finds it).\n\
             Expected content:\n{expected}"
        );
    }
}
