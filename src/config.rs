//! The builder: every setting, its default, and its validation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::Meter;

use crate::{Error, LoopLag, StallReport};

/// Default [`Builder::runtime_name`]: `"main"`.
pub const DEFAULT_RUNTIME_NAME: &str = "main";
/// Default [`Builder::sample_interval`]: 10 ms.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// Default [`Builder::stall_threshold`]: 50 ms.
pub const DEFAULT_STALL_THRESHOLD: Duration = Duration::from_millis(50);
/// Default [`Builder::max_victims`]: 1000 spans per stall.
pub const DEFAULT_MAX_VICTIMS: usize = 1000;
/// Default [`Builder::stack_signal`]: 42, a real-time signal (`SIGRTMIN + 8` with glibc) that
/// common runtimes, profilers and tools leave alone.
pub const DEFAULT_STACK_SIGNAL: i32 = crate::stack::DEFAULT_STACK_SIGNAL;
/// Default [`Builder::max_stacks_per_minute`]: 30.
pub const DEFAULT_MAX_STACKS_PER_MINUTE: u32 = 30;

const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(1);
const MAX_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
const MAX_STALL_THRESHOLD: Duration = Duration::from_secs(3600);
const MAX_RUNTIME_NAME_LEN: usize = 128;
const MAX_VICTIMS_LIMIT: usize = 100_000;
const MAX_STACKS_PER_MINUTE_LIMIT: u32 = 6000;

pub(crate) type StallCallback = Arc<dyn Fn(&StallReport) + Send + Sync>;

/// Configures and builds a [`LoopLag`]; get one from [`LoopLag::builder`].
///
/// Setters take and return the builder, so calls chain. Nothing is checked until
/// [`build`](Builder::build), which validates every setting and returns an
/// [`Error::InvalidSetting`] naming the first bad one.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// let looplag = looplag::LoopLag::builder()
///     .runtime_name("api")
///     .sample_interval(Duration::from_millis(5))
///     .stall_threshold(Duration::from_millis(100))
///     .build()?;
/// assert_eq!(looplag.runtime_name(), "api");
/// # Ok::<(), looplag::Error>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    pub(crate) runtime_name: String,
    pub(crate) sample_interval: Duration,
    pub(crate) stall_threshold: Duration,
    pub(crate) max_victims: usize,
    pub(crate) capture_stacks: bool,
    pub(crate) stack_signal: i32,
    pub(crate) max_stacks_per_minute: u32,
    pub(crate) meter: Option<Meter>,
    pub(crate) tracer: Option<BoxedTracer>,
    pub(crate) on_stall: Option<StallCallback>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("runtime_name", &self.runtime_name)
            .field("sample_interval", &self.sample_interval)
            .field("stall_threshold", &self.stall_threshold)
            .field("max_victims", &self.max_victims)
            .field("capture_stacks", &self.capture_stacks)
            .field("stack_signal", &self.stack_signal)
            .field("max_stacks_per_minute", &self.max_stacks_per_minute)
            .field("meter", &self.meter.as_ref().map(|_| "custom"))
            .field("tracer", &self.tracer.as_ref().map(|_| "custom"))
            .field("on_stall", &self.on_stall.as_ref().map(|_| "set"))
            .finish()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            runtime_name: DEFAULT_RUNTIME_NAME.to_string(),
            sample_interval: DEFAULT_SAMPLE_INTERVAL,
            stall_threshold: DEFAULT_STALL_THRESHOLD,
            max_victims: DEFAULT_MAX_VICTIMS,
            capture_stacks: true,
            stack_signal: DEFAULT_STACK_SIGNAL,
            max_stacks_per_minute: DEFAULT_MAX_STACKS_PER_MINUTE,
            meter: None,
            tracer: None,
            on_stall: None,
        }
    }
}

/// The validated settings of one instance.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) runtime_name: String,
    pub(crate) sample_interval: Duration,
    pub(crate) stall_threshold: Duration,
    pub(crate) max_victims: usize,
    /// Stacks are captured (the handler is installed and the platform supports it).
    pub(crate) stacks: StackSupport,
    pub(crate) max_stacks_per_minute: u32,
}

/// Whether stall stacks can be captured, decided at `build()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StackSupport {
    Enabled,
    Disabled,
    Unsupported,
}

impl Builder {
    /// Sets the value of the `tokio.runtime.name` attribute on every metric and span, so
    /// several runtimes in one process can be told apart.
    ///
    /// Accepted: 1 to 128 characters, no control characters. By default, `"main"`.
    pub fn runtime_name(self, name: impl Into<String>) -> Self {
        Builder {
            runtime_name: name.into(),
            ..self
        }
    }

    /// Sets how often the watchdog wakes up to scan the workers and inject a delay probe.
    ///
    /// Shorter intervals detect stalls sooner and sample delay more often, for a little more
    /// CPU on the watchdog thread. Accepted: 1 ms to 1 s. By default, 10 ms.
    pub fn sample_interval(self, interval: Duration) -> Self {
        Builder {
            sample_interval: interval,
            ..self
        }
    }

    /// Sets how long one poll must run before it counts as a stall.
    ///
    /// Accepted: from the sample interval up to one hour. By default, 50 ms.
    pub fn stall_threshold(self, threshold: Duration) -> Self {
        Builder {
            stall_threshold: threshold,
            ..self
        }
    }

    /// Sets how many waiting request spans get the victim event per stall; the rest are
    /// counted in the stall span's `tokio.eventloop.stall.victims_dropped` attribute.
    ///
    /// `0` turns victim events off. Accepted: 0 to 100 000. By default, 1000.
    pub fn max_victims(self, max: usize) -> Self {
        Builder {
            max_victims: max,
            ..self
        }
    }

    /// Sets whether the watchdog records the blocked thread's stack when it detects a stall.
    ///
    /// The stack is taken while the thread is still blocked, by sending it
    /// [`stack_signal`](Builder::stack_signal); the handler copies the thread's registers and
    /// stack and returns, and the watchdog unwinds and symbolizes the copy. Linux x86_64 only;
    /// elsewhere reports say no stack was taken. By default, `true`.
    pub fn capture_stacks(self, capture: bool) -> Self {
        Builder {
            capture_stacks: capture,
            ..self
        }
    }

    /// Sets the signal sent to a stalled thread to record its stack.
    ///
    /// `build()` installs the handler and fails if another handler is already installed for
    /// that signal, rather than replacing it. Accepted: `SIGUSR1`, `SIGUSR2` or a real-time
    /// signal (`SIGRTMIN..=SIGRTMAX`). By default, 42 ([`DEFAULT_STACK_SIGNAL`]).
    pub fn stack_signal(self, signal: i32) -> Self {
        Builder {
            stack_signal: signal,
            ..self
        }
    }

    /// Sets how many stacks the watchdog may capture per minute (a token bucket that refills
    /// continuously). Stalls over the limit are still detected, counted and reported; their
    /// reports say the stack was rate limited and how many captures were suppressed.
    ///
    /// `0` captures no stacks. Accepted: 0 to 6000. By default, 30.
    pub fn max_stacks_per_minute(self, max: u32) -> Self {
        Builder {
            max_stacks_per_minute: max,
            ..self
        }
    }

    /// Sets the meter the three instruments are created on.
    ///
    /// By default, the global meter provider's meter with scope `looplag`.
    pub fn meter(self, meter: Meter) -> Self {
        Builder {
            meter: Some(meter),
            ..self
        }
    }

    /// Sets the tracer that creates stall spans.
    ///
    /// By default, the global tracer provider's tracer with scope `looplag`.
    pub fn tracer<T>(self, tracer: T) -> Self
    where
        T: opentelemetry::trace::Tracer + Send + Sync + 'static,
        T::Span: Send + Sync + 'static,
    {
        Builder {
            tracer: Some(BoxedTracer::new(Box::new(tracer))),
            ..self
        }
    }

    /// Sets a callback called on every stall report: when a stall is detected, again at
    /// doubling intervals while it lasts, and once when it ends.
    ///
    /// The callback runs on the watchdog thread, outside the runtime, so it runs even while
    /// every worker is stuck. Keep it short and never wait on the runtime from it: the
    /// watchdog does nothing else while it runs. By default, no callback.
    ///
    /// # Examples
    ///
    /// ```
    /// let looplag = looplag::LoopLag::builder()
    ///     .on_stall(|report| eprintln!("{report}"))
    ///     .build()?;
    /// # drop(looplag);
    /// # Ok::<(), looplag::Error>(())
    /// ```
    pub fn on_stall<F>(self, callback: F) -> Self
    where
        F: Fn(&StallReport) + Send + Sync + 'static,
    {
        Builder {
            on_stall: Some(Arc::new(callback)),
            ..self
        }
    }

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

    fn validate(&self) -> Result<Config, Error> {
        let name = &self.runtime_name;
        if name.is_empty()
            || name.chars().count() > MAX_RUNTIME_NAME_LEN
            || name.chars().any(char::is_control)
        {
            return Err(Error::InvalidSetting {
                setting: "runtime_name",
                value: format!("{name:?}"),
                accepted: "1 to 128 characters, no control characters",
            });
        }
        if !(MIN_SAMPLE_INTERVAL..=MAX_SAMPLE_INTERVAL).contains(&self.sample_interval) {
            return Err(Error::InvalidSetting {
                setting: "sample_interval",
                value: format!("{:?}", self.sample_interval),
                accepted: "a duration from 1ms to 1s",
            });
        }
        if self.stall_threshold < self.sample_interval || self.stall_threshold > MAX_STALL_THRESHOLD
        {
            return Err(Error::InvalidSetting {
                setting: "stall_threshold",
                value: format!("{:?}", self.stall_threshold),
                accepted: "a duration from the sample interval up to 1h",
            });
        }
        if self.max_victims > MAX_VICTIMS_LIMIT {
            return Err(Error::InvalidSetting {
                setting: "max_victims",
                value: self.max_victims.to_string(),
                accepted: "a count from 0 to 100000",
            });
        }
        if self.max_stacks_per_minute > MAX_STACKS_PER_MINUTE_LIMIT {
            return Err(Error::InvalidSetting {
                setting: "max_stacks_per_minute",
                value: self.max_stacks_per_minute.to_string(),
                accepted: "a count from 0 to 6000",
            });
        }
        let stacks = if !self.capture_stacks || self.max_stacks_per_minute == 0 {
            StackSupport::Disabled
        } else {
            self.install_stack_handler()?
        };
        Ok(Config {
            runtime_name: self.runtime_name.clone(),
            sample_interval: self.sample_interval,
            stall_threshold: self.stall_threshold,
            max_victims: self.max_victims,
            stacks,
            max_stacks_per_minute: self.max_stacks_per_minute,
        })
    }

    fn install_stack_handler(&self) -> Result<StackSupport, Error> {
        use crate::stack::StackError;
        const ACCEPTED: &str =
            "SIGUSR1, SIGUSR2 or a real-time signal (SIGRTMIN..=SIGRTMAX) with no other handler";
        match crate::stack::install(self.stack_signal) {
            Ok(()) => Ok(StackSupport::Enabled),
            Err(StackError::Unsupported) => Ok(StackSupport::Unsupported),
            Err(StackError::InvalidSignal { signal }) => Err(Error::InvalidSetting {
                setting: "stack_signal",
                value: signal.to_string(),
                accepted: ACCEPTED,
            }),
            Err(StackError::SignalInUse { signal }) => Err(Error::InvalidSetting {
                setting: "stack_signal",
                value: format!("{signal} (another handler is installed for it)"),
                accepted: ACCEPTED,
            }),
            Err(StackError::Os(err)) => Err(Error::StackHandler(err)),
            Err(other) => Err(Error::StackHandler(std::io::Error::other(
                other.to_string(),
            ))),
        }
    }
}
