#!/usr/bin/env bash
# looplag inside a third-party tokio server under real load: mini-redis (crates.io) driven by
# redis-benchmark, looplag off against looplag on, in alternating pairs of fresh processes.
#
#   scripts/bench_mini_redis.sh            # PAIRS=10 pairs of REQUESTS=100000 per test
#   SMOKE=1 scripts/bench_mini_redis.sh    # smoke run: 1 pair of 10000 requests
#
# What it does:
#   1. installs redis-benchmark (Debian package redis-tools) when it is missing;
#   2. generates a scratch crate under target/bench-mini-redis/crate (never committed) whose
#      one binary is mini-redis's server (src/bin/server.rs of the mini-redis release), with
#      looplag switched on at start by BENCH_LOOPLAG=1, and builds it in release mode with its
#      own target dir (target/bench-mini-redis/target);
#   3. for each pair, starts each variant in turn (order alternating from pair to pair) pinned
#      to one CPU, on a free loopback port, runs redis-benchmark's SET and then GET test from
#      another CPU, and reads the server's CPU time before and after each test;
#   4. runs the positive control: the looplag variant again, with one worker frozen by
#      `std::thread::sleep(300 ms)` mid-load, which looplag must report (about 300 ms);
#   5. counts, in one more short run of each variant, the spans and events that are live
#      (built and dispatched) per request: what switching looplag on turns on in mini-redis;
#   6. writes the raw rows to target/bench-mini-redis/results.csv and prints a Markdown
#      summary (also saved as target/bench-mini-redis/summary.md).
#
# The two variants are one executable:
#   - off: mini-redis's own setup: a multi-thread runtime (as `#[tokio::main]` builds it,
#     with worker_threads(2)) and `tracing_subscriber::fmt::try_init()` (an EnvFilter from
#     RUST_LOG over the whole subscriber, ERROR when RUST_LOG is unset);
#   - on: looplag set up by hand as README.md describes ("By hand, for your own runtime", what
#     `#[looplag::main]` expands to): the same runtime built with looplag's hooks, its watchdog
#     started before the body runs, and `looplag.layer()` next to the same fmt layer, the
#     RUST_LOG filter moved onto the fmt layer (README's "Filter your other layers per
#     layer"), so looplag sees mini-redis's spans. Settings from `LOOPLAG_*` (defaults: 10 ms
#     interval, 50 ms threshold). No OpenTelemetry exporter: looplag's metrics and spans go to
#     the no-op global providers.
#
# Logs: RUST_LOG is set to `error,looplag=warn` for both variants (BENCH_RUST_LOG overrides):
# mini-redis's `fmt::try_init()` reads RUST_LOG, and its ERROR default would drop looplag's
# WARN lines (looplag then prints a single "filtered out" notice instead). The fmt layer writes
# to stdout; each server's stdout and stderr go to one log under target/bench-mini-redis/logs,
# where the script counts looplag's WARN lines. NO_COLOR=1 keeps escape codes out of the log.
#
# Stall reports are counted by an `on_stall` callback in the server, which prints
# `stall reports: N (stalls ended: M)` to stderr when it exits on SIGINT, and one line per
# ended stall with its duration. Under plain load there should be none.
#
# Knobs (environment): PAIRS (10), REQUESTS per test (100000), SMOKE=1 (forces PAIRS=1,
# REQUESTS=10000), CLIENTS (50), SERVER_CPU (0), CLIENT_CPU (1), JOBS for cargo (1),
# BLOCK_AFTER_MS (1000: when the control blocks, after the server starts), CONTROL_SECONDS
# (4: how long the control's load lasts, sized from the measured SET throughput),
# MINI_REDIS_VERSION (0.4.1), BENCH_RUST_LOG (error,looplag=warn), VARIANT (looplag):
# what the plain server is compared with, `looplag` as above, or to tell its parts apart
# `looplag-runtime` (the hooked runtime and the watchdog, mini-redis's own subscriber, no
# looplag layer) or `looplag-layer` (looplag's subscriber on the plain runtime, no watchdog,
# so no positive control).
#
# Binds 127.0.0.1 only. Every process it starts is stopped by its PID on exit, on failure
# too. Nothing here asserts a time; the script fails only when the harness itself fails
# (a server that does not start or answer, output it cannot parse).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/bench-mini-redis"
crate="$out/crate"
logs="$out/logs"
results="$out/results.csv"
summary="$out/summary.md"
export CARGO_TARGET_DIR="$out/target"

if [ "${SMOKE:-0}" = 1 ]; then
    PAIRS=1
    REQUESTS=10000
else
    PAIRS=${PAIRS:-10}
    REQUESTS=${REQUESTS:-100000}
fi
CLIENTS=${CLIENTS:-50}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
JOBS=${JOBS:-1}
BLOCK_AFTER_MS=${BLOCK_AFTER_MS:-1000}
CONTROL_SECONDS=${CONTROL_SECONDS:-4}
MINI_REDIS_VERSION=${MINI_REDIS_VERSION:-0.4.1}
BENCH_RUST_LOG=${BENCH_RUST_LOG:-error,looplag=warn}
VARIANT=${VARIANT:-looplag}
case $VARIANT in
    looplag | looplag-runtime | looplag-layer) ;;
    *) echo "bench_mini_redis: VARIANT must be looplag, looplag-runtime or looplag-layer" >&2; exit 2 ;;
esac
# The positive control's block, as the server's source has it.
BLOCK_MS=300

log() { echo "bench_mini_redis: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---- processes we started, stopped by PID on any exit --------------------------------------

server_pid=""
client_pid=""

# Stops the server whose PID is $1: SIGINT (mini-redis's ctrl_c shutdown), up to 10 s, then
# SIGKILL. Returns its exit status.
stop_server() {
    local pid=$1 i status=0
    kill -INT "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "server $pid did not stop within 10 s of SIGINT: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || status=$?
    return "$status"
}

cleanup() {
    if [ -n "$client_pid" ]; then
        kill -TERM "$client_pid" 2>/dev/null || true
        wait "$client_pid" 2>/dev/null || true
    fi
    if [ -n "$server_pid" ]; then
        stop_server "$server_pid" || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- 1. tools ---------------------------------------------------------------------------------

if ! command -v redis-benchmark >/dev/null 2>&1; then
    log "installing redis-tools (redis-benchmark, redis-cli)"
    apt-get install -y redis-tools >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y redis-tools >/dev/null; }
fi
for tool in redis-benchmark redis-cli taskset getconf cargo awk; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
clk_tck=$(getconf CLK_TCK)

# ---- 2. the scratch crate ---------------------------------------------------------------------

# Each run replaces the logs, results.csv and summary.md of the run before.
rm -rf "$logs"
mkdir -p "$crate/src" "$logs"
# Writes stdin to file $1 only when it differs, so that Cargo does not rebuild an unchanged
# crate (it goes by modification times).
write_if_changed() {
    local new
    new=$(cat)
    if [ ! -f "$1" ] || [ "$(cat "$1")" != "$new" ]; then
        printf '%s\n' "$new" >"$1"
    fi
}

write_if_changed "$crate/Cargo.toml" <<TOML
# Generated by scripts/bench_mini_redis.sh; rewritten when the script changes.
[package]
name = "mini-redis-looplag-bench"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
mini-redis = "=$MINI_REDIS_VERSION"
looplag = { path = "$root" }
# mini-redis uses tokio 1 and tracing 0.1, which these are. Its own tracing-subscriber is 0.2,
# whose subscribers cannot take looplag's layer (a tracing-subscriber 0.3 Layer): both
# variants use 0.3, where fmt::try_init() is the same (an EnvFilter from RUST_LOG, ERROR
# by default, with the env-filter feature that 0.2 has on by default).
tokio = { version = "1.54", features = ["full"] }
tracing = "0.1.41"
tracing-subscriber = { version = "0.3.23", features = ["env-filter"] }

[profile.release]
debug = "line-tables-only"   # as README recommends: names and lines in stall stacks

# Not a member of looplag's workspace, whose root is a parent directory.
[workspace]
TOML

write_if_changed "$crate/src/main.rs" <<'RUST'
//! Generated by scripts/bench_mini_redis.sh: mini-redis's server (its src/bin/server.rs),
//! with looplag switched on at start. Both variants are this one binary.
//!
//! - `BENCH_LOOPLAG=1`: looplag on, set up by hand as looplag's README describes.
//!   Diagnostics, to tell the parts apart: `BENCH_LOOPLAG=runtime`, the hooked runtime and
//!   the watchdog with mini-redis's own subscriber (no looplag layer); `BENCH_LOOPLAG=layer`,
//!   looplag's subscriber (its layer, the fmt layer filtered per layer) on the plain runtime
//!   with no watchdog.
//! - `BENCH_BLOCK_AFTER_MS=N`: a spawned task sleeps N ms, then blocks its worker with
//!   `std::thread::sleep(300 ms)` once (the positive control).
//! - `BENCH_COUNT_TRACING=1`: diagnostics only, never in a timed run: counts the spans and
//!   events that are live (built and dispatched to the subscriber).
//! - `--port N` as mini-redis's own; 0 (the default here) picks a free port. The address is
//!   always 127.0.0.1 and is printed on stderr: `bench: listening on 127.0.0.1:PORT`.
//!
//! On exit (SIGINT, mini-redis's ctrl_c shutdown) it prints `stall reports: N` on stderr.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mini_redis::server;
use tokio::net::TcpListener;
use tokio::signal;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

const WORKERS: usize = 2;
const BLOCK: Duration = Duration::from_millis(300);

static START: OnceLock<Instant> = OnceLock::new();
static REPORTS: AtomicU64 = AtomicU64::new(0);
static STALLS_ENDED: AtomicU64 = AtomicU64::new(0);
static SPANS: AtomicU64 = AtomicU64::new(0);
static EVENTS: AtomicU64 = AtomicU64::new(0);

fn elapsed_ms() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1e3
}

fn flag(name: &str) -> bool {
    matches!(std::env::var(name).as_deref(), Ok("1") | Ok("true"))
}

/// What of looplag is on: `BENCH_LOOPLAG`.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    On,
    RuntimeOnly,
    LayerOnly,
}

impl Mode {
    fn from_env() -> mini_redis::Result<Mode> {
        Ok(match std::env::var("BENCH_LOOPLAG").as_deref() {
            Err(_) | Ok("") | Ok("0") => Mode::Off,
            Ok("1") => Mode::On,
            Ok("runtime") => Mode::RuntimeOnly,
            Ok("layer") => Mode::LayerOnly,
            Ok(other) => return Err(format!("BENCH_LOOPLAG={other:?}: 0, 1, runtime or layer").into()),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::On => "on",
            Mode::RuntimeOnly => "runtime only",
            Mode::LayerOnly => "layer only",
        }
    }
}

/// Counts what reaches the subscriber (diagnostics only).
struct Count;

impl<S: tracing::Subscriber> Layer<S> for Count {
    fn on_new_span(&self, _: &tracing::span::Attributes<'_>, _: &tracing::span::Id, _: Context<'_, S>) {
        SPANS.fetch_add(1, Relaxed);
    }
    fn on_event(&self, _: &tracing::Event<'_>, _: Context<'_, S>) {
        EVENTS.fetch_add(1, Relaxed);
    }
}

/// The per-layer filter of `Count`: it adds no interest of its own, so a callsite is live
/// only when another layer wants it (an unfiltered `Count` would switch every callsite on and
/// count that), and it passes everything that is live.
struct Observe;

impl<S> tracing_subscriber::layer::Filter<S> for Observe {
    fn enabled(&self, _: &tracing::Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }
    fn callsite_enabled(&self, _: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::never()
    }
}

/// looplag's `on_stall`: runs on the watchdog thread, so it only counts and prints.
fn on_stall(report: &looplag::StallReport) {
    REPORTS.fetch_add(1, Relaxed);
    if report.state == looplag::StallState::Ended {
        STALLS_ENDED.fetch_add(1, Relaxed);
        eprintln!(
            "bench: stall ended: {:.3} ms exact={} worker={:?} span={} at +{:.0} ms",
            report.duration.as_secs_f64() * 1e3,
            report.exact,
            report.worker_index,
            report.span_name.unwrap_or("-"),
            elapsed_ms(),
        );
    }
}

fn port() -> mini_redis::Result<u16> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--port" {
            return Ok(args.next().ok_or("--port needs a value")?.parse()?);
        }
        if let Some(value) = arg.strip_prefix("--port=") {
            return Ok(value.parse()?);
        }
        return Err(format!("unknown argument {arg:?}").into());
    }
    Ok(0)
}

/// The subscriber. Off: exactly mini-redis's `fmt::try_init()`. On: looplag's layer, and the
/// same fmt layer with the same RUST_LOG filter, filtered per layer (README: a filter over
/// the whole subscriber would filter looplag too).
fn init_tracing(
    looplag: Option<looplag::LoopLagLayer<tracing_subscriber::Registry>>,
    count: bool,
) -> mini_redis::Result<()> {
    match (looplag, count) {
        (None, false) => tracing_subscriber::fmt::try_init()?,
        // What `fmt::try_init()` builds (one EnvFilter over the whole subscriber), on a
        // registry so that `Count` can have its per-layer filter.
        (None, true) => tracing_subscriber::registry()
            .with(EnvFilter::from_default_env())
            .with(tracing_subscriber::fmt::layer())
            .with(Count.with_filter(Observe))
            .try_init()?,
        (Some(looplag), count) => {
            let logs = tracing_subscriber::fmt::layer().with_filter(EnvFilter::from_default_env());
            let subscriber = tracing_subscriber::registry().with(looplag).with(logs);
            if count {
                subscriber.with(Count.with_filter(Observe)).try_init()?
            } else {
                subscriber.try_init()?
            }
        }
    }
    Ok(())
}

fn main() -> mini_redis::Result<()> {
    START.get_or_init(Instant::now);
    let mode = Mode::from_env()?;
    let count = flag("BENCH_COUNT_TRACING");
    let block_after = match std::env::var("BENCH_BLOCK_AFTER_MS") {
        Ok(ms) if !ms.is_empty() => Some(Duration::from_millis(ms.parse()?)),
        _ => None,
    };
    let port = port()?;

    // What `#[tokio::main(worker_threads = 2)]` builds; with looplag, hooked first.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(WORKERS).enable_all();
    let looplag = match mode {
        Mode::Off => None,
        _ => Some(looplag::LoopLag::builder().from_env().on_stall(on_stall).build()?),
    };
    let watched = matches!(mode, Mode::On | Mode::RuntimeOnly);
    if let (Some(looplag), true) = (&looplag, watched) {
        looplag.hook_runtime(&mut builder);
    }
    let runtime = builder.build()?;
    let watchdog = match (&looplag, watched) {
        (Some(looplag), true) => Some(looplag.start(runtime.handle())?),
        _ => None,
    };
    let layer = match (&looplag, mode) {
        (Some(looplag), Mode::On | Mode::LayerOnly) => Some(looplag.layer()),
        _ => None,
    };

    let result = runtime.block_on(async {
        // mini-redis's main from here on.
        init_tracing(layer, count)?;
        let listener = TcpListener::bind(&format!("127.0.0.1:{}", port)).await?;
        eprintln!(
            "bench: listening on {} (looplag {}, {} workers, pid {})",
            listener.local_addr()?,
            mode.name(),
            WORKERS,
            std::process::id(),
        );
        if let Some(after) = block_after {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_millis());
                eprintln!(
                    "bench: blocking a worker for {} ms at +{:.0} ms, unix_ms={unix_ms}",
                    BLOCK.as_millis(),
                    elapsed_ms()
                );
                std::thread::sleep(BLOCK);
            });
        }
        server::run(listener, signal::ctrl_c()).await
    });

    // Stopping the watchdog ends and reports a stall still going on.
    drop(watchdog);
    if watched {
        eprintln!(
            "stall reports: {} (stalls ended: {})",
            REPORTS.load(Relaxed),
            STALLS_ENDED.load(Relaxed)
        );
    } else {
        eprintln!("stall reports: NA (no watchdog)");
    }
    if count {
        eprintln!("tracing: {} spans created, {} events dispatched", SPANS.load(Relaxed), EVENTS.load(Relaxed));
    }
    result
}
RUST

# Versions: the first run seeds the scratch lock file from looplag's own Cargo.lock (the
# versions looplag is tested with) and keeps it, so later runs build the same versions.
if [ ! -f "$crate/Cargo.lock" ]; then
    cp "$root/Cargo.lock" "$crate/Cargo.lock"
fi
log "building the server (release, -j $JOBS, target dir $CARGO_TARGET_DIR)"
(cd "$crate" && cargo build --release --quiet -j "$JOBS")
bin="$CARGO_TARGET_DIR/release/mini-redis-looplag-bench"
[ -x "$bin" ] || die "no binary at $bin"
versions=$(cd "$crate" && cargo tree --quiet --depth 1 -e normal --prefix none |
    awk 'NR > 1 { printf "%s%s %s", sep, $1, $2; sep = ", " }')

# ---- helpers for one server run ---------------------------------------------------------------

# utime + stime of process $1, in clock ticks (/proc/PID/stat fields 14 and 15, counted
# after the command name, which may hold spaces).
cpu_ticks() {
    local stat fields
    stat=$(<"/proc/$1/stat")
    read -r -a fields <<<"${stat##*) }"
    echo $((fields[11] + fields[12]))
}

# Time on a CPU of every live thread of process $1, in ns (schedstat: finer than the ticks;
# a thread that exits between two readings is lost, none does here).
cpu_sched_ns() {
    cat "/proc/$1/task/"*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f\n", s }'
}

# Starts variant $1 (plain, looplag, looplag-runtime or looplag-layer) with extra environment
# $2..; sets server_pid, port, and server_log. Waits until it answers a GET.
start_server() {
    local variant=$1 looplag_flag i
    shift
    case $variant in
        plain) looplag_flag=0 ;;
        looplag) looplag_flag=1 ;;
        looplag-runtime) looplag_flag=runtime ;;
        looplag-layer) looplag_flag=layer ;;
        *) die "unknown variant $variant" ;;
    esac
    server_log="$logs/$(date -u +%H%M%S)-$variant-$RANDOM.log"
    : >"$server_log"
    env NO_COLOR=1 RUST_LOG="$BENCH_RUST_LOG" BENCH_LOOPLAG="$looplag_flag" "$@" \
        taskset -c "$SERVER_CPU" "$bin" --port 0 >"$server_log" 2>&1 &
    server_pid=$!
    port=""
    for ((i = 0; i < 200; i++)); do
        kill -0 "$server_pid" 2>/dev/null || { cat "$server_log" >&2; die "the $variant server exited at start"; }
        port=$(sed -n 's/^bench: listening on 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$server_log" || true)
        [ -n "$port" ] && break
        sleep 0.05
    done
    [ -n "$port" ] || die "the $variant server printed no address within 10 s ($server_log)"
    for ((i = 0; i < 100; i++)); do
        if redis-cli -h 127.0.0.1 -p "$port" get bench:ready >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.05
    done
    die "the $variant server on port $port does not answer ($server_log)"
}

# Runs redis-benchmark test $1 with $2 requests against the running server; sets bench_row to
# "rps,avg,p50,p95,p99,max,cpu_s,cpu_s_per_100k,sched_cpu_s_per_100k", and load_start_ms and
# load_end_ms (Unix time in ms) to when redis-benchmark started and ended.
run_load() {
    local test=$1 requests=$2 t0 t1 s0 s1 csv
    csv="$server_log.$test.csv"
    load_start_ms=$(($(date +%s%N) / 1000000))
    t0=$(cpu_ticks "$server_pid")
    s0=$(cpu_sched_ns "$server_pid")
    # redis-benchmark warns "Could not fetch server CONFIG" on stderr: mini-redis has no
    # CONFIG command. Harmless.
    taskset -c "$CLIENT_CPU" redis-benchmark -h 127.0.0.1 -p "$port" -c "$CLIENTS" -n "$requests" \
        -t "$test" --csv >"$csv" 2>"$csv.err" &
    client_pid=$!
    wait "$client_pid" || { cat "$csv.err" >&2; die "redis-benchmark failed (see $csv.err)"; }
    client_pid=""
    load_end_ms=$(($(date +%s%N) / 1000000))
    t1=$(cpu_ticks "$server_pid")
    s1=$(cpu_sched_ns "$server_pid")
    # --csv: a header line naming the columns, then one line per test; columns found by name.
    bench_row=$(awk -F, -v test="$test" -v ticks=$((t1 - t0)) -v hz="$clk_tck" \
        -v ns=$((s1 - s0)) -v n="$requests" '
        { for (i = 1; i <= NF; i++) gsub(/"/, "", $i) }
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        toupper($1) == toupper(test) {
            cpu = ticks / hz
            printf "%s,%s,%s,%s,%s,%s,%.2f,%.4f,%.4f\n", $col["rps"], $col["avg_latency_ms"],
                $col["p50_latency_ms"], $col["p95_latency_ms"], $col["p99_latency_ms"],
                $col["max_latency_ms"], cpu, cpu * 100000 / n, ns / 1e9 * 100000 / n
            found = 1
        }
        END { if (!found) exit 1 }' "$csv") ||
        { cat "$csv" "$csv.err" >&2; die "cannot parse redis-benchmark's CSV ($csv)"; }
}

# Stops the server, checks it printed its stall count; sets stall_reports, stalls_ended and
# warn_lines.
finish_server() {
    local pid=$server_pid status=0
    server_pid=""
    stop_server "$pid" || status=$?
    [ "$status" = 0 ] || log "warning: the server exited with status $status ($server_log)"
    grep -q '^stall reports: ' "$server_log" ||
        { tail -n 20 "$server_log" >&2; die "no 'stall reports' line from the server ($server_log)"; }
    stall_reports=$(sed -n 's/^stall reports: \([0-9NA]*\).*/\1/p' "$server_log")
    stalls_ended=$(sed -n 's/^stall reports: .*stalls ended: \([0-9]*\).*/\1/p' "$server_log")
    stalls_ended=${stalls_ended:-NA}
    warn_lines=$(grep -c ' WARN looplag' "$server_log" || true)
    if grep -q 'filtered out' "$server_log"; then
        log "warning: looplag says its WARN lines are filtered out ($server_log)"
    fi
}

# ---- 3. alternating pairs -------------------------------------------------------------------

cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
cores=$(nproc --all)
rustc_version=$(rustc --version)
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit (with uncommitted changes)"
fi
redis_benchmark_version=$(redis-benchmark --version | awk '{ print $2 }')
load_before=$(uptime | sed 's/.*load average: //')
started=$(date +%s)

# One row per redis-benchmark test. kind: pair (timed) or control; position: 1 or 2 in its
# pair; cpu_s: the server's utime + stime over the test; stall_reports, stalls_ended and
# warn_lines are the server run's (both its tests), NA when looplag is off.
header="kind,pair,position,variant,test,requests,rps,avg_ms,p50_ms,p95_ms,p99_ms,max_ms"
header="$header,cpu_s,cpu_s_per_100k,sched_cpu_s_per_100k,stall_reports,stalls_ended,warn_lines"
echo "$header" >"$results"

# One server run of variant $2 in pair $1 at position $3: SET then GET.
pair_run() {
    local pair=$1 variant=$2 position=$3 test row rows=() said=""
    start_server "$variant"
    for test in SET GET; do
        run_load "$test" "$REQUESTS"
        rows+=("pair,$pair,$position,$variant,$test,$REQUESTS,$bench_row")
        said="$said$test $(cut -d, -f1 <<<"$bench_row") req/s p99 $(cut -d, -f5 <<<"$bench_row") ms; "
    done
    finish_server
    for row in "${rows[@]}"; do
        echo "$row,$stall_reports,$stalls_ended,$warn_lines" >>"$results"
    done
    log "pair $pair/$PAIRS, $variant: ${said}stall reports $stall_reports"
}

log "$PAIRS pair(s) of $REQUESTS requests per test, $CLIENTS clients, server on CPU $SERVER_CPU, redis-benchmark on CPU $CLIENT_CPU"
for ((pair = 1; pair <= PAIRS; pair++)); do
    if ((pair % 2)); then
        pair_run "$pair" plain 1
        pair_run "$pair" "$VARIANT" 2
    else
        pair_run "$pair" "$VARIANT" 1
        pair_run "$pair" plain 2
    fi
done

# ---- statistics -------------------------------------------------------------------------------

# The median of the numbers on stdin, one a line ("NA" when there are none).
median() {
    sort -g | awk '{ a[NR] = $1 } END {
        if (NR == 0) print "NA"
        else if (NR % 2) print a[(NR + 1) / 2]
        else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# Column $3 of the pair rows of variant $1, test $2, one a line.
values() {
    awk -F, -v v="$1" -v t="$2" -v c="$3" '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        $1 == "pair" && $4 == v && $5 == t { print $col[c] }' "$results"
}

# $VARIANT / plain of column $2 for test $1, one per pair.
ratios() {
    awk -F, -v t="$1" -v c="$2" -v v="$VARIANT" '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        $1 == "pair" && $5 == t { x[$2, $4] = $col[c]; pairs[$2] = 1 }
        END { for (p in pairs) if (x[p, "plain"] > 0) printf "%.4f\n", x[p, v] / x[p, "plain"] }' "$results"
}

range() {
    sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR) printf "%.3f … %.3f", lo, hi; else print "NA" }'
}

# ---- 4. positive control ------------------------------------------------------------------

# Enough requests for CONTROL_SECONDS of load at the measured SET rate: the block, at
# BLOCK_AFTER_MS after the server starts, falls in the middle of it.
control_requests=0 control_reports=NA control_ended=NA control_warns=NA control_durations=""
control_exact="" control_max_ms=NA control_when="no run"
control_verdict="not run: $VARIANT has no watchdog"
if [ "$VARIANT" != looplag-layer ]; then
    set_rps=$(values "$VARIANT" SET rps | median)
    control_requests=$(awk -v r="$set_rps" -v s="$CONTROL_SECONDS" 'BEGIN { n = int(r * s); print (n < 20000 ? 20000 : n) }')
    log "positive control: $VARIANT, $control_requests SET requests, one worker blocked ${BLOCK_MS} ms at +${BLOCK_AFTER_MS} ms"
    start_server "$VARIANT" BENCH_BLOCK_AFTER_MS="$BLOCK_AFTER_MS"
    run_load SET "$control_requests"
    control_row=$bench_row
    finish_server
    control_log=$server_log
    control_reports=$stall_reports
    control_ended=$stalls_ended
    control_warns=$warn_lines
    echo "control,0,1,$VARIANT,SET,$control_requests,$control_row,$control_reports,$control_ended,$control_warns" >>"$results"
    control_blocked=$(grep -c '^bench: blocking a worker' "$control_log" || true)
    block_ms=$(sed -n 's/^bench: blocking a worker.*unix_ms=\([0-9]*\).*/\1/p' "$control_log" | head -n 1)
    control_durations=$(sed -n 's/^bench: stall ended: \([0-9.]*\) ms.*/\1/p' "$control_log" | paste -sd' ' -)
    control_exact=$(sed -n 's/^bench: stall ended: .* exact=\([a-z]*\).*/\1/p' "$control_log" | paste -sd' ' -)
    control_max_ms=$(echo "$control_row" | cut -d, -f6)
    # Passed: the block fell inside the load (redis-benchmark running from before it started to
    # after it ended), and looplag reported at least one stall within 50 ms of its length.
    # redis-benchmark's max latency is shown, not judged: with two workers the other one takes
    # over the connections, so the block need not hold up any request.
    control_verdict=$(awk -v blocked="$control_blocked" -v at="${block_ms:-0}" -v from="$load_start_ms" \
        -v to="$load_end_ms" -v ended="$control_ended" -v d="$control_durations" -v want="$BLOCK_MS" 'BEGIN {
            n = split(d, ds, " "); near = 0
            for (i = 1; i <= n; i++) if (ds[i] >= want - 50 && ds[i] <= want + 50) near++
            if (blocked != 1) print "FAILED: the server did not block"
            else if (at < from || at + want > to) print "FAILED: the block was not inside the load (raise CONTROL_SECONDS)"
            else if (ended < 1) print "FAILED: looplag reported no stall"
            else if (near < 1) print "FAILED: no reported stall within 50 ms of " want " ms"
            else if (ended == 1) print "PASSED: exactly one stall reported, within 50 ms of " want " ms, mid-load"
            else print "PASSED: " ended " stalls reported, one within 50 ms of " want " ms, mid-load"
        }')
    control_when=$(awk -v at="${block_ms:-0}" -v from="$load_start_ms" -v to="$load_end_ms" \
        'BEGIN { printf "the block at %.2f s of %.2f s of load", (at - from) / 1000, (to - from) / 1000 }')
    log "positive control: $control_verdict"
fi

# ---- 5. what is live per request --------------------------------------------------------------

count_requests=$((REQUESTS < 10000 ? REQUESTS : 10000))
declare -A live
for variant in plain "$VARIANT"; do
    start_server "$variant" BENCH_COUNT_TRACING=1
    run_load SET "$count_requests"
    run_load GET "$count_requests"
    finish_server
    live[$variant]=$(sed -n 's/^tracing: \([0-9]*\) spans created, \([0-9]*\) events dispatched/\1 \2/p' "$server_log" |
        awk -v n=$((2 * count_requests)) '{ printf "%.2f spans and %.2f events per request", $1 / n, $2 / n }')
done

load_after=$(uptime | sed 's/.*load average: //')
took=$(($(date +%s) - started))

# ---- 6. summary -------------------------------------------------------------------------------

metric_row() { # test, label, column, digits
    local plain other ratio spread
    plain=$(values plain "$1" "$3" | median)
    other=$(values "$VARIANT" "$1" "$3" | median)
    ratio=$(ratios "$1" "$3" | median)
    spread=$(ratios "$1" "$3" | range)
    printf '| %s | %s | %.*f | %.*f | **%.3f** | %s |\n' "$1" "$2" "$4" "$plain" "$4" "$other" "$ratio" "$spread"
}

# Per server run, so from its SET row only.
load_reports=$(awk -F, -v v="$VARIANT" '$1 == "pair" && $4 == v && $5 == "SET" { s += $16; n++ } END { printf "%d in %d runs", s, n }' "$results")
load_warns=$(awk -F, -v v="$VARIANT" '$1 == "pair" && $4 == v && $5 == "SET" { s += $18 } END { print s + 0 }' "$results")

{
    echo "## mini-redis $MINI_REDIS_VERSION under redis-benchmark: plain and $VARIANT"
    echo
    echo "- machine: $cpu_model, $cores cores; $rustc_version; looplag $commit"
    echo "- load: $PAIRS pair(s), alternating order, of redis-benchmark $redis_benchmark_version \`-c $CLIENTS -n $REQUESTS\` per test (SET, then GET), server pinned to CPU $SERVER_CPU (2 workers), client to CPU $CLIENT_CPU; RUST_LOG=$BENCH_RUST_LOG"
    echo "- load average before: $load_before; after: $load_after; took ${took} s (build excluded)"
    echo "- dependencies: $versions"
    echo
    echo "| test | metric | plain (median) | $VARIANT (median) | $VARIANT / plain (median of per-pair ratios) | range of ratios |"
    echo "|---|---|---:|---:|---:|---:|"
    for test in SET GET; do
        metric_row "$test" "requests/s" rps 0
        metric_row "$test" "p50 latency (ms)" p50_ms 3
        metric_row "$test" "p99 latency (ms)" p99_ms 3
        metric_row "$test" "server CPU s per 100k requests (stat ticks)" cpu_s_per_100k 3
        metric_row "$test" "server CPU s per 100k requests (schedstat)" sched_cpu_s_per_100k 3
    done
    echo
    echo "- stall reports during the load, $VARIANT runs (want 0): $load_reports; looplag WARN lines: $load_warns"
    if [ "$control_requests" = 0 ]; then
        echo "- positive control: $control_verdict"
    else
        echo "- positive control ($control_requests SET requests, a worker blocked ${BLOCK_MS} ms at +${BLOCK_AFTER_MS} ms): **$control_verdict**; stall reports $control_reports, ended stalls $control_ended, durations (ms): ${control_durations:-none} (exact: ${control_exact:-NA}); WARN lines $control_warns; $control_when; redis-benchmark max latency $control_max_ms ms"
    fi
    echo "- live tracing ($count_requests SET + $count_requests GET, separate runs): plain ${live[plain]}; $VARIANT ${live[$VARIANT]}"
    echo
    echo "Raw rows: \`${results#"$root"/}\`; server logs: \`${logs#"$root"/}/\`."
} | tee "$summary"
