//! The watchdog thread: a plain OS thread that scans the workers' slots every sample
//! interval, runs the delay probe, and turns stalls into telemetry.
//!
//! It never waits on the runtime, so it keeps working (and reporting) while every worker
//! is stuck. The loop and the order of one tick are here; `workers` follows tokio's worker
//! metrics, `detect` finds stalls, `stall` carries one stall from its detection to its
//! exported span, and `probe` measures the delay (ARCHITECTURE.md, "One stall").

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::global::BoxedTracer;

use crate::clock::{self, Anchor};
use crate::config::{Config, StallCallback};
use crate::hot::doze::{Doze, IDLE_SAMPLE_INTERVALS};
use crate::hot::slots::{PollEnd, Registry, Slot};
use crate::layer;
use crate::report::log::Publisher;
use crate::stack::capture::Capturer;
use crate::stack::StackSupport;
use crate::telemetry::Telemetry;
use opentelemetry::metrics::Meter;
use probe::{Collected, Probe};
use stall::Stalls;
use workers::Workers;

mod detect;
pub(crate) mod probe;
mod stall;
mod workers;

/// What an instance shares with its runtime's hooks and its watchdog thread.
pub(crate) struct Inner {
    pub(crate) config: Config,
    /// The meter given to the builder; `None`: the global meter provider's, followed
    /// (`telemetry::Telemetry`).
    pub(crate) meter: Option<Meter>,
    /// The tracer given to the builder; `None`: the global tracer provider's at each span.
    pub(crate) tracer: Option<BoxedTracer>,
    pub(crate) on_stall: Option<StallCallback>,
    pub(crate) registry: Registry,
    /// The watchdog's idle sleep, woken by the unpark hook.
    pub(crate) doze: Doze,
    /// `hook_runtime` (or a hook getter) was called.
    pub(crate) hooked: AtomicBool,
    /// A watchdog of this instance is running.
    pub(crate) running: AtomicBool,
}

/// How long a hooked runtime may run without any worker registering before looplag warns.
const UNHOOKED_GRACE: Duration = Duration::from_secs(2);

/// The watchdog thread's main loop; returns when `stop` is set.
///
/// Ticks every sample interval on a fixed grid. After a tick that found the runtime idle
/// (every worker parked) it dozes instead, for `IDLE_SAMPLE_INTERVALS` intervals or until a
/// worker unparks (see `hot/doze.rs`), then ticks at once.
pub(crate) fn run(inner: Arc<Inner>, handle: tokio::runtime::Handle, stop: Arc<AtomicBool>) {
    let interval = inner.config.sample_interval;
    let idle_sleep = interval.saturating_mul(IDLE_SAMPLE_INTERVALS);
    inner.doze.set_watchdog(Some(std::thread::current()));
    let mut watch = Watch::new(Arc::clone(&inner), handle);
    let mut next = Instant::now() + interval;
    let mut tick_panicked = false;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now < next {
            std::thread::park_timeout(next - now);
            continue;
        }
        next += interval;
        if next <= now {
            next = now + interval;
        }
        let ticked = panic::catch_unwind(AssertUnwindSafe(|| watch.tick()));
        let idle = match ticked {
            Ok(idle) => idle,
            Err(_) => {
                if !tick_panicked {
                    tick_panicked = true;
                    tracing::error!(
                        target: "looplag",
                        "looplag's watchdog recovered from a panic; please report this bug"
                    );
                }
                false
            }
        };
        if idle && inner.doze.begin(|| watch.all_parked()) {
            let dozed = doze(&inner, &stop, idle_sleep);
            watch.woke(dozed);
            next = Instant::now();
        } else {
            watch.spawn_probe();
        }
    }
    inner.doze.end();
    inner.doze.set_watchdog(None);
    let _ = panic::catch_unwind(AssertUnwindSafe(|| watch.finish()));
}

/// Sleeps until `idle_sleep` has passed, a worker unparks or `stop` is set; returns how long
/// it slept.
fn doze(inner: &Inner, stop: &AtomicBool, idle_sleep: Duration) -> Duration {
    let began = Instant::now();
    let until = began + idle_sleep;
    loop {
        let now = Instant::now();
        if now >= until || !inner.doze.dozing() || stop.load(Ordering::Acquire) {
            break;
        }
        std::thread::park_timeout(until - now);
    }
    inner.doze.end();
    began.elapsed()
}

/// The watchdog thread's state.
struct Watch {
    inner: Arc<Inner>,
    handle: tokio::runtime::Handle,
    probe: Probe,
    /// How long the watchdog dozed since it last spawned a probe.
    dozed: Duration,
    telemetry: Telemetry,
    workers: Workers,
    stalls: Stalls,
    stacks: Capturer,
    publisher: Publisher,
    started: Instant,
    warned_unhooked: bool,
    /// The runtime has shut down: its workers exit, and a worker that exited looks like one
    /// stuck in an uninstrumented poll (unparked, metrics frozen), so estimation stops.
    shut_down: bool,
}

impl Watch {
    fn new(inner: Arc<Inner>, handle: tokio::runtime::Handle) -> Self {
        let multi_thread = matches!(
            handle.runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        let hooked = inner.hooked.load(Ordering::Relaxed);
        if !hooked {
            warn_unhooked(&inner.config.runtime_name, multi_thread);
        }
        let config = &inner.config;
        Watch {
            probe: Probe::new(config.sample_interval),
            dozed: Duration::ZERO,
            telemetry: Telemetry::new(inner.meter.as_ref(), &inner.config.runtime_name),
            workers: Workers::new(multi_thread, clock::raw()),
            stalls: Stalls::new(config.max_culprit_functions),
            stacks: Capturer::new(
                config.stacks,
                config.max_stacks_per_minute,
                std::sync::Arc::clone(&config.library_prefixes),
                Instant::now(),
            ),
            publisher: Publisher::new(
                config.runtime_name.clone(),
                config.max_stall_logs_per_second,
                inner.on_stall.clone(),
            ),
            started: Instant::now(),
            warned_unhooked: !hooked,
            shut_down: false,
            inner,
            handle,
        }
    }

    /// One tick. Returns whether the runtime looks idle enough to doze: every worker
    /// parked, the probe's sample just taken, and no stall being tracked or finished.
    fn tick(&mut self) -> bool {
        let anchor = Anchor::now();
        let now = anchor.raw;
        self.telemetry.refresh();
        let instruments = self.telemetry.instruments();
        let collected = self.probe.collect(now, |seconds| {
            instruments.delay.record(seconds, &instruments.attributes)
        });
        self.shut_down = self.shut_down || self.probe.runtime_shut_down();
        let slots = self.inner.registry.live();
        let access = layer::access();
        self.workers.track(&self.handle.metrics(), &slots, now);
        self.workers.track_cpu(&slots, now);
        self.attach_stacks();
        self.check_active(now);
        self.detect_exact(&slots, now, &anchor, access.as_ref());
        if !self.inner.registry.poll_hooks.load(Ordering::Relaxed)
            && (self.workers.multi_thread || self.inner.config.stacks == StackSupport::Enabled)
            && !self.shut_down
        {
            self.detect_estimated(&slots, now, &anchor);
        }
        self.finish_waiting(now, false);
        self.warn_if_unhooked(&slots);
        self.publisher.roll(Instant::now());
        collected == Collected::Sample
            && !self.shut_down
            && self.stalls.is_empty()
            && self.covers_all_workers(&slots)
            && slots.iter().all(|slot| slot.snapshot().parked)
    }

    /// Every worker of the runtime has a registered slot (on a runtime that was not hooked,
    /// none has: it never dozes).
    fn covers_all_workers(&self, slots: &[Arc<Slot>]) -> bool {
        !slots.is_empty()
            && (0..self.workers.tracks.len())
                .all(|index| slots.iter().any(|slot| slot.worker_index == Some(index)))
    }

    /// Every registered slot is parked, read after announcing a doze (see `hot/doze.rs`).
    fn all_parked(&self) -> bool {
        let slots = self.inner.registry.live();
        self.covers_all_workers(&slots) && slots.iter().all(|slot| slot.snapshot().parked)
    }

    /// Spawns the next probe, counting it for the intervals the watchdog dozed through.
    fn spawn_probe(&mut self) {
        let interval = self.inner.config.sample_interval.as_secs_f64();
        let dozed = std::mem::take(&mut self.dozed).as_secs_f64();
        let weight = 1.0 + (dozed / interval).round();
        self.probe
            .spawn(&self.handle, weight.min(f64::from(u32::MAX)) as u32);
    }

    /// The watchdog woke from a doze of `dozed`.
    fn woke(&mut self, dozed: Duration) {
        self.dozed = self.dozed.saturating_add(dozed);
    }

    fn warn_if_unhooked(&mut self, slots: &[Arc<Slot>]) {
        if self.warned_unhooked || !slots.is_empty() || self.started.elapsed() < UNHOOKED_GRACE {
            return;
        }
        self.warned_unhooked = true;
        tracing::warn!(
            target: "looplag",
            runtime = %self.inner.config.runtime_name,
            "stall detection is off for runtime `{}`: none of its worker threads has run \
             looplag's park hooks; call LoopLag::hook_runtime on the builder of the runtime \
             passed to LoopLag::start",
            self.inner.config.runtime_name
        );
    }

    /// The watchdog is stopping: close every open stall at the current time.
    fn finish(&mut self) {
        let anchor = Anchor::now();
        while let Some(active) = self.stalls.active.pop() {
            let end = PollEnd {
                at: anchor.raw,
                cpu: None,
            };
            self.end(active, end);
        }
        // Give pending stacks a moment to arrive before ending their spans without them.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.stalls.finishing.is_empty() && Instant::now() < deadline {
            self.finish_waiting(clock::raw(), false);
            std::thread::sleep(Duration::from_millis(5));
        }
        self.finish_waiting(anchor.raw, true);
        self.publisher.close();
    }
}

/// The WARN for a runtime whose builder did not get looplag's hooks.
fn warn_unhooked(runtime_name: &str, multi_thread: bool) {
    if multi_thread {
        tracing::warn!(
            target: "looplag",
            runtime = %runtime_name,
            "exact stall detection is off for runtime `{runtime_name}`: LoopLag::hook_runtime \
             was not called on its builder, so looplag cannot tell its workers from blocking \
             threads; stalls are estimated from tokio's worker metrics instead, without the \
             culprit's span or thread"
        );
    } else {
        tracing::warn!(
            target: "looplag",
            runtime = %runtime_name,
            "stall detection is off for runtime `{runtime_name}`: LoopLag::hook_runtime was not \
             called on its builder; only tokio.eventloop.delay is exported"
        );
    }
}
