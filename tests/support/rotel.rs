//! A real OpenTelemetry collector for the end-to-end tests: the `rotel` binary from the
//! PyPI package `rotel` (pinned and installed by `scripts/rotel.sh install`, which
//! `scripts/test.sh` runs), started on free loopback ports with its detailed debug log, and a
//! parser for that log.
//!
//! The debug log's format (rotel 0.0.1-alpha10) is described in
//! `collector/testdata/README.md`, with a recorded sample beside it that the parser is tested
//! on. Every span and metric rotel receives is printed when it is received, before batching.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long rotel gets to listen on both ports.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A `rotel` process on two loopback ports; killed (by its PID, it is our child) when
/// dropped. It can be stopped and started again on the same ports ([`Collector::stop`],
/// [`Collector::restart`]), as a collector that goes away and comes back: exporters keep
/// their endpoint.
pub struct Collector {
    /// `None` while stopped.
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    binary: PathBuf,
    dir: PathBuf,
    log: PathBuf,
}

impl Collector {
    /// Starts rotel on two free loopback ports, printing everything it receives to its log.
    ///
    /// # Panics
    ///
    /// When rotel is not installed or does not start: an end-to-end test that cannot reach a
    /// collector fails, it is never skipped.
    pub fn start() -> Collector {
        let binary = rotel_binary();
        let mut last_error = String::new();
        // A free port can be taken by another process between our check and rotel's bind;
        // try a few pairs.
        for attempt in 0..3 {
            let (grpc, http) = free_ports();
            let mut collector = Collector::new(binary.clone(), grpc, http, attempt);
            match collector.spawn_and_wait() {
                Ok(()) => return collector,
                Err(err) => last_error = err,
            }
        }
        panic!(
            "the rotel collector did not start ({}): {last_error}",
            binary.display()
        );
    }

    /// Starts rotel on the given ports (for instance where exporters already point, see
    /// [`free_ports`]), trying again until [`STARTUP_TIMEOUT`] while a port is still taken.
    ///
    /// # Panics
    ///
    /// When rotel is not installed or does not listen on both ports in time.
    pub fn start_on(grpc: SocketAddr, http: SocketAddr) -> Collector {
        let mut collector = Collector::new(rotel_binary(), grpc, http, 0);
        collector.restart();
        collector
    }

    fn new(binary: PathBuf, grpc: SocketAddr, http: SocketAddr, attempt: u32) -> Collector {
        let dir = std::env::temp_dir().join(format!(
            "looplag-e2e-{}-{}-{attempt}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let log = dir.join("rotel.log");
        Collector {
            child: None,
            grpc,
            http,
            binary,
            dir,
            log,
        }
    }

    /// The PID of the running rotel, `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills rotel (by its PID: SIGKILL, as a crash or a `kill -9` would) and waits for it
    /// to exit. The ports and the log are kept; [`Collector::restart`] starts it again.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts rotel again on the same ports, appending to the same log. A port can stay
    /// taken for a moment after the previous process exits; this tries again until
    /// [`STARTUP_TIMEOUT`].
    ///
    /// # Panics
    ///
    /// When rotel does not listen on both ports in time.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(err) if Instant::now() >= deadline => panic!(
                    "rotel did not start again on {} and {} within {STARTUP_TIMEOUT:?}: {err}",
                    self.grpc, self.http
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Spawns rotel on this collector's ports (appending to its log) and waits until it
    /// listens on both; on failure nothing is left running.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let (grpc, http) = (self.grpc, self.http);
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("create {}: {e}", self.dir.display()))?;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("open {}: {e}", self.log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut command = Command::new(&self.binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ROTEL_") {
                command.env_remove(key);
            }
        }
        let child = command
            .arg("start")
            .args(["--otlp-grpc-endpoint", &grpc.to_string()])
            .args(["--otlp-http-endpoint", &http.to_string()])
            .args(["--exporter", "blackhole"])
            .args(["--debug-log", "traces", "--debug-log", "metrics"])
            .args(["--debug-log-verbosity", "detailed"])
            // Only used when daemonized; kept out of the shared /tmp defaults anyway.
            .arg("--pid-file")
            .arg(self.dir.join("rotel.pid"))
            .arg("--log-file")
            .arg(self.dir.join("rotel-agent.log"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        let result = self.wait_listening();
        if result.is_err() {
            self.stop();
        }
        result
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let (grpc, http) = (self.grpc, self.http);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err("not started".to_string());
            };
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "rotel exited ({status}) before listening on {grpc} and {http}; its log:\n{}",
                    self.text()
                ));
            }
            let listening = [grpc, http]
                .iter()
                .all(|addr| TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok());
            if listening {
                // Still ours: had another process taken a port, rotel would have exited.
                std::thread::sleep(Duration::from_millis(100));
                if let Ok(None) = child.try_wait() {
                    return Ok(());
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "rotel (pid {}) not listening on {grpc} and {http} after {STARTUP_TIMEOUT:?}; \
                     its log:\n{}",
                    child.id(),
                    self.text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Base URL of the OTLP gRPC receiver.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Base URL of the OTLP HTTP receiver.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Path of the log (rotel's stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Everything received so far.
    pub fn received(&self) -> Dump {
        parse(&self.text())
    }

    /// Polls what was received every 50 ms until `condition` holds or `timeout` passes;
    /// returns the last dump either way.
    pub fn wait_for(&self, timeout: Duration, condition: impl FnMut(&Dump) -> bool) -> Dump {
        self.wait_for_every(timeout, Duration::from_millis(50), condition)
    }

    /// [`Collector::wait_for`], polling every `interval` (a long log takes a while to parse).
    pub fn wait_for_every(
        &self,
        timeout: Duration,
        interval: Duration,
        mut condition: impl FnMut(&Dump) -> bool,
    ) -> Dump {
        let deadline = Instant::now() + timeout;
        loop {
            let dump = self.received();
            if condition(&dump) || Instant::now() >= deadline {
                return dump;
            }
            std::thread::sleep(interval);
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() || std::env::var_os("LOOPLAG_KEEP_ROTEL_LOG").is_some() {
            eprintln!("rotel's log is kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The rotel binary: `$LOOPLAG_ROTEL_BIN`, else what `scripts/rotel.sh bin` finds.
fn rotel_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LOOPLAG_ROTEL_BIN") {
        return PathBuf::from(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rotel.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("bin")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        output.status.success() && !path.is_empty(),
        "the rotel collector is not installed, so the end-to-end tests cannot run: \
         run `scripts/rotel.sh install` (scripts/test.sh does), or set LOOPLAG_ROTEL_BIN. \
         {} said: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    PathBuf::from(path)
}

/// Two distinct loopback ports that were free a moment ago (rotel cannot be given port 0):
/// nothing listens on them until someone binds them.
pub fn free_ports() -> (SocketAddr, SocketAddr) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let pair = (a.local_addr().expect("port"), b.local_addr().expect("port"));
    drop((a, b));
    pair
}

// ---------------------------------------------------------------------------------------
// The debug log, parsed.
// ---------------------------------------------------------------------------------------

/// Everything a debug log holds: spans and metric streams, each with its resource.
#[derive(Clone, Debug, Default)]
pub struct Dump {
    pub spans: Vec<Span>,
    pub metrics: Vec<Metric>,
}

/// One attribute: `key: Type(value)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attr {
    pub key: String,
    /// `Str`, `Int`, `Double`, `Bool`, `Slice`, ...
    pub kind: String,
    /// The text after `Type(`, up to and including the closing `)`; a string that spans
    /// several lines has them joined with `\n`.
    raw: String,
}

impl Attr {
    /// The value as printed, without the type and parentheses.
    pub fn text(&self) -> &str {
        self.raw.strip_suffix(')').unwrap_or(&self.raw)
    }

    /// `Int` values.
    pub fn int(&self) -> Option<i64> {
        (self.kind == "Int").then(|| self.text().parse().ok())?
    }

    /// `Double` values (printed without exponent, maybe without a decimal point).
    pub fn double(&self) -> Option<f64> {
        (self.kind == "Double").then(|| self.text().parse().ok())?
    }
}

/// Looks an attribute up by key.
pub fn attr<'a>(attributes: &'a [Attr], key: &str) -> Option<&'a Attr> {
    attributes.iter().find(|attr| attr.key == key)
}

#[derive(Clone, Debug, Default)]
pub struct Span {
    pub resource: Vec<Attr>,
    pub scope: String,
    pub trace_id: String,
    /// Empty for a root span.
    pub parent_id: String,
    pub span_id: String,
    pub name: String,
    pub kind: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<Attr>,
    pub events: Vec<Event>,
    pub links: Vec<Link>,
}

impl Span {
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_ns.saturating_sub(self.start_ns))
    }

    pub fn attr(&self, key: &str) -> Option<&Attr> {
        attr(&self.attributes, key)
    }

    pub fn service(&self) -> &str {
        attr(&self.resource, "service.name").map_or("", Attr::text)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Event {
    pub name: String,
    pub timestamp_ns: u64,
    pub attributes: Vec<Attr>,
}

#[derive(Clone, Debug, Default)]
pub struct Link {
    pub trace_id: String,
    pub span_id: String,
    pub attributes: Vec<Attr>,
}

/// One metric of one export.
#[derive(Clone, Debug, Default)]
pub struct Metric {
    pub resource: Vec<Attr>,
    pub scope: String,
    pub name: String,
    pub description: String,
    pub unit: String,
    /// `Histogram`, `Sum`, `Gauge`, `ExponentialHistogram`.
    pub data_type: String,
    pub monotonic: Option<bool>,
    pub temporality: String,
    pub points: Vec<Point>,
}

impl Metric {
    pub fn service(&self) -> &str {
        attr(&self.resource, "service.name").map_or("", Attr::text)
    }
}

/// One data point (number or histogram).
#[derive(Clone, Debug, Default)]
pub struct Point {
    pub attributes: Vec<Attr>,
    pub start_ns: u64,
    pub time_ns: u64,
    /// Number points.
    pub value: Option<f64>,
    pub count: Option<u64>,
    pub sum: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub bounds: Vec<f64>,
    pub buckets: Vec<u64>,
}

impl Point {
    /// Samples in buckets whose lower bound is at least `value` (bucket resolution).
    pub fn count_at_least(&self, value: f64) -> u64 {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(i, _)| *i > 0 && self.bounds.get(i - 1).is_some_and(|lower| *lower >= value))
            .map(|(_, count)| count)
            .sum()
    }
}

impl Dump {
    /// Spans of the service `service`.
    pub fn spans_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Span> + 'a {
        self.spans
            .iter()
            .filter(move |span| span.service() == service)
    }

    /// The value of the sum `name` of `service` summed over its series (one per attribute
    /// set, such as each `tokio.eventloop.stall.kind`), each at its latest point stamped at or
    /// after `since_ns`; `None` when no point was.
    pub fn total_since(&self, service: &str, name: &str, since_ns: u64) -> Option<f64> {
        let mut latest: Vec<&Point> = Vec::new();
        for metric in self.metrics.iter() {
            if metric.service() != service || metric.name != name {
                continue;
            }
            for point in metric.points.iter().filter(|p| p.time_ns >= since_ns) {
                match latest.iter_mut().find(|p| p.attributes == point.attributes) {
                    Some(seen) if seen.time_ns < point.time_ns => *seen = point,
                    Some(_) => {}
                    None => latest.push(point),
                }
            }
        }
        (!latest.is_empty()).then(|| latest.iter().filter_map(|p| p.value).sum())
    }

    /// `name: points` for each metric of `service` with points stamped at or after
    /// `since_ns`: what arrived, for a failure message.
    pub fn metrics_since(&self, service: &str, since_ns: u64) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for metric in self.metrics.iter().filter(|m| m.service() == service) {
            let points = metric
                .points
                .iter()
                .filter(|p| p.time_ns >= since_ns)
                .count();
            match counts.iter_mut().find(|(name, _)| *name == metric.name) {
                Some((_, count)) => *count += points,
                None => counts.push((&metric.name, points)),
            }
        }
        let listed: Vec<String> = counts.iter().map(|(n, c)| format!("{n}: {c}")).collect();
        listed.join(", ")
    }

    /// The most recent point (by timestamp) of metric `name` of `service`.
    pub fn last_point(&self, service: &str, name: &str) -> Option<(&Metric, &Point)> {
        self.metrics
            .iter()
            .filter(|metric| metric.service() == service && metric.name == name)
            .flat_map(|metric| metric.points.iter().map(move |point| (metric, point)))
            .max_by_key(|(_, point)| point.time_ns)
    }
}

/// Which list the lines being read belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Other,
    ResourceAttrs,
    SpanHeader,
    SpanAttrs,
    Events,
    EventAttrs,
    Links,
    LinkAttrs,
    Descriptor,
    Point,
    PointAttrs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    None,
    Spans,
    Metrics,
}

struct Parser {
    dump: Dump,
    block: Block,
    section: Section,
    resource: Vec<Attr>,
    scope: String,
    /// The last line was (part of) a `Str` attribute of this section: an unrecognised line
    /// that follows continues its value.
    open_string: Option<Section>,
}

/// Parses a rotel debug log (`--debug-log-verbosity detailed`, `NO_COLOR=1`).
///
/// Only the labels rotel prints are recognised, at their exact indentation; any other line
/// that follows a `Str(..)` attribute is the next line of that string (rotel prints strings
/// raw, so a multi-line value such as a stack continues at column 0). Other lines, such as
/// rotel's own log lines, are ignored. A dump cut short (the file read while rotel writes) is
/// parsed as far as it goes.
pub fn parse(text: &str) -> Dump {
    let mut parser = Parser {
        dump: Dump::default(),
        block: Block::None,
        section: Section::Other,
        resource: Vec::new(),
        scope: String::new(),
        open_string: None,
    };
    for line in text.lines() {
        let open = parser.open_string.take();
        if !parser.structural(line) {
            match open {
                Some(section) if !is_rotel_log_line(line) => {
                    if let Some(attr) = parser.last_attr(section) {
                        attr.raw.push('\n');
                        attr.raw.push_str(line);
                    }
                    parser.open_string = Some(section);
                }
                _ => {}
            }
        }
    }
    parser.dump
}

/// `2026-11-26T02:27:30.684089Z  INFO ...`
fn is_rotel_log_line(line: &str) -> bool {
    let bytes = line.as_bytes();
    bytes.len() > 20
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes[4] == b'-'
        && bytes[10] == b'T'
}

fn number<T: std::str::FromStr + Default>(text: &str) -> T {
    text.trim().parse().unwrap_or_default()
}

impl Parser {
    /// Handles a line with a known shape; false if it has none.
    fn structural(&mut self, line: &str) -> bool {
        // Blocks and scopes.
        if line.starts_with("ResourceSpans #") {
            self.begin_block(Block::Spans);
        } else if line.starts_with("ResourceMetrics #") {
            self.begin_block(Block::Metrics);
        } else if line.starts_with("ResourceLogs #") {
            self.begin_block(Block::None);
        } else if line == "Resource attributes:" {
            self.section = Section::ResourceAttrs;
        } else if line.starts_with("Resource SchemaURL:")
            || line.starts_with("ScopeSpans #")
            || line.starts_with("ScopeSpans SchemaURL:")
            || line.starts_with("ScopeMetrics #")
            || line.starts_with("ScopeMetrics SchemaURL:")
        {
            self.section = Section::Other;
        } else if let Some(scope) = line.strip_prefix("InstrumentationScope ") {
            self.scope = scope.split(' ').next().unwrap_or("").to_string();
            self.section = Section::Other;
        }
        // Spans.
        else if line.starts_with("Span #") && self.block == Block::Spans {
            self.dump.spans.push(Span {
                resource: self.resource.clone(),
                scope: self.scope.clone(),
                ..Span::default()
            });
            self.section = Section::SpanHeader;
        } else if let Some(value) = line.strip_prefix("Start time: ") {
            self.span(|span| span.start_ns = number(value));
        } else if let Some(value) = line.strip_prefix("End time: ") {
            self.span(|span| span.end_ns = number(value));
        } else if line == "Attributes:" && self.block == Block::Spans {
            self.section = Section::SpanAttrs;
        } else if line == "Events:" && self.block == Block::Spans {
            self.section = Section::Events;
        } else if line.starts_with("SpanEvent #") {
            self.span(|span| span.events.push(Event::default()));
            self.section = Section::Events;
        } else if line == "Links:" && self.block == Block::Spans {
            self.section = Section::Links;
        } else if line.starts_with("SpanLink #") {
            self.span(|span| span.links.push(Link::default()));
            self.section = Section::Links;
        } else if let Some((label, value)) = span_header(line) {
            if self.section != Section::SpanHeader && self.section != Section::Other {
                return false;
            }
            let value = value.to_string();
            self.span(|span| match label {
                "Trace ID" => span.trace_id = value,
                "Parent ID" => span.parent_id = value,
                "ID" => span.span_id = value,
                "Name" => span.name = value,
                "Kind" => span.kind = value,
                _ => {}
            });
        }
        // Metrics.
        else if line.starts_with("Metric #") && self.block == Block::Metrics {
            self.dump.metrics.push(Metric {
                resource: self.resource.clone(),
                scope: self.scope.clone(),
                ..Metric::default()
            });
            self.section = Section::Other;
        } else if line == "Descriptor:" {
            self.section = Section::Descriptor;
        } else if line.starts_with("HistogramDataPoints #")
            || line.starts_with("NumberDataPoints #")
            || line.starts_with("ExponentialHistogramDataPoints #")
        {
            self.metric(|metric| metric.points.push(Point::default()));
            self.section = Section::Point;
        } else if line == "Data point attributes:" {
            self.section = Section::PointAttrs;
        } else if let Some(value) = line.strip_prefix("StartTimestamp: ") {
            self.point(|point| point.start_ns = number(value));
        } else if let Some(value) = line.strip_prefix("Timestamp: ") {
            self.point(|point| point.time_ns = number(value));
        } else if let Some(value) = line.strip_prefix("Count: ") {
            self.point(|point| point.count = value.trim().parse().ok());
        } else if let Some(value) = line.strip_prefix("Sum: ") {
            self.point(|point| point.sum = value.trim().parse().ok());
        } else if let Some(value) = line.strip_prefix("Min: ") {
            self.point(|point| point.min = value.trim().parse().ok());
        } else if let Some(value) = line.strip_prefix("Max: ") {
            self.point(|point| point.max = value.trim().parse().ok());
        } else if let Some(value) = line.strip_prefix("Value: ") {
            self.point(|point| point.value = value.trim().parse().ok());
        } else if let Some(rest) = line.strip_prefix("ExplicitBounds #") {
            let value = rest.split_once(": ").map_or("", |(_, v)| v);
            self.point(|point| point.bounds.push(number(value)));
        } else if let Some(rest) = line.strip_prefix("Buckets #") {
            let value = rest.split_once(", Count: ").map_or("", |(_, v)| v);
            self.point(|point| point.buckets.push(number(value)));
        }
        // `     -> ...` and `          -> ...` lines.
        else if let Some(content) = arrow(line) {
            return self.arrow_line(content);
        } else {
            return false;
        }
        true
    }

    fn begin_block(&mut self, block: Block) {
        self.block = block;
        self.section = Section::Other;
        self.resource.clear();
        self.scope.clear();
    }

    fn arrow_line(&mut self, content: &str) -> bool {
        if content == "Attributes::" {
            self.section = match self.section {
                Section::Events | Section::EventAttrs => Section::EventAttrs,
                Section::Links | Section::LinkAttrs => Section::LinkAttrs,
                _ => return false,
            };
            return true;
        }
        // `key: value`; a label printed with an empty value may lack the space.
        let Some((key, value)) = content
            .split_once(": ")
            .or_else(|| content.strip_suffix(':').map(|key| (key, "")))
        else {
            return false;
        };
        match self.section {
            Section::ResourceAttrs
            | Section::SpanAttrs
            | Section::EventAttrs
            | Section::LinkAttrs
            | Section::PointAttrs => {
                let Some((kind, raw)) = value.split_once('(') else {
                    return false;
                };
                if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_alphabetic()) {
                    return false;
                }
                let attr = Attr {
                    key: key.to_string(),
                    kind: kind.to_string(),
                    raw: raw.to_string(),
                };
                let is_string = attr.kind == "Str";
                let section = self.section;
                match section {
                    Section::ResourceAttrs => self.resource.push(attr),
                    Section::SpanAttrs => self.span(|span| span.attributes.push(attr)),
                    Section::EventAttrs => self.span(|span| {
                        if let Some(event) = span.events.last_mut() {
                            event.attributes.push(attr);
                        }
                    }),
                    Section::LinkAttrs => self.span(|span| {
                        if let Some(link) = span.links.last_mut() {
                            link.attributes.push(attr);
                        }
                    }),
                    _ => self.point(|point| point.attributes.push(attr)),
                }
                if is_string {
                    self.open_string = Some(section);
                }
                true
            }
            Section::Events => {
                let value = value.to_string();
                self.span(|span| {
                    if let Some(event) = span.events.last_mut() {
                        match key {
                            "Name" => event.name = value,
                            "Timestamp" => event.timestamp_ns = number(&value),
                            _ => {}
                        }
                    }
                });
                true
            }
            Section::Links => {
                let value = value.to_string();
                self.span(|span| {
                    if let Some(link) = span.links.last_mut() {
                        match key {
                            "Trace ID" => link.trace_id = value,
                            "ID" => link.span_id = value,
                            _ => {}
                        }
                    }
                });
                true
            }
            Section::Descriptor => {
                let value = value.to_string();
                self.metric(|metric| match key {
                    "Name" => metric.name = value,
                    "Description" => metric.description = value,
                    "Unit" => metric.unit = value,
                    "DataType" => metric.data_type = value,
                    "IsMonotonic" => metric.monotonic = Some(value == "true"),
                    "AggregationTemporality" => metric.temporality = value,
                    _ => {}
                });
                true
            }
            _ => false,
        }
    }

    fn span(&mut self, f: impl FnOnce(&mut Span)) {
        if self.block == Block::Spans {
            if let Some(span) = self.dump.spans.last_mut() {
                f(span);
            }
        }
    }

    fn metric(&mut self, f: impl FnOnce(&mut Metric)) {
        if self.block == Block::Metrics {
            if let Some(metric) = self.dump.metrics.last_mut() {
                f(metric);
            }
        }
    }

    fn point(&mut self, f: impl FnOnce(&mut Point)) {
        self.metric(|metric| {
            if let Some(point) = metric.points.last_mut() {
                f(point);
            }
        });
    }

    /// The attribute an open string continues into.
    fn last_attr(&mut self, section: Section) -> Option<&mut Attr> {
        match section {
            Section::ResourceAttrs => self.resource.last_mut(),
            Section::SpanAttrs => self.dump.spans.last_mut()?.attributes.last_mut(),
            Section::EventAttrs => self
                .dump
                .spans
                .last_mut()?
                .events
                .last_mut()?
                .attributes
                .last_mut(),
            Section::LinkAttrs => self
                .dump
                .spans
                .last_mut()?
                .links
                .last_mut()?
                .attributes
                .last_mut(),
            Section::PointAttrs => self
                .dump
                .metrics
                .last_mut()?
                .points
                .last_mut()?
                .attributes
                .last_mut(),
            _ => None,
        }
    }
}

/// `    Trace ID       : <value>` (4 spaces, label padded to 15 characters).
fn span_header(line: &str) -> Option<(&'static str, &str)> {
    let rest = line.strip_prefix("    ")?;
    if rest.starts_with(' ') {
        return None;
    }
    let (label, value) = rest.split_once(':')?;
    let label = [
        "Trace ID",
        "Parent ID",
        "ID",
        "Name",
        "Kind",
        "Status code",
        "Status message",
    ]
    .into_iter()
    .find(|known| label.trim_end() == *known)?;
    Some((label, value.strip_prefix(' ').unwrap_or(value).trim_end()))
}

/// The content of `     -> ...` (5 spaces) or `          -> ...` (10 spaces).
fn arrow(line: &str) -> Option<&str> {
    line.strip_prefix("          -> ")
        .or_else(|| line.strip_prefix("     -> "))
}
