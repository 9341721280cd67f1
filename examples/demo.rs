//! looplag demo: an axum server that blocks its own runtime on purpose, watched by looplag.
//!
//! ```sh
//! cargo run --example demo                 # a 15 s story in the terminal, no collector needed
//! cargo run --example demo -- --loop       # play the story again every 15 s until Ctrl-C
//! cargo run --example demo -- --serve      # keep serving on 127.0.0.1:8080 for your own traffic
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 cargo run --example demo   # also ship OTLP
//! ```
//!
//! Routes: `/fast?ms=` (awaits, never blocks), `/block?ms=` (`std::thread::sleep` in the
//! handler), `/cpu?ms=` (a busy loop), `/mutex?ms=` (waits for a `std::sync::Mutex` held by
//! another thread). Without `--serve` the demo drives its own traffic over loopback: a steady
//! stream of `/fast` requests, and one blocking request of each kind every 3 s. Every second
//! it prints the runtime's delay percentiles (read from looplag's `tokio.eventloop.delay`
//! histogram through an in-process metric reader) and every stall report as it arrives.
//!
//! OTLP: set `OTEL_EXPORTER_OTLP_ENDPOINT` (and `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`
//! for port 4318; gRPC is the default here), optionally `OTEL_SERVICE_NAME` (default
//! `looplag-demo`). Options: `--loop`, `--serve`, `--addr HOST:PORT` (with `--serve`, default
//! 127.0.0.1:8080), `--multi-thread` or `--workers N` (a multi-thread runtime instead of the
//! default current-thread one: the other workers keep serving while one is stuck, so the
//! delay percentiles barely move, but looplag still reports the stuck worker, and only the
//! requests that were waiting on it are marked as victims).

#[path = "demo/app.rs"]
mod app;
#[path = "demo/telemetry.rs"]
mod telemetry;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use looplag::{LoopLag, StallReport, StallState};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// How long the driven story lasts.
const STORY: Duration = Duration::from_secs(15);

/// The blocking requests of the story: when (from the start), and what.
const SCRIPT: [(u64, &str); 4] = [
    (3_000, "/block?ms=300"),
    (6_000, "/cpu?ms=200"),
    (9_000, "/mutex?ms=250"),
    (11_500, "/block?ms=1200"),
];

/// How many frames of a stall's stack the demo prints (more when the first frame in this
/// crate's code is deeper).
const STACK_FRAMES: usize = 5;

/// Concurrent clients sending `/fast?ms=20` in a loop during the story.
const FAST_CLIENTS: usize = 4;

struct Options {
    serve: bool,
    repeat: bool,
    addr: SocketAddr,
    workers: usize,
    current_thread: bool,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        serve: false,
        repeat: false,
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        workers: 0,
        current_thread: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--serve" => options.serve = true,
            "--loop" => options.repeat = true,
            "--current-thread" => options.current_thread = true,
            "--multi-thread" => options.current_thread = false,
            "--addr" => {
                let value = args.next().ok_or("--addr needs HOST:PORT")?;
                options.addr = value
                    .parse()
                    .map_err(|err| format!("--addr {value}: {err}"))?;
            }
            "--workers" => {
                let value = args.next().ok_or("--workers needs a number")?;
                options.current_thread = false;
                options.workers = value
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or(format!("--workers {value}: expected a number >= 1"))?;
            }
            "-h" | "--help" => {
                println!("usage: demo [--loop | --serve [--addr HOST:PORT]] [--multi-thread] [--workers N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(options)
}

fn main() {
    let options = options().unwrap_or_else(|err| {
        eprintln!("demo: {err}");
        std::process::exit(2);
    });
    let otlp = telemetry::OtlpTarget::from_env().unwrap_or_else(|err| {
        eprintln!("demo: {err}");
        std::process::exit(2);
    });

    // Telemetry: OTLP when configured, plus a delta reader the terminal reads every second.
    let (events, printer_events) = mpsc::channel::<Event>();
    let delay_events = events.clone();
    let terminal = telemetry::DelayTap::new(move |delay| {
        let _ = delay_events.send(Event::Second(delay));
    });
    let settings = telemetry::Settings {
        otlp: otlp.clone(),
        metric_interval: Duration::from_secs(2),
        ..telemetry::Settings::default()
    };
    let telemetry = telemetry::Telemetry::new(&settings, Some(&terminal)).unwrap_or_else(|err| {
        eprintln!("demo: {err}");
        std::process::exit(1);
    });

    // looplag: the stall reports go to the printer thread (the callback runs on the watchdog
    // thread and must stay short).
    let looplag = LoopLag::builder()
        .runtime_name("demo")
        .meter(telemetry.meter_provider.meter("looplag"))
        .tracer(telemetry.tracer_provider.tracer("looplag"))
        .on_stall(move |report| {
            let _ = events.send(Event::Stall(Box::new(report.clone())));
        })
        .build()
        .expect("valid looplag settings");

    let log_filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    // looplag's layer goes before tracing-opentelemetry's (see `LoopLagLayer`).
    tracing_subscriber::registry()
        .with(looplag.layer())
        .with(telemetry::otel_layer(
            telemetry.tracer_provider.tracer("looplag-demo"),
        ))
        .with(tracing_subscriber::fmt::layer().with_filter(log_filter))
        .init();

    let mut builder = if options.current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if options.workers > 0 {
            builder.worker_threads(options.workers);
        }
        builder
    };
    builder.enable_all();
    looplag.hook_runtime(&mut builder);
    let runtime = builder.build().expect("build the demo runtime");
    let watchdog = looplag.start(runtime.handle()).expect("start looplag");

    let state = app::AppState::default();
    let bind = if options.serve {
        options.addr
    } else {
        SocketAddr::from(([127, 0, 0, 1], 0))
    };
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(bind))
        .unwrap_or_else(|err| {
            eprintln!("demo: cannot listen on {bind}: {err}");
            std::process::exit(1);
        });
    let addr = listener.local_addr().expect("listener address");
    let flavor = if options.current_thread {
        "current-thread runtime".to_string()
    } else {
        format!(
            "multi-thread runtime, {} workers",
            runtime.handle().metrics().num_workers()
        )
    };
    // The server thread drives the runtime (a current-thread runtime only runs while some
    // thread is inside its `block_on`) until Ctrl-C or the end of the story.
    let server_state = state.clone();
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let interrupted = Arc::new(AtomicBool::new(false));
    let on_ctrl_c = Arc::clone(&interrupted);
    let server = std::thread::Builder::new()
        .name("server".into())
        .spawn(move || {
            let stopped = async move {
                tokio::select! {
                    _ = server_stopped => {}
                    _ = tokio::signal::ctrl_c() => on_ctrl_c.store(true, Ordering::Relaxed),
                }
            };
            let served = runtime.block_on(async {
                axum::serve(listener, app::router(server_state))
                    .with_graceful_shutdown(stopped)
                    .await
            });
            if let Err(err) = served {
                eprintln!("demo: the server failed: {err}");
            }
            runtime
        })
        .expect("spawn the server thread");

    println!("looplag demo: axum on http://{addr} ({flavor}); stall threshold 50 ms");
    match &otlp {
        Some(target) => println!(
            "OTLP: {} to {} (OTEL_EXPORTER_OTLP_ENDPOINT)",
            match target.protocol {
                telemetry::Protocol::Grpc => "gRPC",
                telemetry::Protocol::HttpProtobuf => "HTTP/protobuf",
            },
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default()
        ),
        None => println!("OTLP: off (set OTEL_EXPORTER_OTLP_ENDPOINT to ship spans and metrics)"),
    }

    let started = Instant::now();
    let fast = Arc::new(Mutex::new(FastStats::default()));
    let done = Arc::new(AtomicBool::new(false));
    let printer = {
        let done = Arc::clone(&done);
        let fast = Arc::clone(&fast);
        let routes = state.routes.clone();
        let requests = Arc::clone(&state.requests);
        let quiet = options.serve;
        std::thread::Builder::new()
            .name("printer".into())
            .spawn(move || {
                let printer = Printer {
                    started,
                    events: printer_events,
                    routes,
                    requests,
                    fast,
                    quiet,
                };
                printer.run(&done)
            })
            .expect("spawn the printer thread")
    };

    if options.serve {
        println!(
            "serving until Ctrl-C; try:  curl 'http://{addr}/block?ms=300' & \
             curl 'http://{addr}/fast?ms=500'"
        );
    } else {
        println!(
            "driving traffic {} {} s: {FAST_CLIENTS} clients on /fast?ms=20, and {}",
            if options.repeat {
                "until Ctrl-C, in cycles of"
            } else {
                "for"
            },
            STORY.as_secs(),
            SCRIPT
                .iter()
                .map(|(at, path)| format!("{path} at {:.1} s", *at as f64 / 1e3))
                .collect::<Vec<_>>()
                .join(", ")
        );
        drive_traffic(addr, started, &fast, options.repeat, &interrupted);
        // Let the last stall end and its report arrive.
        std::thread::sleep(Duration::from_millis(300));
        let _ = stop_server.send(());
    }

    // Stop in order: the server; the watchdog (its thread ends every open stall and reports
    // it before it exits); the printer, once it printed every report; then flush telemetry
    // while the exporters' runtime still runs.
    let runtime = server.join().expect("server thread");
    drop(watchdog);
    done.store(true, Ordering::Release);
    let summary = printer.join().expect("printer thread");
    println!("{summary}");
    telemetry.flush();
    if otlp.is_some() {
        println!(
            "spans and metrics were sent over OTLP: open Jaeger (http://127.0.0.1:16686, \
             service {}) and Grafana (http://127.0.0.1:3000)",
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "looplag-demo".into())
        );
    }
    telemetry.shutdown();
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Latency of the driven `/fast` requests, as the client saw it, since the last print.
#[derive(Default)]
struct FastStats {
    count: u64,
    errors: u64,
    slowest: Duration,
}

/// The client side of the story, on its own thread and runtime: a stalled server must not
/// stall the clients that measure it.
///
/// Plays the script once, or, with `repeat`, again every [`STORY`] until `stop` is set.
fn drive_traffic(
    addr: SocketAddr,
    started: Instant,
    fast: &Arc<Mutex<FastStats>>,
    repeat: bool,
    stop: &Arc<AtomicBool>,
) {
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("demo-client")
        .enable_all()
        .build()
        .expect("build the client runtime");
    client_runtime.block_on(async {
        let client = reqwest::Client::new();
        let end = started + STORY;
        let going = move |stop: &AtomicBool| {
            !stop.load(Ordering::Relaxed) && (repeat || Instant::now() < end)
        };
        let mut clients = Vec::new();
        for _ in 0..FAST_CLIENTS {
            let client = client.clone();
            let fast = Arc::clone(fast);
            let stop = Arc::clone(stop);
            let url = format!("http://{addr}/fast?ms=20");
            clients.push(tokio::spawn(async move {
                while going(&stop) {
                    let sent = Instant::now();
                    let ok = match client.get(&url).send().await {
                        Ok(response) => response.status().is_success(),
                        Err(_) => false,
                    };
                    let took = sent.elapsed();
                    let mut stats = fast.lock().unwrap_or_else(|p| p.into_inner());
                    if ok {
                        stats.count += 1;
                        stats.slowest = stats.slowest.max(took);
                    } else {
                        stats.errors += 1;
                    }
                }
            }));
        }
        let mut cycle = started;
        'story: loop {
            for (at, path) in SCRIPT {
                let when = cycle + Duration::from_millis(at);
                while Instant::now() < when {
                    if stop.load(Ordering::Relaxed) {
                        break 'story;
                    }
                    let step = when.saturating_duration_since(Instant::now());
                    tokio::time::sleep(step.min(Duration::from_millis(100))).await;
                }
                let client = client.clone();
                let url = format!("http://{addr}{path}");
                clients.push(tokio::spawn(async move {
                    if let Err(err) = client.get(&url).send().await {
                        eprintln!("GET {url} failed: {err}");
                    }
                }));
            }
            if !repeat {
                break;
            }
            cycle += STORY;
            while Instant::now() < cycle && !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for client in clients {
            let _ = client.await;
        }
    });
}

/// What the printer prints.
enum Event {
    /// A stall report, from the `on_stall` callback.
    Stall(Box<StallReport>),
    /// The delay histogram of the last second, from the terminal's metric reader.
    Second(Option<telemetry::DelayHistogram>),
}

/// Prints, every second, the delay percentiles and the driven `/fast` latency, and every
/// stall report as it arrives.
struct Printer {
    started: Instant,
    events: mpsc::Receiver<Event>,
    routes: app::Routes,
    requests: Arc<std::sync::atomic::AtomicU64>,
    fast: Arc<Mutex<FastStats>>,
    /// `--serve`: print the per-second line only when something happened (or every 10 s).
    quiet: bool,
}

impl Printer {
    /// Runs until `done`; returns the summary line.
    fn run(self, done: &AtomicBool) -> String {
        let mut ended = Vec::new();
        let mut requests_seen = 0;
        let mut idle_lines = 0u32;
        let mut stalled = false;
        while !done.load(Ordering::Acquire) {
            match self.events.recv_timeout(Duration::from_millis(100)) {
                Ok(Event::Stall(report)) => {
                    self.print_stall(&report);
                    stalled = true;
                    if report.state == StallState::Ended {
                        ended.push(*report);
                    }
                }
                Ok(Event::Second(delay)) => {
                    let requests = self.requests.load(Ordering::Relaxed);
                    let new_requests = requests - requests_seen;
                    requests_seen = requests;
                    idle_lines += 1;
                    if self.quiet && new_requests == 0 && !stalled && idle_lines < 10 {
                        continue;
                    }
                    idle_lines = 0;
                    stalled = false;
                    self.print_second(delay.map(|histogram| summarize(&histogram)), new_requests);
                }
                Err(_) => {}
            }
        }
        while let Ok(event) = self.events.try_recv() {
            if let Event::Stall(report) = event {
                self.print_stall(&report);
                if report.state == StallState::Ended {
                    ended.push(*report);
                }
            }
        }
        let blocked: Duration = ended.iter().map(|report| report.duration).sum();
        let victims: usize = ended.iter().map(|report| report.victims).sum();
        format!(
            "summary: {} stalls, {:.0} ms blocked in total, {victims} waiting requests marked \
             as victims",
            ended.len(),
            blocked.as_secs_f64() * 1e3
        )
    }

    fn at(&self) -> String {
        format!("[{:>5.2}s]", self.started.elapsed().as_secs_f64())
    }

    fn print_second(&self, delay: Option<DelaySummary>, requests: u64) {
        let delay = match delay {
            Some(d) => format!(
                "delay p50 {}  p95 {}  p99 {}  max {}  ({} samples)",
                ms(d.p50),
                ms(d.p95),
                ms(d.p99),
                ms(d.max),
                d.count
            ),
            None => {
                "delay: no probe was polled in this second (the runtime is stalled)".to_string()
            }
        };
        let fast = {
            let mut stats = self.fast.lock().unwrap_or_else(|p| p.into_inner());
            let line = if stats.count + stats.errors > 0 {
                format!(
                    "  | /fast?ms=20: {} ok{}, slowest {}",
                    stats.count,
                    if stats.errors > 0 {
                        format!(" {} failed", stats.errors)
                    } else {
                        String::new()
                    },
                    ms(stats.slowest.as_secs_f64())
                )
            } else {
                String::new()
            };
            *stats = FastStats::default();
            line
        };
        println!("{} {delay}  | {requests} requests{fast}", self.at());
    }

    fn print_stall(&self, report: &StallReport) {
        let request = report
            .trace_id
            .and_then(|trace_id| self.routes.get(trace_id))
            .or_else(|| report.span_name.map(|name| format!("span `{name}`")))
            .unwrap_or_else(|| "outside any span".to_string());
        let thread = match (&report.thread_name, report.thread_id) {
            (Some(name), Some(id)) => format!("{name} (tid {id})"),
            (None, Some(id)) => format!("tid {id}"),
            _ => "an unidentified worker".to_string(),
        };
        match report.state {
            StallState::Ended => self.print_ended(report, &request),
            _ => println!(
                "{} STALL  blocked for {} so far  in {request}  on {thread}",
                self.at(),
                ms(report.duration.as_secs_f64()),
            ),
        }
    }

    fn print_ended(&self, report: &StallReport, request: &str) {
        let trace = report
            .trace_id
            .map(|id| format!("  trace {id}"))
            .unwrap_or_default();
        println!(
            "{} STALL  ended after {}  in {request}: {} waiting requests marked as victims{trace}",
            self.at(),
            ms(report.duration.as_secs_f64()),
            report.victims,
        );
        for line in culprit(report) {
            println!("           {line}");
        }
    }
}

/// Where the blocking code is and what it does: the stall's kind and system call, the top
/// frames of the blocked thread's stack (innermost first), and the task's spawn location
/// (with `--cfg tokio_unstable`).
fn culprit(report: &StallReport) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(kind) = report.kind {
        let mut line = format!("kind: {}", kind.as_str());
        if let Some(cpu) = report.cpu_time {
            line += &format!(", {} on CPU", ms(cpu.as_secs_f64()));
        }
        if let Some(syscall) = report.syscall {
            line += &format!(", waiting in {syscall}()");
        }
        lines.push(line);
    }
    match report.stack.frames() {
        Some(frames) => {
            // The top frames, down to the culprit frame at least: the first one of the
            // application's own code, as looplag tells it (`report.culprit`).
            let culprit = report.culprit.frame();
            let ours = culprit.and_then(|culprit| {
                frames.iter().position(|frame| {
                    frame.address == culprit.address
                        && frame.file == culprit.file
                        && frame.line == culprit.line
                })
            });
            let shown = ours.map_or(STACK_FRAMES, |i| (i + 1).max(STACK_FRAMES));
            for (index, frame) in frames.iter().take(shown).enumerate() {
                let mut line = format!("{index:>2}: {}", frame.function);
                if let Some(file) = &frame.file {
                    line += &format!("  {}", short_path(file));
                    if let Some(number) = frame.line {
                        line += &format!(":{number}");
                    }
                }
                if Some(index) == ours {
                    line += "   <- the blocking code";
                }
                lines.push(line);
            }
            if frames.len() > shown {
                lines.push(format!("    ... {} more frames", frames.len() - shown));
            }
            if culprit.is_none() {
                lines.push(format!("culprit: {}", report.culprit.status()));
            }
        }
        None => lines.push(format!("stack: {}", report.stack.status())),
    }
    if let Some(location) = report.spawn_location {
        lines.push(format!("task spawned at {location}"));
    }
    lines
}

/// A source path without the toolchain, registry or project prefix.
fn short_path(file: &str) -> &str {
    if let Some(rest) = file.strip_prefix(env!("CARGO_MANIFEST_DIR")) {
        return rest.trim_start_matches('/');
    }
    if let Some((_, rest)) = file.split_once("/library/") {
        return rest;
    }
    if let Some((_, rest)) = file.split_once("/registry/src/") {
        return rest
            .split_once('/')
            .map_or(rest, |(_, crate_path)| crate_path);
    }
    file
}

/// Percentiles of the delay samples recorded since the last read.
#[derive(Clone, Copy, Debug)]
struct DelaySummary {
    count: u64,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

/// Percentiles of one delta of the delay histogram.
fn summarize(delay: &telemetry::DelayHistogram) -> DelaySummary {
    let quantile = |q| bucket_quantile(q, &delay.bounds, &delay.counts, delay.min, delay.max);
    DelaySummary {
        count: delay.count,
        p50: quantile(0.50),
        p95: quantile(0.95),
        p99: quantile(0.99),
        max: delay.max,
    }
}

/// The `q` quantile of an explicit-bucket histogram, interpolated linearly inside its bucket
/// as Prometheus' `histogram_quantile` does (so the terminal agrees with Grafana), then
/// clamped to the recorded min and max.
fn bucket_quantile(q: f64, bounds: &[f64], counts: &[u64], min: f64, max: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (index, &count) in counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        if (seen + count) as f64 >= rank {
            let lower = if index == 0 { min } else { bounds[index - 1] };
            let upper = bounds.get(index).copied().unwrap_or(max);
            let within = (rank - seen as f64) / count as f64;
            let value = lower + (upper - lower) * within;
            return value.clamp(min, max);
        }
        seen += count;
    }
    max
}

/// Seconds as a short human duration.
fn ms(seconds: f64) -> String {
    let ms = seconds * 1e3;
    if ms < 1.0 {
        format!("{:.0} µs", ms * 1e3)
    } else if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}
