//! The demo's OpenTelemetry plumbing: OTLP exporters that never wait on the monitored
//! runtime, the providers around them, an in-process metric reader for the terminal, and the
//! tracing-opentelemetry layer with the exporter's own spans filtered out.
//!
//! Shared, through `#[path]`, by `examples/demo.rs` and the end-to-end tests, so the tests
//! check the very pipeline the demo ships telemetry with. Not part of the library.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (tonic), usually port 4317.
    Grpc,
    /// OTLP over HTTP with protobuf bodies, usually port 4318.
    HttpProtobuf,
}

/// Where OTLP goes.
#[derive(Clone, Debug)]
pub struct OtlpTarget {
    pub protocol: Protocol,
    /// Base URL (`http://127.0.0.1:4317`); `None`: the exporter reads the standard
    /// `OTEL_EXPORTER_OTLP_*ENDPOINT` variables itself.
    pub endpoint: Option<String>,
}

impl OtlpTarget {
    /// From the standard variables: `None` unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set;
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` is `grpc` (the default here, to match the collector's
    /// port 4317) or `http/protobuf`.
    pub fn from_env() -> Result<Option<OtlpTarget>, String> {
        let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
        if endpoint.trim().is_empty() {
            return Ok(None);
        }
        let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
            Err(_) | Ok("") | Ok("grpc") => Protocol::Grpc,
            Ok("http/protobuf") => Protocol::HttpProtobuf,
            Ok(other) => {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported here: \
                     use grpc or http/protobuf"
                ))
            }
        };
        Ok(Some(OtlpTarget {
            protocol,
            endpoint: None,
        }))
    }

    /// A fixed endpoint (the tests' collector).
    pub fn at(protocol: Protocol, base_url: impl Into<String>) -> OtlpTarget {
        OtlpTarget {
            protocol,
            endpoint: Some(base_url.into()),
        }
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `service.name`; `None`: `OTEL_SERVICE_NAME` (read by the SDK), else `looplag-demo`.
    pub service_name: Option<String>,
    pub otlp: Option<OtlpTarget>,
    /// How often metrics are pushed over OTLP.
    pub metric_interval: Duration,
    /// How long finished spans wait in the batch before they are sent.
    pub span_delay: Duration,
    /// How long one OTLP export may take, retries included, before it is given up;
    /// `None`: `OTEL_EXPORTER_OTLP_TIMEOUT` (read by the exporter), else its default of 10 s.
    /// Also bounds how long [`Telemetry::flush`] and [`Telemetry::shutdown`] take when the
    /// collector is unreachable or never answers.
    pub export_timeout: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            service_name: None,
            otlp: None,
            metric_interval: Duration::from_secs(5),
            span_delay: Duration::from_secs(1),
            export_timeout: None,
        }
    }
}

/// The tracer and meter providers, and the runtime that drives the OTLP exporters.
pub struct Telemetry {
    pub tracer_provider: SdkTracerProvider,
    pub meter_provider: SdkMeterProvider,
    /// The exporters' own runtime (`None` without OTLP); dropped last.
    export_runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Builds the providers; `tap` (the terminal's) gets the delay histogram every second.
    pub fn new(settings: &Settings, tap: Option<&DelayTap>) -> Result<Telemetry, String> {
        let mut resource = Resource::builder();
        if let Some(name) = &settings.service_name {
            resource = resource.with_service_name(name.clone());
        } else if std::env::var("OTEL_SERVICE_NAME").map_or(true, |name| name.is_empty()) {
            resource = resource.with_service_name("looplag-demo");
        }
        let resource = resource.build();
        let mut tracer_provider = SdkTracerProvider::builder().with_resource(resource.clone());
        let mut meter_provider = SdkMeterProvider::builder().with_resource(resource);
        if let Some(tap) = tap {
            meter_provider = meter_provider.with_reader(tap.reader(Duration::from_secs(1)));
        }
        let mut export_runtime = None;
        if let Some(target) = &settings.otlp {
            // The exporters get a runtime of their own, with its own worker thread. The tonic
            // (gRPC) exporter spawns its connection onto the runtime that is current when it
            // is built; built on the monitored runtime, it would stop sending while that
            // runtime is stalled, so the stall would only reach the collector after it ended
            // (and on a current-thread runtime, nothing is sent while `block_on` is not
            // polling). The batch span processor and the periodic metric reader run on their
            // own SDK threads, so nothing in this pipeline waits on the monitored runtime.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otel-export")
                .enable_all()
                .build()
                .map_err(|err| format!("cannot build the exporters' runtime: {err}"))?;
            let (spans, metrics) = {
                let _inside = runtime.enter();
                otlp_exporters(target, settings.export_timeout)?
            };
            let batch = BatchSpanProcessor::builder(spans)
                .with_batch_config(
                    BatchConfigBuilder::default()
                        .with_scheduled_delay(settings.span_delay)
                        .build(),
                )
                .build();
            tracer_provider = tracer_provider.with_span_processor(batch);
            meter_provider = meter_provider.with_reader(
                PeriodicReader::builder(metrics)
                    .with_interval(settings.metric_interval)
                    .build(),
            );
            export_runtime = Some(runtime);
        }
        Ok(Telemetry {
            tracer_provider: tracer_provider.build(),
            meter_provider: meter_provider.build(),
            export_runtime,
        })
    }

    /// Sends everything still buffered (spans, then metrics) and waits for it.
    pub fn flush(&self) {
        if let Err(err) = self.tracer_provider.force_flush() {
            eprintln!("flushing spans failed: {err}");
        }
        if let Err(err) = self.meter_provider.force_flush() {
            eprintln!("flushing metrics failed: {err}");
        }
    }

    /// Flushes and stops the providers, then the exporters' runtime.
    pub fn shutdown(self) {
        if let Err(err) = self.tracer_provider.shutdown() {
            eprintln!("stopping the tracer provider failed: {err}");
        }
        if let Err(err) = self.meter_provider.shutdown() {
            eprintln!("stopping the meter provider failed: {err}");
        }
        if let Some(runtime) = self.export_runtime {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Builds the OTLP span and metric exporters; for gRPC, call it inside the runtime that
/// should carry the connection.
fn otlp_exporters(
    target: &OtlpTarget,
    timeout: Option<Duration>,
) -> Result<(SpanExporter, MetricExporter), String> {
    let error = |what: &str, err: opentelemetry_otlp::ExporterBuildError| {
        format!("cannot build the OTLP {what} exporter ({target:?}): {err}")
    };
    match target.protocol {
        Protocol::Grpc => {
            let mut spans = SpanExporter::builder().with_tonic();
            let mut metrics = MetricExporter::builder().with_tonic();
            if let Some(base) = &target.endpoint {
                spans = spans.with_endpoint(base.clone());
                metrics = metrics.with_endpoint(base.clone());
            }
            if let Some(timeout) = timeout {
                spans = spans.with_timeout(timeout);
                metrics = metrics.with_timeout(timeout);
            }
            Ok((
                spans.build().map_err(|err| error("span", err))?,
                metrics.build().map_err(|err| error("metric", err))?,
            ))
        }
        Protocol::HttpProtobuf => {
            let http = opentelemetry_otlp::Protocol::HttpBinary;
            let mut spans = SpanExporter::builder().with_http().with_protocol(http);
            let mut metrics = MetricExporter::builder().with_http().with_protocol(http);
            if let Some(base) = &target.endpoint {
                // A programmatic HTTP endpoint is the full URL of each signal.
                let base = base.trim_end_matches('/');
                spans = spans.with_endpoint(format!("{base}/v1/traces"));
                metrics = metrics.with_endpoint(format!("{base}/v1/metrics"));
            }
            if let Some(timeout) = timeout {
                spans = spans.with_timeout(timeout);
                metrics = metrics.with_timeout(timeout);
            }
            Ok((
                spans.build().map_err(|err| error("span", err))?,
                metrics.build().map_err(|err| error("metric", err))?,
            ))
        }
    }
}

/// The tracing-opentelemetry layer, minus the spans and events of the exporters' own
/// HTTP/gRPC stack: exporting them would produce more spans to export, forever.
pub fn otel_layer<S>(
    tracer: opentelemetry_sdk::trace::SdkTracer,
) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
{
    let filter = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("reqwest", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
        .with_target("opentelemetry-otlp", LevelFilter::OFF);
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter)
}

/// An in-process metric exporter for the terminal: a [`PeriodicReader`] pushes deltas to it,
/// and it hands the `tokio.eventloop.delay` histogram of each push (`None` when nothing was
/// recorded) to a callback, on the reader's thread.
///
/// (The SDK's `ManualReader` would do too, but reading a shared one needs the SDK's
/// experimental custom-reader feature; a push exporter is stable API.)
#[derive(Clone)]
pub struct DelayTap(Arc<dyn Fn(Option<DelayHistogram>) + Send + Sync>);

impl std::fmt::Debug for DelayTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DelayTap")
    }
}

/// One delta of the delay histogram.
#[derive(Clone, Debug, Default)]
pub struct DelayHistogram {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
}

impl DelayTap {
    /// A tap that calls `on_push` with each delta.
    pub fn new(on_push: impl Fn(Option<DelayHistogram>) + Send + Sync + 'static) -> DelayTap {
        DelayTap(Arc::new(on_push))
    }

    /// A periodic reader that feeds this tap every `interval`.
    pub fn reader(&self, interval: Duration) -> PeriodicReader<DelayTap> {
        PeriodicReader::builder(self.clone())
            .with_interval(interval)
            .build()
    }
}

impl PushMetricExporter for DelayTap {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        for scope in metrics.scope_metrics() {
            for metric in scope.metrics() {
                if metric.name() != "tokio.eventloop.delay" {
                    continue;
                }
                let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = metric.data() else {
                    continue;
                };
                // One data point: looplag's instance has one runtime name.
                if let Some(point) = histogram.data_points().find(|point| point.count() > 0) {
                    (self.0)(Some(DelayHistogram {
                        count: point.count(),
                        min: point.min().unwrap_or(0.0),
                        max: point.max().unwrap_or(0.0),
                        bounds: point.bounds().collect(),
                        counts: point.bucket_counts().collect(),
                    }));
                    return Ok(());
                }
            }
        }
        (self.0)(None);
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Delta
    }
}
