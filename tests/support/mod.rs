//! Support for the end-to-end tests: the demo's own application and OpenTelemetry pipeline
//! (the very files `examples/demo.rs` runs), and a real `rotel` collector process.
#![allow(dead_code, unreachable_pub)]

#[path = "../../examples/demo/app.rs"]
pub mod app;
pub mod rotel;
#[path = "../../examples/demo/telemetry.rs"]
pub mod telemetry;

use std::net::SocketAddr;
use std::time::Duration;

use looplag::{LoopLag, StallReport};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use telemetry::{OtlpTarget, Settings, Telemetry};

/// Settings of the demo's pipeline for the tests' collector at `target`: service `service`,
/// metrics pushed every `metric_interval`, finished spans sent every 200 ms, the exporter's
/// default timeout.
pub fn otlp_settings(service: &str, target: OtlpTarget, metric_interval: Duration) -> Settings {
    Settings {
        service_name: Some(service.to_string()),
        otlp: Some(target),
        metric_interval,
        span_delay: Duration::from_millis(200),
        ..Settings::default()
    }
}

/// Builds the demo's OTLP pipeline from `settings` and a looplag instance that exports
/// through it (scope `looplag`) and hands every report to `on_stall`, and installs the global
/// subscriber: looplag's layer first (see "Layer order" in `LoopLagLayer`'s docs), then
/// tracing-opentelemetry's (tracer `e2e`), then the test's log output, filtered by `log`.
pub fn otlp_pipeline(
    settings: &Settings,
    log: Targets,
    on_stall: impl Fn(&StallReport) + Send + Sync + 'static,
) -> (Telemetry, LoopLag) {
    let telemetry = Telemetry::new(settings, None).expect("build the OTLP pipeline");
    let looplag = LoopLag::builder()
        .meter(telemetry.meter_provider.meter("looplag"))
        .tracer(telemetry.tracer_provider.tracer("looplag"))
        .on_stall(on_stall)
        .build()
        .expect("valid looplag settings");
    tracing_subscriber::registry()
        .with(looplag.layer())
        .with(telemetry::otel_layer(
            telemetry.tracer_provider.tracer("e2e"),
        ))
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(log),
        )
        .try_init()
        .expect("one global subscriber per test process: run the tests with cargo nextest");
    (telemetry, looplag)
}

/// An axum server running the demo's router on `runtime`, driven by a thread of its own (a
/// current-thread runtime only runs while a thread is inside its `block_on`).
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<tokio::runtime::Runtime>>,
}

impl Server {
    /// Serves the demo's router on 127.0.0.1 (a free port).
    pub fn start(runtime: tokio::runtime::Runtime, state: app::AppState) -> Server {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind a loopback port for the demo server");
        let addr = listener.local_addr().expect("server address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("server".into())
            .spawn(move || {
                runtime
                    .block_on(async {
                        axum::serve(listener, app::router(state))
                            .with_graceful_shutdown(async {
                                let _ = stopped.await;
                            })
                            .await
                    })
                    .expect("the demo server runs");
                runtime
            })
            .expect("spawn the server thread");
        Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops serving and gives the runtime back.
    pub fn stop(mut self) -> tokio::runtime::Runtime {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread
            .take()
            .expect("server thread")
            .join()
            .expect("server thread exits cleanly")
    }
}

/// A check that the server has received `n` requests (its request span is open).
pub fn received(state: &app::AppState, n: u64) -> impl Fn() -> bool {
    let requests = std::sync::Arc::clone(&state.requests);
    move || requests.load(std::sync::atomic::Ordering::Relaxed) >= n
}

/// Status and body of one GET, from a client on its own runtime.
pub type Reply = Result<(u16, String), String>;

/// Sends the `fast` requests (paths) at once, then, once `in_flight()` says the server has
/// them (checked every 5 ms, for at most 10 s), the `slow` one; returns every reply (`fast`
/// first). The client has its own runtime: a stalled server must not stall its clients.
pub fn concurrent_gets(
    addr: SocketAddr,
    fast: &[&str],
    in_flight: impl Fn() -> bool,
    slow: &str,
) -> Vec<Reply> {
    let client_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let fast: Vec<String> = fast.iter().map(|p| format!("http://{addr}{p}")).collect();
    let slow = format!("http://{addr}{slow}");
    client_runtime.block_on(async move {
        let client = reqwest::Client::new();
        let get = |url: String| {
            let client = client.clone();
            tokio::spawn(async move {
                let response = client
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| format!("{url}: {e}"))?;
                let status = response.status().as_u16();
                let body = response.text().await.map_err(|e| format!("{url}: {e}"))?;
                Ok::<_, String>((status, body))
            })
        };
        let mut pending: Vec<_> = fast.into_iter().map(&get).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !in_flight() {
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not receive the first requests within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The handlers run in the same poll as the middleware that counted them; give the
        // server a moment to reach their await anyway.
        tokio::time::sleep(Duration::from_millis(20)).await;
        pending.push(get(slow));
        let mut replies = Vec::new();
        for request in pending {
            replies.push(request.await.unwrap_or_else(|e| Err(e.to_string())));
        }
        replies
    })
}
