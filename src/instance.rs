//! `LoopLag` (one configured instance), its runtime hooks, and the `Watchdog` guard.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::Meter;

use crate::clock;
use crate::config::{Builder, Config, StallCallback};
use crate::error::Error;
use crate::hot::doze::Doze;
use crate::hot::slots::{self, Registry};
use crate::layer::LoopLagLayer;
use crate::watchdog;
use crate::watchdog::Inner;

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// One looplag instance: watches one tokio runtime.
///
/// Build it with [`LoopLag::builder`], add its [`layer`](LoopLag::layer) to the `tracing`
/// subscriber, [`hook_runtime`](LoopLag::hook_runtime) on the runtime's builder, then
/// [`start`](LoopLag::start) it on the runtime's handle. Cloning is cheap and clones share
/// everything.
///
/// # Examples
///
/// ```
/// use tracing_subscriber::layer::SubscriberExt;
/// use tracing_subscriber::util::SubscriberInitExt;
///
/// let looplag = looplag::LoopLag::builder().runtime_name("main").build()?;
/// tracing_subscriber::registry().with(looplag.layer()).init();
///
/// let mut builder = tokio::runtime::Builder::new_multi_thread();
/// builder.enable_all();
/// looplag.hook_runtime(&mut builder);
/// let runtime = builder.build().expect("runtime");
/// let watchdog = looplag.start(runtime.handle())?;
///
/// runtime.block_on(async { /* your application */ });
/// drop(watchdog);
/// # Ok::<(), looplag::Error>(())
/// ```
#[derive(Clone)]
pub struct LoopLag {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for LoopLag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopLag")
            .field("config", &self.inner.config)
            .field("hooked", &self.inner.hooked.load(Ordering::Relaxed))
            .field("running", &self.inner.running.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl LoopLag {
    /// Starts configuring an instance. See [`Builder`] for every setting.
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub(crate) fn from_parts(
        config: Config,
        meter: Option<Meter>,
        tracer: Option<BoxedTracer>,
        on_stall: Option<StallCallback>,
    ) -> Self {
        clock::init();
        LoopLag {
            inner: Arc::new(Inner {
                config,
                meter,
                tracer,
                on_stall,
                registry: Registry::new(NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)),
                doze: Doze::new(),
                hooked: AtomicBool::new(false),
                running: AtomicBool::new(false),
            }),
        }
    }

    /// The `tokio.runtime.name` this instance reports.
    pub fn runtime_name(&self) -> &str {
        &self.inner.config.runtime_name
    }

    /// The validated [`sample_interval`](Builder::sample_interval) (builder, environment or
    /// default).
    pub fn sample_interval(&self) -> std::time::Duration {
        self.inner.config.sample_interval
    }

    /// The validated [`stall_threshold`](Builder::stall_threshold).
    pub fn stall_threshold(&self) -> std::time::Duration {
        self.inner.config.stall_threshold
    }

    /// The validated [`max_victims`](Builder::max_victims).
    pub fn max_victims(&self) -> usize {
        self.inner.config.max_victims
    }

    /// The validated [`max_stall_logs_per_second`](Builder::max_stall_logs_per_second).
    pub fn max_stall_logs_per_second(&self) -> u32 {
        self.inner.config.max_stall_logs_per_second
    }

    /// Whether stall stacks are captured: [`capture_stacks`](Builder::capture_stacks) is on,
    /// [`max_stacks_per_minute`](Builder::max_stacks_per_minute) is not 0, and the platform
    /// supports it (Linux x86_64).
    pub fn captures_stacks(&self) -> bool {
        self.inner.config.stacks == crate::config::StackSupport::Enabled
    }

    /// The validated [`stack_signal`](Builder::stack_signal).
    pub fn stack_signal(&self) -> i32 {
        self.inner.config.stack_signal
    }

    /// The validated [`max_stacks_per_minute`](Builder::max_stacks_per_minute).
    pub fn max_stacks_per_minute(&self) -> u32 {
        self.inner.config.max_stacks_per_minute
    }

    /// The validated [`span_level`](Builder::span_level).
    pub fn span_level(&self) -> tracing::Level {
        self.inner.config.span_level
    }

    /// The function path prefixes treated as library code, see
    /// [`Builder::library_prefixes`].
    pub fn library_prefixes(&self) -> &[String] {
        &self.inner.config.library_prefixes
    }

    /// The bound on distinct culprit function names on the metrics, see
    /// [`Builder::max_culprit_functions`].
    pub fn max_culprit_functions(&self) -> usize {
        self.inner.config.max_culprit_functions
    }

    /// The `tracing` layer to add to the subscriber.
    ///
    /// The layer finds the culprit span of a stall and marks the request spans that waited.
    /// All instances share its state, so one layer serves every runtime in the process. If
    /// this instance was built with [`max_victims(0)`](Builder::max_victims), the layer
    /// marks no victims.
    ///
    /// # Filtering
    ///
    /// The layer asks for no event and for spans at or above
    /// [`span_level`](Builder::span_level) through a per-layer filter, so adding it never
    /// switches on an event callsite the other layers' filters had off; its span enter and
    /// exit cost two slot writes and no registry lookup (see [`LoopLagLayer`]).
    ///
    /// A filter applied to the whole subscriber (an `EnvFilter` or `LevelFilter` added with
    /// `.with(filter)` rather than `.with_filter(filter)` on one layer) also filters looplag:
    /// spans it turns off are invisible to looplag, so stalls in them lose their culprit
    /// span and victims, and looplag's own WARN lines (target `looplag`) are dropped when it
    /// turns WARN off for that target. looplag says so once on stderr when that happens (see
    /// the README's "Setup").
    ///
    /// # Examples
    ///
    /// ```
    /// use tracing_subscriber::layer::SubscriberExt;
    ///
    /// let looplag = looplag::LoopLag::builder().build()?;
    /// let subscriber = tracing_subscriber::registry().with(looplag.layer());
    /// tracing::subscriber::with_default(subscriber, || {
    ///     assert!(!tracing::enabled!(tracing::Level::DEBUG)); // looplag wants no event
    /// });
    /// # Ok::<(), looplag::Error>(())
    /// ```
    pub fn layer<S>(&self) -> LoopLagLayer<S> {
        LoopLagLayer::new(
            self.inner.config.max_victims > 0,
            self.inner.config.span_level,
        )
    }

    /// Installs looplag's hooks on a tokio runtime builder.
    ///
    /// Stall detection needs these hooks: only the park/unpark hooks tell a runtime worker
    /// apart from a `spawn_blocking` thread. Built with `--cfg tokio_unstable`, the task poll
    /// hooks are installed too, which makes every poll's boundaries exact and adds the task
    /// id and spawn location to stall spans.
    ///
    /// Tokio keeps one hook of each kind, so this replaces any `on_thread_park`,
    /// `on_thread_unpark` (and, under `tokio_unstable`, `on_before_task_poll` and
    /// `on_after_task_poll`) hook set before; to combine looplag with your own, call
    /// [`park_hook`](LoopLag::park_hook) and [`unpark_hook`](LoopLag::unpark_hook) from
    /// yours.
    ///
    /// `#[tokio::main]` cannot take hooks; build the runtime by hand instead:
    ///
    /// ```
    /// # let looplag = looplag::LoopLag::builder().build()?;
    /// let mut builder = tokio::runtime::Builder::new_multi_thread();
    /// builder.enable_all();
    /// looplag.hook_runtime(&mut builder);
    /// let runtime = builder.build().expect("runtime");
    /// runtime.block_on(async { /* async main */ });
    /// # Ok::<(), looplag::Error>(())
    /// ```
    pub fn hook_runtime(&self, builder: &mut tokio::runtime::Builder) {
        let park = self.park_hook();
        let unpark = self.unpark_hook();
        builder.on_thread_park(park).on_thread_unpark(unpark);
        #[cfg(tokio_unstable)]
        {
            self.inner
                .registry
                .poll_hooks
                .store(true, Ordering::Relaxed);
            let before = Arc::clone(&self.inner);
            let after = Arc::clone(&self.inner);
            builder
                .on_before_task_poll(move |meta| {
                    let id = task_id_u64(meta.id());
                    let spawned_at = meta.spawned_at();
                    before
                        .registry
                        .with_slot(|slot| slot.task_poll_start(id, spawned_at));
                })
                .on_after_task_poll(move |_meta| {
                    after.registry.with_slot(|slot| slot.poll_end());
                });
        }
        self.inner.hooked.store(true, Ordering::Relaxed);
    }

    /// The park hook alone, for runtimes whose builder already has its own `on_thread_park`:
    /// call it first thing from yours. Prefer [`hook_runtime`](LoopLag::hook_runtime).
    pub fn park_hook(&self) -> impl Fn() + Send + Sync + 'static {
        self.inner.hooked.store(true, Ordering::Relaxed);
        let inner = Arc::clone(&self.inner);
        move || inner.registry.with_slot(|slot| slot.park())
    }

    /// The unpark hook alone; see [`park_hook`](LoopLag::park_hook).
    pub fn unpark_hook(&self) -> impl Fn() + Send + Sync + 'static {
        self.inner.hooked.store(true, Ordering::Relaxed);
        let inner = Arc::clone(&self.inner);
        move || {
            inner.registry.with_slot(|slot| slot.unpark());
            inner.doze.worker_unparked();
        }
    }

    /// Runs `poll`, one poll of a future that neither a span nor a hook shows looplag (the
    /// body `block_on` runs in `#[looplag::test]`), marked on the calling thread's slot as a
    /// span's poll is: a poll that blocks is found exactly, with this thread's stack. Wakes a
    /// dozing watchdog first, as an unparking worker does (a multi-thread test's body runs
    /// on a thread that is no worker, while every worker may be parked).
    pub(crate) fn watched_poll<R>(&self, poll: impl FnOnce() -> R) -> R {
        /// Ends the poll also when `poll` unwinds.
        struct End<'a>(&'a Inner);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                self.0.registry.with_slot(|slot| slot.exit(slots::NO_SPAN));
            }
        }
        self.inner.registry.with_slot(|slot| {
            // A test body is no request: a victim window it starts in marks nothing.
            let _ = slot.enter(slots::NO_SPAN);
        });
        self.inner.doze.worker_unparked();
        let _end = End(&self.inner);
        poll()
    }

    /// Starts the watchdog thread and the delay probe for the runtime behind `handle`.
    ///
    /// The watchdog runs until the returned [`Watchdog`] is dropped. On a runtime that was
    /// not built through [`hook_runtime`](LoopLag::hook_runtime), looplag says once, in a
    /// WARN, that exact stall detection is off: a current-thread runtime then exports only
    /// the delay histogram, and a multi-thread runtime also gets stalls estimated from
    /// tokio's worker metrics, without the culprit's span or thread.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyStarted`] while a watchdog of this instance runs;
    /// [`Error::WatchdogThread`] if the thread cannot be spawned.
    #[must_use = "the watchdog stops when the returned guard is dropped"]
    pub fn start(&self, handle: &tokio::runtime::Handle) -> Result<Watchdog, Error> {
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyStarted {
                runtime_name: self.inner.config.runtime_name.clone(),
            });
        }
        if self.inner.hooked.load(Ordering::Relaxed)
            && matches!(
                handle.runtime_flavor(),
                tokio::runtime::RuntimeFlavor::CurrentThread
            )
        {
            self.inner.registry.register_current_thread_driver();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let inner = Arc::clone(&self.inner);
        let thread_handle = handle.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("looplag-{}", self.inner.config.runtime_name))
            .spawn(move || watchdog::run(inner, thread_handle, thread_stop));
        if spawned.is_ok() {
            self.wait_for_workers(handle);
        }
        match spawned {
            Ok(thread) => Ok(Watchdog {
                stop,
                thread: Some(thread),
                inner: Arc::clone(&self.inner),
            }),
            Err(err) => {
                self.inner.running.store(false, Ordering::Release);
                Err(Error::WatchdogThread(err))
            }
        }
    }
}

impl Builder {
    /// Validates every setting and builds the instance.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for the first setting outside its accepted range, including a
    /// [`stack_signal`](Builder::stack_signal) that is not accepted or already has a handler;
    /// [`Error::StackHandler`] if the operating system refuses to install the handler.
    #[must_use = "looplag does nothing until its layer is installed and it is started"]
    pub fn build(self) -> Result<LoopLag, Error> {
        let config = self.validate()?;
        Ok(LoopLag::from_parts(
            config,
            self.meter,
            self.tracer,
            self.on_stall,
        ))
    }
}

impl LoopLag {
    /// A worker registers with looplag the first time it parks. On a multi-thread runtime
    /// that was just built, give its workers a moment (at most `REGISTRATION_WAIT`) to do
    /// so, so that work spawned right after `start` is watched exactly from its first poll.
    /// A worker that is already busy registers at its next park; until then the watchdog
    /// still sees it through tokio's worker metrics.
    fn wait_for_workers(&self, handle: &tokio::runtime::Handle) {
        const REGISTRATION_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
        if !self.inner.hooked.load(Ordering::Relaxed)
            || !matches!(
                handle.runtime_flavor(),
                tokio::runtime::RuntimeFlavor::MultiThread
            )
        {
            return;
        }
        let workers = handle.metrics().num_workers();
        let deadline = std::time::Instant::now() + REGISTRATION_WAIT;
        while self.inner.registry.live().len() < workers && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// `tokio::task::Id` only exposes its number through `Display`; read it without allocating.
#[cfg(tokio_unstable)]
fn task_id_u64(id: tokio::task::Id) -> u64 {
    const _: () = assert!(std::mem::size_of::<tokio::task::Id>() == 8);
    // SAFETY: `Id` is a struct with a single `NonZeroU64` field and, as asserted above, a
    // size of 8 bytes: it has no padding and its bytes are that integer's bytes, which are
    // a valid `u64`. `Display` for `Id` prints the same integer.
    unsafe { std::mem::transmute_copy::<tokio::task::Id, u64>(&id) }
}

/// The running watchdog; it stops, and its thread ends, when this guard is dropped.
///
/// # Examples
///
/// ```
/// let looplag = looplag::LoopLag::builder().build()?;
/// let runtime = tokio::runtime::Runtime::new().expect("runtime");
/// let watchdog = looplag.start(runtime.handle())?;
/// assert!(looplag.start(runtime.handle()).is_err()); // one watchdog per instance
/// drop(watchdog);
/// let again = looplag.start(runtime.handle())?;      // fine once the first is gone
/// # drop(again);
/// # Ok::<(), looplag::Error>(())
/// ```
#[must_use = "the watchdog stops when this guard is dropped"]
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    inner: Arc<Inner>,
}

impl fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watchdog")
            .field("runtime_name", &self.inner.config.runtime_name)
            .finish_non_exhaustive()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            if thread.thread().id() != std::thread::current().id() {
                // A panic on the watchdog thread has already been reported; never panic here.
                let _ = thread.join();
            }
        }
        self.inner.running.store(false, Ordering::Release);
    }
}
