//! The one-line setup: the process's global instance, the layer that reaches it
//! ([`layer`]), and the runtime `#[looplag::main]` runs its function on
//! ([`__private::Main`]).

use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::config::Builder;
use crate::instance::{LoopLag, Watchdog};
use crate::layer::LoopLagLayer;

/// The instance `#[looplag::main]` created, if any.
static GLOBAL: OnceLock<LoopLag> = OnceLock::new();

/// The watchdog `#[looplag::main]` started, until [`shutdown`] or the end of the function.
static RUNNING: Mutex<Option<Watchdog>> = Mutex::new(None);

/// Stops the watchdog `#[looplag::main]` started, at once: stalls still going are ended and
/// reported, and their stacks get up to two seconds to arrive, so that everything looplag
/// has is handed to the OpenTelemetry providers. Call it at the end of `main`'s body,
/// **before** shutting your providers down (what is exported after their shutdown is lost);
/// without it the watchdog stops when the body returns. Does nothing when no watchdog runs,
/// and the second time.
///
/// # Examples
///
/// ```
/// #[looplag::main(flavor = "current_thread")]
/// async fn main() {
///     // the application, then:
///     looplag::shutdown();
///     // tracer_provider.shutdown(), meter_provider.shutdown()
/// }
/// # #[allow(clippy::main_recursion)]
/// # fn run() { main() }
/// # run();
/// ```
pub fn shutdown() {
    let running = match RUNNING.lock() {
        Ok(mut running) => running.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    drop(running);
}

/// The `tracing` layer for the process's global instance: the one `#[looplag::main]` creates
/// before the function's body runs.
///
/// Every looplag layer feeds the same process-wide state, so this is the same layer as
/// [`LoopLag::layer`] of that instance (it honours its
/// [`max_victims`](crate::Builder::max_victims) and [`span_level`](crate::Builder::span_level));
/// before any global instance exists, it is [`LoopLagLayer::default`]. A second instance
/// (tests, a second runtime) works as before through its own [`LoopLag::layer`] or this one.
///
/// # Examples
///
/// ```
/// use tracing_subscriber::layer::SubscriberExt;
/// use tracing_subscriber::util::SubscriberInitExt;
///
/// #[looplag::main(flavor = "current_thread")]
/// async fn main() {
///     tracing_subscriber::registry().with(looplag::layer()).init();
///     // the application
/// }
/// # #[allow(clippy::main_recursion)]
/// # fn run() { main() }
/// # run();
/// ```
pub fn layer<S>() -> LoopLagLayer<S> {
    match GLOBAL.get() {
        Some(looplag) => looplag.layer(),
        None => LoopLagLayer::default(),
    }
}

/// What `#[looplag::main]` expands to. Not a public API: its shape may change in any
/// release.
#[doc(hidden)]
pub(crate) mod __private {
    use super::*;

    /// The runtime and the instance of one `#[looplag::main]` function.
    #[derive(Debug)]
    pub struct Main {
        current_thread: bool,
        worker_threads: Option<usize>,
        builder: Builder,
    }

    impl Default for Main {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Main {
        /// Settings from the `LOOPLAG_*` environment, a multi-thread runtime.
        pub fn new() -> Self {
            Main {
                current_thread: false,
                worker_threads: None,
                builder: LoopLag::builder().from_env(),
            }
        }

        /// `flavor = "current_thread"`.
        pub fn current_thread(self) -> Self {
            Main {
                current_thread: true,
                ..self
            }
        }

        /// `worker_threads = n`.
        pub fn worker_threads(self, count: usize) -> Self {
            Main {
                worker_threads: Some(count),
                ..self
            }
        }

        /// `runtime_name = ".."` (wins over `LOOPLAG_RUNTIME_NAME`, as a builder call does).
        pub fn runtime_name(self, name: &str) -> Self {
            Main {
                builder: self.builder.runtime_name(name),
                ..self
            }
        }

        /// `stall_threshold = ".."`.
        pub fn stall_threshold(self, threshold: Duration) -> Self {
            Main {
                builder: self.builder.stall_threshold(threshold),
                ..self
            }
        }

        /// `sample_interval = ".."`.
        pub fn sample_interval(self, interval: Duration) -> Self {
            Main {
                builder: self.builder.sample_interval(interval),
                ..self
            }
        }

        /// Builds the instance (a bad setting stops the program here, before `body` runs,
        /// with `build()`'s message), makes it the global one, builds the runtime with its
        /// hooks, starts the watchdog, runs `body` to completion and stops the watchdog.
        pub fn run<T, F>(self, body: F) -> T
        where
            F: Future<Output = T>,
        {
            let looplag = match self.builder.build() {
                Ok(looplag) => looplag,
                Err(err) => fail("looplag's settings", &err),
            };
            // The first instance stays the global one: layers share their state anyway.
            let _ = GLOBAL.set(looplag.clone());
            let mut builder = if self.current_thread {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                if let Some(count) = self.worker_threads {
                    builder.worker_threads(count);
                }
                builder
            };
            builder.enable_all();
            looplag.hook_runtime(&mut builder);
            let runtime = match builder.build() {
                Ok(runtime) => runtime,
                Err(err) => fail("the tokio runtime", &err),
            };
            let watchdog = match looplag.start(runtime.handle()) {
                Ok(watchdog) => watchdog,
                Err(err) => fail("looplag's watchdog", &err),
            };
            if let Ok(mut running) = RUNNING.lock() {
                *running = Some(watchdog);
            }
            let output = runtime.block_on(body);
            shutdown();
            output
        }
    }

    /// Stops the program before `main`'s body runs: what could not start, and why.
    fn fail(what: &str, err: &dyn std::fmt::Display) -> ! {
        eprintln!("error: {what} could not start: {err}");
        std::process::exit(1)
    }
}
