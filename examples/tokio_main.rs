//! looplag in an axum service, set up in one line: `#[looplag::main]` instead of
//! `#[tokio::main]`, and `.with(looplag::layer())` in the subscriber. OpenTelemetry is set up
//! inside `main`, after looplag exists, as most services do; looplag's metrics and stall
//! spans still reach it.
//!
//! ```sh
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_SERVICE_NAME=tokio-main \
//!     cargo run --example tokio_main            # serves on 127.0.0.1:8080 until Ctrl-C
//! curl 'http://127.0.0.1:8080/block?ms=300'       # a request that blocks its worker
//! cargo run --example tokio_main -- --self-drive  # sends itself /block and /fast, then exits
//! ```
//!
//! The exporters speak OTLP over HTTP with a blocking client on the SDK's own threads, so
//! nothing they do waits on the application's runtime (the gRPC exporter would spawn onto
//! it: see `examples/minimal.rs`). Configured by the standard `OTEL_*` variables, looplag by
//! `LOOPLAG_*`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use axum::extract::Query;
use axum::routing::get;
use axum::Router;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{MetricExporter, SpanExporter};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use serde::Deserialize;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

#[derive(Deserialize)]
struct Wait {
    ms: Option<u64>,
}

/// Blocks its worker: a synchronous call inside an async handler.
async fn block(Query(wait): Query<Wait>) -> &'static str {
    std::thread::sleep(Duration::from_millis(wait.ms.unwrap_or(300)));
    "blocked\n"
}

/// Awaits without blocking.
async fn fast(Query(wait): Query<Wait>) -> &'static str {
    tokio::time::sleep(Duration::from_millis(wait.ms.unwrap_or(20))).await;
    "ok\n"
}

#[looplag::main(worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // OpenTelemetry, as the application sets it up: OTLP over HTTP, from `OTEL_*`.
    let resource = Resource::builder().build();
    let tracer_provider = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_batch_exporter(SpanExporter::builder().with_http().build()?)
        .build();
    let meter_provider = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(
            PeriodicReader::builder(MetricExporter::builder().with_http().build()?)
                .with_interval(Duration::from_secs(1))
                .build(),
        )
        .build();
    opentelemetry::global::set_tracer_provider(tracer_provider.clone());
    opentelemetry::global::set_meter_provider(meter_provider.clone());

    // tower-http's request spans are DEBUG: let them into the OpenTelemetry layer, or the
    // stall spans have no request to hang under (looplag says so in a WARN if it happens).
    let traces = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("tower_http", LevelFilter::DEBUG)
        .with_target("reqwest", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF);
    let logs = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("looplag", LevelFilter::WARN);
    tracing_subscriber::registry()
        .with(looplag::layer())
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer_provider.tracer("tokio-main"))
                .with_filter(traces),
        )
        .with(tracing_subscriber::fmt::layer().with_filter(logs))
        .init();

    let app = Router::new()
        .route("/block", get(block))
        .route("/fast", get(fast))
        .layer(tower_http::trace::TraceLayer::new_for_http());
    let self_drive = std::env::args().any(|arg| arg == "--self-drive");
    let addr = if self_drive {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:8080"
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!("listening on http://{local}");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    if self_drive {
        // A plain thread, so that a stalled runtime does not stall its own client.
        let client = std::thread::spawn(move || drive(local));
        tokio::task::spawn_blocking(move || client.join())
            .await?
            .map_err(|_| "the client thread panicked")??;
    } else {
        tokio::signal::ctrl_c().await?;
    }
    server.abort();
    // looplag's last reports first, then the providers flush: spans and metrics go out
    // before the program ends.
    looplag::shutdown();
    tracer_provider.shutdown()?;
    meter_provider.shutdown()?;
    Ok(())
}

/// Four `/fast` requests next to one `/block?ms=300`, then one `/fast` after it.
fn drive(addr: SocketAddr) -> std::io::Result<()> {
    let fast: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || get_path(addr, "/fast?ms=100")))
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    get_path(addr, "/block?ms=300")?;
    for request in fast {
        request
            .join()
            .map_err(|_| std::io::Error::other("client panicked"))??;
    }
    get_path(addr, "/fast?ms=1")?;
    Ok(())
}

/// One HTTP/1.1 GET; the status line must say 200.
fn get_path(addr: SocketAddr, path: &str) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if reply.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("{path}: {reply}")))
    }
}
