//! Shared test harness: in-memory OpenTelemetry exporters, a global subscriber with
//! tracing-opentelemetry and looplag's layer, and helpers to read what was exported.
//!
//! Each test installs the global subscriber, so tests must run one per process:
//! `cargo nextest run` does that (CONTRIBUTING.md's test command uses it).
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use looplag::{LoopLag, StallReport, StallState};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::runtime::Runtime;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub struct Harness {
    pub spans: InMemorySpanExporter,
    pub metrics: InMemoryMetricExporter,
    pub tracer_provider: SdkTracerProvider,
    pub meter_provider: SdkMeterProvider,
    pub looplag: LoopLag,
    pub reports: Arc<Mutex<Vec<StallReport>>>,
}

/// Installs the global subscriber and builds a looplag instance with `configure` applied.
pub fn harness(configure: impl FnOnce(looplag::Builder) -> looplag::Builder) -> Harness {
    harness_with(configure, |looplag, tracer| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        tracing_subscriber::registry()
            // looplag's layer first: see "Layer order" in LoopLagLayer's docs.
            .with(looplag.layer())
            .with(tracing_opentelemetry::layer().with_tracer(tracer))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(filter),
            )
            .try_init()
            .expect("one global subscriber per test process: run the tests with cargo nextest");
    })
}

/// As [`harness`], with the global subscriber installed by `install`, which gets the
/// instance and the tracer for `tracing-opentelemetry`'s layer.
pub fn harness_with(
    configure: impl FnOnce(looplag::Builder) -> looplag::Builder,
    install: impl FnOnce(&LoopLag, opentelemetry_sdk::trace::Tracer),
) -> Harness {
    let spans = InMemorySpanExporter::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let metrics = InMemoryMetricExporter::default();
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(metrics.clone()).build())
        .build();
    let tracer = tracer_provider.tracer("test");
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&reports);
    let builder = LoopLag::builder()
        .meter(opentelemetry::metrics::MeterProvider::meter(
            &meter_provider,
            "looplag",
        ))
        .tracer(tracer_provider.tracer("looplag"))
        .on_stall(move |report| sink.lock().unwrap().push(report.clone()));
    let looplag = configure(builder).build().expect("valid looplag settings");
    install(&looplag, tracer);
    Harness {
        spans,
        metrics,
        tracer_provider,
        meter_provider,
        looplag,
        reports,
    }
}

use tracing_subscriber::Layer as _;

pub fn current_thread(looplag: &LoopLag) -> Runtime {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    looplag.hook_runtime(&mut builder);
    builder.build().expect("runtime")
}

pub fn multi_thread(looplag: &LoopLag, workers: usize) -> Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers).enable_all();
    looplag.hook_runtime(&mut builder);
    builder.build().expect("runtime")
}

impl Harness {
    /// All spans exported so far (flushes first).
    pub fn finished_spans(&self) -> Vec<SpanData> {
        self.tracer_provider.force_flush().expect("flush spans");
        self.spans.get_finished_spans().expect("read spans")
    }

    pub fn stall_spans(&self) -> Vec<SpanData> {
        self.finished_spans()
            .into_iter()
            .filter(|span| span.name == "tokio.eventloop.stall")
            .collect()
    }

    pub fn span_named(&self, name: &str) -> SpanData {
        let spans = self.finished_spans();
        let found: Vec<_> = spans.iter().filter(|span| span.name == name).collect();
        assert_eq!(found.len(), 1, "exactly one span named {name}: {found:#?}");
        found[0].clone()
    }

    pub fn reports(&self) -> Vec<StallReport> {
        self.reports.lock().unwrap().clone()
    }

    pub fn ended_reports(&self) -> Vec<StallReport> {
        self.reports()
            .into_iter()
            .filter(|report| report.state == StallState::Ended)
            .collect()
    }

    /// Waits up to `timeout` until exactly `n` stalls have ended and returns their reports;
    /// fails the test, listing every report so far, if that does not happen.
    #[track_caller]
    pub fn wait_ended(&self, n: usize, timeout: Duration) -> Vec<StallReport> {
        assert!(
            wait_until(timeout, || self.ended_reports().len() == n),
            "{n} ended stall report(s) within {timeout:?}: {:#?}",
            self.reports()
        );
        self.ended_reports()
    }

    /// Starts the watchdog on `runtime`, runs `culprit` as a task inside the span that `span`
    /// makes (both made inside `block_on`, where an application makes them), waits up to
    /// `timeout` for the one ended stall, stops the watchdog and returns that stall's report.
    #[track_caller]
    pub fn stall_in_span<F>(
        &self,
        runtime: &Runtime,
        span: impl FnOnce() -> tracing::Span,
        culprit: F,
        timeout: Duration,
    ) -> StallReport
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let watchdog = self.looplag.start(runtime.handle()).expect("start");
        run_in_span(runtime, span, culprit);
        let ended = self.wait_ended(1, timeout);
        drop(watchdog);
        ended[0].clone()
    }

    /// The latest exported metrics (flushes first).
    pub fn collect(&self) -> Vec<ResourceMetrics> {
        self.meter_provider.force_flush().expect("flush metrics");
        self.metrics.get_finished_metrics().expect("read metrics")
    }

    /// Sum of the counter `name` in the latest export.
    pub fn counter(&self, name: &str) -> u64 {
        let exports = self.collect();
        let Some(last) = exports.last() else { return 0 };
        let mut total = 0;
        for scope in last.scope_metrics() {
            for metric in scope.metrics() {
                if metric.name() != name {
                    continue;
                }
                if let AggregatedMetrics::U64(MetricData::Sum(sum)) = metric.data() {
                    total += sum.data_points().map(|p| p.value()).sum::<u64>();
                }
            }
        }
        total
    }

    /// `(count, min, max, sum)` of the histogram `name` in the latest export.
    pub fn histogram(&self, name: &str) -> Option<HistogramSummary> {
        let exports = self.collect();
        let last = exports.last()?;
        for scope in last.scope_metrics() {
            for metric in scope.metrics() {
                if metric.name() != name {
                    continue;
                }
                if let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = metric.data() {
                    let point = histogram.data_points().next()?;
                    return Some(HistogramSummary {
                        count: point.count(),
                        min: point.min().unwrap_or(f64::NAN),
                        max: point.max().unwrap_or(f64::NAN),
                        sum: point.sum(),
                        bounds: point.bounds().collect(),
                        counts: point.bucket_counts().collect(),
                        unit: metric.unit().to_string(),
                        attributes: point
                            .attributes()
                            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                            .collect(),
                    });
                }
            }
        }
        None
    }
}

#[derive(Debug, Clone)]
pub struct HistogramSummary {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub unit: String,
    pub attributes: Vec<(String, String)>,
}

impl HistogramSummary {
    /// Number of samples at or above `value` (bucket resolution).
    pub fn count_at_least(&self, value: f64) -> u64 {
        let mut total = 0;
        for (i, count) in self.counts.iter().enumerate() {
            let lower = if i == 0 {
                f64::NEG_INFINITY
            } else {
                self.bounds[i - 1]
            };
            if lower >= value {
                total += count;
            }
        }
        total
    }
}

/// Attribute `key` of a span as a string, if present.
pub fn attr(span: &SpanData, key: &str) -> Option<opentelemetry::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

pub fn span_duration(span: &SpanData) -> Duration {
    span.end_time
        .duration_since(span.start_time)
        .unwrap_or_default()
}

pub fn span_id(span: &SpanData) -> SpanId {
    span.span_context.span_id()
}

/// Runs `task` on `runtime`, as a task inside the span that `span` makes (both made inside
/// `block_on`, where an application makes them), until it completes.
pub fn run_in_span<F>(runtime: &Runtime, span: impl FnOnce() -> tracing::Span, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    runtime.block_on(async {
        tokio::spawn(task.instrument(span()))
            .await
            .expect("the task completes");
    });
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    condition()
}
