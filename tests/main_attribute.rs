//! `#[looplag::main]`: the runtime it builds is watched from the first poll of the body, the
//! telemetry the body installs receives looplag's data, and a bad `LOOPLAG_*` value stops
//! the program before the body runs.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::attr;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// What the body installed, for the test to read once the function returned.
struct Installed {
    spans: InMemorySpanExporter,
    tracer_provider: SdkTracerProvider,
    metrics: InMemoryMetricExporter,
    meter_provider: SdkMeterProvider,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// What an application does at the top of its `main`: global OpenTelemetry providers, then
/// the subscriber with `looplag::layer()` and tracing-opentelemetry's layer. Runs inside the
/// body: looplag's instance exists before any of it.
fn install_telemetry() {
    let spans = InMemorySpanExporter::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let metrics = InMemoryMetricExporter::default();
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(metrics.clone()).build())
        .build();
    opentelemetry::global::set_tracer_provider(tracer_provider.clone());
    opentelemetry::global::set_meter_provider(meter_provider.clone());
    let tracer = tracer_provider.tracer("app");
    tracing_subscriber::registry()
        .with(looplag::layer())
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .init();
    let _ = INSTALLED.set(Installed {
        spans,
        tracer_provider,
        metrics,
        meter_provider,
    });
}

/// A request span whose handler blocks its worker for 150 ms.
async fn blocking_request() {
    async {
        std::thread::sleep(Duration::from_millis(150));
    }
    .instrument(tracing::info_span!("request"))
    .await;
}

fn installed() -> &'static Installed {
    INSTALLED.get().expect("the body installed its telemetry")
}

fn finished_spans() -> Vec<SpanData> {
    let installed = installed();
    installed
        .tracer_provider
        .force_flush()
        .expect("flush spans");
    installed.spans.get_finished_spans().expect("spans")
}

/// The stall span is the child of the request span, with its stack status or stack and a
/// kind, and the stall counter reached the meter provider installed inside the body.
fn assert_reported() {
    let spans = finished_spans();
    let request = spans
        .iter()
        .find(|span| span.name == "request")
        .expect("the request span");
    let stall = spans
        .iter()
        .find(|span| span.name == "tokio.eventloop.stall")
        .unwrap_or_else(|| panic!("a stall span among {spans:#?}"));
    assert_eq!(
        stall.parent_span_id,
        request.span_context.span_id(),
        "the stall span is the request's child"
    );
    assert!(
        attr(stall, "tokio.eventloop.stall.kind").is_some(),
        "{stall:#?}"
    );
    assert!(
        attr(stall, "code.stacktrace").is_some()
            || attr(stall, "tokio.eventloop.stall.stack_status").is_some(),
        "{stall:#?}"
    );
    let installed = installed();
    installed
        .meter_provider
        .force_flush()
        .expect("flush metrics");
    let exported = installed.metrics.get_finished_metrics().expect("metrics");
    let names: Vec<String> = exported
        .iter()
        .flat_map(|resource| resource.scope_metrics())
        .flat_map(|scope| scope.metrics())
        .map(|metric| metric.name().to_string())
        .collect();
    for name in [
        "tokio.eventloop.stalls",
        "tokio.eventloop.stall.duration",
        "tokio.eventloop.delay",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} exported: {names:?}"
        );
    }
}

#[looplag::main(flavor = "current_thread", stall_threshold = "50ms")]
async fn current_thread_app() {
    // Several watchdog ticks before the application's providers exist: looplag's
    // instruments start on the no-op global provider, as in a `main` that sets up
    // telemetry after some other start-up work.
    tokio::time::sleep(Duration::from_millis(100)).await;
    install_telemetry();
    // In a task, as a server's handlers run: under `--cfg tokio_unstable` polls are taken
    // from tokio's task poll hooks, which do not see the body of `block_on` itself.
    tokio::spawn(blocking_request())
        .await
        .expect("the request task");
    // Give the watchdog a tick to see the end while the body still runs.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[test]
fn current_thread_the_body_s_providers_receive_the_stall() {
    current_thread_app();
    assert_reported();
}

#[looplag::main(worker_threads = 2, runtime_name = "attribute")]
async fn multi_thread_app() -> Result<(), std::io::Error> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    install_telemetry();
    tokio::spawn(blocking_request()).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

#[test]
fn multi_thread_the_body_s_providers_receive_the_stall() {
    multi_thread_app().expect("the body's result comes back");
    assert_reported();
    let stall = finished_spans()
        .into_iter()
        .find(|span| span.name == "tokio.eventloop.stall")
        .expect("stall span");
    assert_eq!(
        attr(&stall, "tokio.runtime.name").map(|v| v.to_string()),
        Some("attribute".to_string())
    );
}

#[looplag::main(flavor = "current_thread")]
async fn never_runs() {
    eprintln!("the body ran");
}

/// Run as a child process of the test below (`LOOPLAG_MAIN_CHILD=1`).
#[test]
fn a_bad_looplag_variable_stops_the_program_before_the_body() {
    if std::env::var_os("LOOPLAG_MAIN_CHILD").is_some() {
        never_runs();
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_bad_looplag_variable_stops_the_program_before_the_body",
            "--nocapture",
        ])
        .env("LOOPLAG_MAIN_CHILD", "1")
        .env("LOOPLAG_STALL_THRESHOLD", "fast")
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "exit status; stderr: {stderr}"
    );
    assert!(
        stderr.contains("LOOPLAG_STALL_THRESHOLD") && stderr.contains("\"fast\""),
        "the message names the variable and the value: {stderr}"
    );
    assert!(stderr.contains("50ms"), "and the accepted form: {stderr}");
    assert!(!stderr.contains("the body ran"), "{stderr}");
}
