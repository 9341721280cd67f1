//! The demo's HTTP application: an axum router whose handlers block their runtime worker on
//! purpose, behind tower-http's `TraceLayer` (one `request` span per request).
//!
//! Shared, through `#[path]`, by `examples/demo.rs` and the end-to-end tests, so the tests
//! exercise exactly the code the demo runs. Not part of the library.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use opentelemetry::trace::{TraceContextExt as _, TraceId};
use tower_http::trace::TraceLayer;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The longest stall one request may ask for.
pub const MAX_MS: u64 = 10_000;

/// How many recent requests [`Routes`] remembers.
const ROUTES_KEPT: usize = 4096;

/// The state the handlers share.
#[derive(Clone, Default)]
pub struct AppState {
    /// Held by a "refresher" thread during `/mutex`, waited for by the handler.
    cache: Arc<Mutex<u64>>,
    /// Which request each recent trace belongs to.
    pub routes: Routes,
    /// Requests received so far.
    pub requests: Arc<AtomicU64>,
}

/// The request line (`GET /block?ms=300`) of recent traces, by trace id.
///
/// A stall report carries the trace id of its stall span, which is the trace of the request
/// that blocked; the demo prints that request's line next to the stall. Bounded: the oldest
/// entries are forgotten first.
#[derive(Clone, Default)]
pub struct Routes(Arc<Mutex<VecDeque<(TraceId, String)>>>);

impl Routes {
    fn remember(&self, trace_id: TraceId, line: String) {
        let mut routes = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        if routes.len() == ROUTES_KEPT {
            routes.pop_front();
        }
        routes.push_back((trace_id, line));
    }

    /// The request line of the trace `trace_id`, if it is recent.
    pub fn get(&self, trace_id: TraceId) -> Option<String> {
        let routes = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        routes
            .iter()
            .rev()
            .find(|(id, _)| *id == trace_id)
            .map(|(_, line)| line.clone())
    }
}

#[derive(serde::Deserialize)]
struct Ms {
    ms: Option<u64>,
}

impl Ms {
    fn duration(&self, default: u64) -> Duration {
        Duration::from_millis(self.ms.unwrap_or(default).min(MAX_MS))
    }
}

/// The router: `/fast`, `/block?ms=`, `/cpu?ms=`, `/mutex?ms=`, each request in a
/// `request` span named `GET /route` in OpenTelemetry.
pub fn router(state: AppState) -> Router {
    let routes = state.routes.clone();
    let requests = Arc::clone(&state.requests);
    Router::new()
        .route("/fast", get(fast))
        .route("/block", get(block))
        .route("/cpu", get(cpu))
        .route("/mutex", get(mutex))
        .layer(middleware::from_fn(move |request, next| {
            requests.fetch_add(1, Ordering::Relaxed);
            remember_route(routes.clone(), request, next)
        }))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// The request span: `info` level (tower-http's default is `debug`), named after the route
/// in OpenTelemetry, with the HTTP semantic-convention attributes.
fn request_span(request: &Request) -> tracing::Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str());
    tracing::info_span!(
        "request",
        otel.name = format!("{} {route}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = route,
        url.path = request.uri().path(),
        url.query = request.uri().query().unwrap_or(""),
    )
}

/// Runs inside the request span: notes which request this trace is.
async fn remember_route(routes: Routes, request: Request, next: Next) -> Response {
    let trace_id = tracing::Span::current()
        .context()
        .span()
        .span_context()
        .trace_id();
    if trace_id != TraceId::INVALID {
        routes.remember(trace_id, format!("{} {}", request.method(), request.uri()));
    }
    next.run(request).await
}

/// Well-behaved: awaits `ms` (default 0) without blocking, like a handler waiting on a
/// database or another service.
async fn fast(Query(ms): Query<Ms>) -> &'static str {
    let wait = ms.duration(0);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    "fast\n"
}

/// Blocks its worker in `std::thread::sleep` for `ms` (default 300): a synchronous client
/// or file read in async code.
async fn block(Query(ms): Query<Ms>) -> &'static str {
    std::thread::sleep(ms.duration(300));
    "blocked\n"
}

/// Keeps its worker busy computing for `ms` (default 200): a big parse or a regex.
async fn cpu(Query(ms): Query<Ms>) -> String {
    let deadline = Instant::now() + ms.duration(200);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut rounds: u64 = 0;
    while Instant::now() < deadline {
        for byte in 0..=255u8 {
            hash = std::hint::black_box((hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3));
        }
        rounds += 1;
    }
    format!("{rounds} rounds, hash {hash:x}\n")
}

/// Waits `ms` (default 250) for a `std::sync::Mutex` that a background "cache refresh" thread
/// holds: lock contention that blocks the worker.
async fn mutex(State(state): State<AppState>, Query(ms): Query<Ms>) -> String {
    let hold = ms.duration(250);
    let cache = Arc::clone(&state.cache);
    let (locked, is_locked) = std::sync::mpsc::channel();
    let refresher = std::thread::Builder::new()
        .name("cache-refresh".into())
        .spawn(move || {
            let mut value = cache.lock().unwrap_or_else(|poison| poison.into_inner());
            let _ = locked.send(());
            std::thread::sleep(hold);
            *value += 1;
        });
    if refresher.is_ok() {
        // Returns as soon as the refresher holds the lock (microseconds).
        let _ = is_locked.recv();
    }
    let value = *state
        .cache
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    format!("cache generation {value}\n")
}
