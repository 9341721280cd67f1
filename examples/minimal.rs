//! The smallest correct looplag setup, exporting over OTLP.
//!
//! ```sh
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 OTEL_SERVICE_NAME=minimal \
//!     cargo run --example minimal
//! ```
//!
//! Configured by the standard variables only: `OTEL_EXPORTER_OTLP_ENDPOINT` (and the
//! per-signal `..._TRACES_ENDPOINT` / `..._METRICS_ENDPOINT`), `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`grpc` by default here, or `http/protobuf`), `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`.
//! With no collector listening the program still runs; the exporters log their errors.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{MetricExporter, SpanExporter};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::level_filters::LevelFilter;
use tracing::Instrument as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. Exporters on a runtime of their own. The gRPC (tonic) exporter spawns its connection
    //    onto the runtime that is current when it is built. Built on the application's
    //    runtime, it would stop sending whenever that runtime is stalled: exactly when looplag
    //    has something to say. The SDK's batch span processor and periodic metric reader run
    //    on their own threads, so nothing below waits on the application's runtime.
    let export_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otel-export")
        .enable_all()
        .build()?;
    let grpc = matches!(
        std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref(),
        Err(_) | Ok("") | Ok("grpc")
    );
    let (spans, metrics) = {
        let _inside = export_runtime.enter();
        if grpc {
            (
                SpanExporter::builder().with_tonic().build()?,
                MetricExporter::builder().with_tonic().build()?,
            )
        } else {
            // http/protobuf: the endpoint, paths and protocol come from the environment.
            (
                SpanExporter::builder().build()?,
                MetricExporter::builder().build()?,
            )
        }
    };
    let resource = Resource::builder().build(); // reads OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    let tracer_provider = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_batch_exporter(spans)
        .build();
    let meter_provider = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(PeriodicReader::builder(metrics).build())
        .build();
    opentelemetry::global::set_tracer_provider(tracer_provider.clone());
    opentelemetry::global::set_meter_provider(meter_provider.clone());

    // 2. looplag, with the global providers' `looplag` meter and tracer (the default). Its
    //    WARN log lines say when a stall starts and ends; `.on_stall(..)` takes a callback.
    let looplag = looplag::LoopLag::builder().build()?;

    // 3. The subscriber. The exporters' own HTTP/gRPC stack is kept out of the
    //    OpenTelemetry layer: its spans would be exported, making more spans, forever.
    let not_the_exporter = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("reqwest", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF);
    // looplag's layer goes before tracing-opentelemetry's (see `LoopLagLayer`).
    tracing_subscriber::registry()
        .with(looplag.layer())
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer_provider.tracer("minimal"))
                .with_filter(not_the_exporter),
        )
        .with(tracing_subscriber::fmt::layer().with_filter(LevelFilter::WARN))
        .init();

    // 4. The application's runtime, hooked (`#[tokio::main]` cannot take hooks).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    looplag.hook_runtime(&mut builder);
    let runtime = builder.build()?;
    let watchdog = looplag.start(runtime.handle())?;

    runtime.block_on(async {
        // A request that blocks its worker for 200 ms: one stall span under `handle_request`.
        tokio::spawn(
            async { std::thread::sleep(Duration::from_millis(200)) }
                .instrument(tracing::info_span!("handle_request")),
        )
        .await
    })?;

    // 5. Shut down in order: the watchdog (ends open stalls), then the providers (flush),
    //    then the exporters' runtime.
    drop(watchdog);
    if let Err(err) = tracer_provider.shutdown() {
        eprintln!("exporting spans failed: {err}");
    }
    if let Err(err) = meter_provider.shutdown() {
        eprintln!("exporting metrics failed: {err}");
    }
    drop(runtime);
    export_runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
