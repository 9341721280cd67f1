//! The builder: every setting, its default, and its validation.

use std::ffi::OsString;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::Meter;

pub(crate) mod env;

use crate::error::Error;
use crate::report::StallReport;
pub(crate) use crate::stack::StackSupport;
mod settings;

use settings::{Id, Value, Values, SETTINGS, SIGNAL_ACCEPTED};

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
/// Default [`Builder::max_stall_logs_per_second`]: 10 stall log lines per second.
pub const DEFAULT_MAX_STALL_LOGS_PER_SECOND: u32 = 10;
/// Default [`Builder::span_level`]: `DEBUG`, the level of tower-http's `TraceLayer` request
/// spans.
pub const DEFAULT_SPAN_LEVEL: tracing::Level = tracing::Level::DEBUG;
/// Default [`Builder::max_culprit_functions`]: 100 distinct function names per instance.
pub const DEFAULT_MAX_CULPRIT_FUNCTIONS: usize = 100;

pub(crate) use crate::report::log::StallCallback;

/// Configures and builds a [`LoopLag`](crate::LoopLag); get one from
/// [`LoopLag::builder`](crate::LoopLag::builder).
///
/// Setters take and return the builder, so calls chain. Nothing is checked until
/// [`build`](Builder::build), which validates every setting and returns an
/// [`Error::InvalidSetting`] naming the first bad one.
///
/// Settings can also come from the environment with [`from_env`](Builder::from_env). A
/// value set by a builder method always wins over the environment, whatever the order of
/// the calls.
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
#[derive(Default)]
pub struct Builder {
    /// Values set by builder methods, kept apart from the environment's so that an explicit
    /// call wins over `from_env` whichever comes first.
    explicit: Values<Value>,
    /// The variables `from_env` read (raw: parsed by `build`).
    env: Values<OsString>,
    pub(crate) meter: Option<Meter>,
    pub(crate) tracer: Option<BoxedTracer>,
    pub(crate) on_stall: Option<StallCallback>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("explicit", &self.explicit)
            .field("env", &self.env)
            .field("meter", &self.meter.as_ref().map(|_| "custom"))
            .field("tracer", &self.tracer.as_ref().map(|_| "custom"))
            .field("on_stall", &self.on_stall.as_ref().map(|_| "set"))
            .finish()
    }
}

/// The validated settings of one instance.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) runtime_name: String,
    pub(crate) sample_interval: Duration,
    pub(crate) stall_threshold: Duration,
    pub(crate) max_victims: usize,
    pub(crate) max_stall_logs_per_second: u32,
    /// Stacks are captured (the handler is installed and the platform supports it).
    pub(crate) stacks: StackSupport,
    pub(crate) stack_signal: i32,
    pub(crate) max_stacks_per_minute: u32,
    pub(crate) span_level: tracing::Level,
    /// Function path prefixes of code that is never the culprit frame.
    pub(crate) library_prefixes: Arc<[String]>,
    pub(crate) max_culprit_functions: usize,
}

/// A setting's value with what an error about it must say: the setting's name (builder
/// method or environment variable) and, for a value from the environment, the text given.
struct Resolved {
    value: Value,
    setting: &'static str,
    text: Option<String>,
}

impl Resolved {
    /// An `InvalidSetting` for this value: the environment text when it came from there,
    /// else `shown`.
    fn invalid(&self, shown: impl FnOnce(&Value) -> String, accepted: &'static str) -> Error {
        Error::InvalidSetting {
            setting: self.setting,
            value: match &self.text {
                Some(text) => format!("{text:?}"),
                None => shown(&self.value),
            },
            accepted,
        }
    }
}

impl Builder {
    /// Sets the value of the `tokio.runtime.name` attribute on every metric and span, so
    /// several runtimes in one process can be told apart.
    ///
    /// Accepted: 1 to 128 characters, no control characters. Environment:
    /// `LOOPLAG_RUNTIME_NAME`. By default, `"main"`.
    pub fn runtime_name(self, name: impl Into<String>) -> Self {
        self.with(Id::RuntimeName, Value::Text(name.into()))
    }

    /// Sets how often the watchdog wakes up to scan the workers and inject a delay probe.
    ///
    /// Shorter intervals detect stalls sooner and sample delay more often, for a little more
    /// CPU on the watchdog thread. While every worker of a hooked runtime is parked, the
    /// watchdog wakes only every 20 intervals (the first worker to unpark wakes it at once,
    /// so stalls are detected as promptly), and each delay sample then counts for the
    /// intervals it stands for. Accepted: 1 ms to 1 s. Environment:
    /// `LOOPLAG_SAMPLE_INTERVAL` (e.g. `10ms`). By default, 10 ms.
    pub fn sample_interval(self, interval: Duration) -> Self {
        self.with(Id::SampleInterval, Value::Duration(interval))
    }

    /// Sets how long one poll must run before it counts as a stall.
    ///
    /// Accepted: from the sample interval up to one hour. Environment:
    /// `LOOPLAG_STALL_THRESHOLD` (e.g. `50ms`). By default, 50 ms.
    pub fn stall_threshold(self, threshold: Duration) -> Self {
        self.with(Id::StallThreshold, Value::Duration(threshold))
    }

    /// Sets how many held-up requests get the victim event per stall; the rest are counted
    /// in the stall span's `tokio.eventloop.stall.victims_dropped` attribute.
    ///
    /// A victim is a request that was ready to run during the stall and could not: it is
    /// marked when its first poll after the stall starts on the stalled worker. `0` turns
    /// victim events off; stall spans, stacks and metrics are unchanged. Accepted: 0 to
    /// 100 000. Environment: `LOOPLAG_MAX_VICTIMS`. By default, 1000.
    pub fn max_victims(self, max: usize) -> Self {
        self.with(
            Id::MaxVictims,
            Value::Count(u64::try_from(max).unwrap_or(u64::MAX)),
        )
    }

    /// Sets how many stall log lines (the WARN events "stall in progress" and "stall
    /// ended", target `looplag`) one instance writes per second at most.
    ///
    /// A stall storm (hundreds of short stalls a second) would otherwise flood the logs and
    /// slow the process down further. Lines over the limit are not written; instead, once
    /// the second is over, one WARN line says "N stall reports suppressed in the last
    /// second" (field `suppressed`). Only the log is limited: the `on_stall` callback, the
    /// metrics and the stall spans still get every stall. `0` writes only those summary
    /// lines. Accepted: 0 to 100 000. Environment: `LOOPLAG_MAX_STALL_LOGS_PER_SECOND`. By
    /// default, 10.
    pub fn max_stall_logs_per_second(self, max: u32) -> Self {
        self.with(Id::MaxStallLogsPerSecond, Value::Count(u64::from(max)))
    }

    /// Sets whether the watchdog records the blocked thread's stack when it detects a stall.
    ///
    /// The stack is taken while the thread is still blocked, by sending it
    /// [`stack_signal`](Builder::stack_signal); the handler copies the thread's registers and
    /// stack and returns, the watchdog unwinds the copy and a symbolizer thread names the
    /// frames. Linux x86_64 only; elsewhere reports say no stack was taken. Environment:
    /// `LOOPLAG_CAPTURE_STACKS` (`true` or `false`). By default, `true`.
    ///
    /// The same signal also tells, on stable builds, a current-thread runtime stuck in a poll
    /// outside any span from one that nobody drives (see the README's "What is exact and what
    /// is estimated"): with `false`, such stalls are not reported, only their delay.
    pub fn capture_stacks(self, capture: bool) -> Self {
        self.with(Id::CaptureStacks, Value::Bool(capture))
    }

    /// Sets the signal sent to a stalled thread to record its stack.
    ///
    /// `build()` installs the handler and fails if another handler is already installed for
    /// that signal, rather than replacing it. Accepted: `SIGUSR1`, `SIGUSR2` or a real-time
    /// signal (`SIGRTMIN..=SIGRTMAX`). Environment: `LOOPLAG_STACK_SIGNAL`. By default, 42
    /// ([`DEFAULT_STACK_SIGNAL`]).
    pub fn stack_signal(self, signal: i32) -> Self {
        self.with(Id::StackSignal, Value::Signal(signal))
    }

    /// Sets how many stacks the watchdog may capture per minute (a token bucket that refills
    /// continuously). Stalls over the limit are still detected, counted and reported; their
    /// reports say the stack was rate limited and how many captures were suppressed.
    ///
    /// `0` captures no stacks. Accepted: 0 to 6000. Environment:
    /// `LOOPLAG_MAX_STACKS_PER_MINUTE`. By default, 30.
    pub fn max_stacks_per_minute(self, max: u32) -> Self {
        self.with(Id::MaxStacksPerMinute, Value::Count(u64::from(max)))
    }

    /// Sets the least severe level of the spans looplag's layer asks for: spans at this
    /// level or above (`DEBUG` takes `DEBUG`, `INFO`, `WARN` and `ERROR` spans).
    ///
    /// looplag needs every span that can be a request (the culprit's root, and the victims)
    /// or the innermost span of a poll (the culprit). A span below this level exists only
    /// when another layer wants it; looplag then sees it like any other. When no layer wants
    /// it, a stall inside it is reported under the nearest enclosing span that exists, or
    /// under none. The layer asks for no events at all, whatever this level (see
    /// [`LoopLag::layer`](crate::LoopLag::layer)).
    ///
    /// The trade: a span looplag asks for exists even when no other layer wanted it, and
    /// the registry then creates, tracks and closes it. Measured on a loaded 2-vCPU VM
    /// (release build, `info_span!` created, entered and closed, no other layer wanting
    /// it): about 1 ns without looplag, 0.4 to 0.7 µs with it. In mini-redis
    /// (`#[instrument]` spans per connection and per command) whose only other layer logged
    /// at WARN, those spans cost +5 % CPU per 100 000 requests. A more severe level (`INFO`,
    /// `WARN`) saves that cost for the spans below it and loses them as culprits and
    /// victims. Environment: `LOOPLAG_SPAN_LEVEL` (`trace`, `debug`, `info`, `warn` or
    /// `error`). By default, `DEBUG` ([`DEFAULT_SPAN_LEVEL`]): tower-http's `TraceLayer`
    /// request spans are DEBUG, while `TRACE` spans (tokio's own task instrumentation, h2,
    /// hyper internals) are too many to create when nothing else wants them.
    pub fn span_level(self, level: tracing::Level) -> Self {
        self.with(Id::SpanLevel, Value::Level(level))
    }

    /// Sets function path prefixes of code that looplag treats as library code, besides the
    /// standard library, tokio and the crates between: such a frame is never a stall's
    /// culprit, its caller is.
    ///
    /// The culprit frame (`code.function.name` on the stall span and the duration
    /// histogram, the first line of the stall log) is the first frame of the blocked thread's
    /// stack that belongs to the application. Use this for the application's own wrappers
    /// (a database client, an SDK) so that the code calling them is named instead. A prefix
    /// is a Rust path and matches on a path boundary: `app::db` covers `app::db`,
    /// `app::db::query` and `<app::db::Pool as Drop>::drop`, not `app::dbx`. A prefix with a
    /// `/` matches the frame's source file instead (`src/db/`, `vendor/sdk/`): with
    /// `debug = "line-tables-only"`, frames of inlined functions carry only their short name
    /// (`query`), never a path to match.
    ///
    /// Accepted: at most 100 prefixes of 1 to 256 characters, without whitespace, control
    /// characters or commas. Environment: `LOOPLAG_LIBRARY_PREFIXES`, comma-separated
    /// (`my_sdk,app::db`). By default, none.
    pub fn library_prefixes<I, S>(self, prefixes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let prefixes = prefixes.into_iter().map(Into::into).collect();
        self.with(Id::LibraryPrefixes, Value::List(prefixes))
    }

    /// Sets how many distinct culprit function names one instance puts on the
    /// `tokio.eventloop.stall.duration` histogram (attribute `code.function.name`).
    ///
    /// The first `max` distinct functions keep their name; later new ones share the value
    /// `other`, so that a process cannot grow its metric series without bound. Stalls
    /// without a culprit (no stack: rate limited, unsupported platform; or no application
    /// frame in it) carry `unknown`. Stall spans and logs always name the function. `0`
    /// gives every culprit the value `other`. Accepted: 0 to 10 000. Environment:
    /// `LOOPLAG_MAX_CULPRIT_FUNCTIONS`. By default, 100.
    pub fn max_culprit_functions(self, max: usize) -> Self {
        self.with(
            Id::MaxCulpritFunctions,
            Value::Count(u64::try_from(max).unwrap_or(u64::MAX)),
        )
    }

    /// Reads settings from the environment; values set by builder methods still win,
    /// whether they are set before or after this call.
    ///
    /// | variable | setting | form |
    /// |---|---|---|
    /// | `LOOPLAG_RUNTIME_NAME` | [`runtime_name`](Builder::runtime_name) | text |
    /// | `LOOPLAG_SAMPLE_INTERVAL` | [`sample_interval`](Builder::sample_interval) | duration |
    /// | `LOOPLAG_STALL_THRESHOLD` | [`stall_threshold`](Builder::stall_threshold) | duration |
    /// | `LOOPLAG_MAX_VICTIMS` | [`max_victims`](Builder::max_victims) | count |
    /// | `LOOPLAG_MAX_STALL_LOGS_PER_SECOND` | [`max_stall_logs_per_second`](Builder::max_stall_logs_per_second) | count |
    /// | `LOOPLAG_CAPTURE_STACKS` | [`capture_stacks`](Builder::capture_stacks) | `true` or `false` |
    /// | `LOOPLAG_STACK_SIGNAL` | [`stack_signal`](Builder::stack_signal) | count |
    /// | `LOOPLAG_MAX_STACKS_PER_MINUTE` | [`max_stacks_per_minute`](Builder::max_stacks_per_minute) | count |
    /// | `LOOPLAG_LIBRARY_PREFIXES` | [`library_prefixes`](Builder::library_prefixes) | comma-separated paths |
    /// | `LOOPLAG_MAX_CULPRIT_FUNCTIONS` | [`max_culprit_functions`](Builder::max_culprit_functions) | count |
    /// | `LOOPLAG_SPAN_LEVEL` | [`span_level`](Builder::span_level) | `trace`, `debug`, `info`, `warn` or `error` |
    ///
    /// A duration is a whole number and a unit, `us`, `ms` or `s`, with no space: `250us`,
    /// `50ms`, `1s`. A count is digits only. An empty variable counts as unset. The
    /// variables are read when this method is called; it never fails: a value that does not
    /// parse, or is out of range, makes [`build`](Builder::build) return
    /// [`Error::InvalidSetting`] whose `setting` is the variable's name.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // With LOOPLAG_RUNTIME_NAME=api in the environment, the explicit name still wins:
    /// let looplag = looplag::LoopLag::builder()
    ///     .runtime_name("main")
    ///     .from_env()
    ///     .build()?;
    /// assert_eq!(looplag.runtime_name(), "main");
    /// # Ok::<(), looplag::Error>(())
    /// ```
    pub fn from_env(self) -> Self {
        Builder {
            env: settings::read_env(),
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

    /// Stores an explicit value.
    fn with(mut self, id: Id, value: Value) -> Self {
        self.explicit.set(id, value);
        self
    }

    /// The explicit value of `id` if set, else the environment's (parsed), else the default.
    fn resolve(&self, id: Id) -> Result<Resolved, Error> {
        let setting = id.setting();
        if let Some(value) = self.explicit.get(id) {
            return Ok(Resolved {
                value: value.clone(),
                setting: setting.method,
                text: None,
            });
        }
        let Some(raw) = self.env.get(id) else {
            let default = setting.kind.parse(setting.default);
            // The defaults parse (a unit test checks every row); never panic if one did not.
            let value = default.ok_or(Error::InvalidSetting {
                setting: setting.method,
                value: format!("{:?}", setting.default),
                accepted: setting.kind.form(),
            })?;
            return Ok(Resolved {
                value,
                setting: setting.method,
                text: None,
            });
        };
        let bad = |text: String| Error::InvalidSetting {
            setting: setting.variable,
            value: format!("{text:?}"),
            accepted: setting.kind.form(),
        };
        let Some(text) = raw.to_str() else {
            return Err(bad(raw.to_string_lossy().into_owned()));
        };
        match setting.kind.parse(text) {
            Some(value) => Ok(Resolved {
                value,
                setting: setting.variable,
                text: Some(text.to_string()),
            }),
            None => Err(bad(text.to_string())),
        }
    }

    /// Resolves every setting in table order and checks its range; then installs the stack
    /// handler.
    pub(crate) fn validate(&self) -> Result<Config, Error> {
        let mut resolved: Values<Resolved> = Values::default();
        for (index, setting) in SETTINGS.iter().enumerate() {
            let id = settings::ID_ORDER[index];
            let value = self.resolve(id)?;
            let earlier = |other: Id| match resolved.get(other).map(|r| &r.value) {
                Some(Value::Duration(d)) => Some(*d),
                _ => None,
            };
            if !value.value.in_range(setting.range, &earlier) {
                return Err(value.invalid(Value::shown, setting.accepted));
            }
            resolved.set(id, value);
        }
        let value = |id: Id| resolved.get(id).map(|r| &r.value);
        let text = |id: Id| match value(id) {
            Some(Value::Text(text)) => text.clone(),
            _ => String::new(),
        };
        let duration = |id: Id| match value(id) {
            Some(Value::Duration(d)) => *d,
            _ => Duration::ZERO,
        };
        let count = |id: Id| match value(id) {
            Some(Value::Count(n)) => *n,
            _ => 0,
        };
        // The ranges checked above keep every count within its type.
        let saturate = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let max_stacks_per_minute = saturate(count(Id::MaxStacksPerMinute));
        let capture = matches!(value(Id::CaptureStacks), Some(Value::Bool(true)));
        let (stacks, stack_signal) = match resolved.get(Id::StackSignal) {
            Some(
                signal @ Resolved {
                    value: Value::Signal(number),
                    ..
                },
            ) => {
                let stacks = if !capture || max_stacks_per_minute == 0 {
                    StackSupport::Disabled
                } else {
                    install_stack_handler(signal, *number)?
                };
                (stacks, *number)
            }
            _ => (StackSupport::Disabled, DEFAULT_STACK_SIGNAL),
        };
        Ok(Config {
            runtime_name: text(Id::RuntimeName),
            sample_interval: duration(Id::SampleInterval),
            stall_threshold: duration(Id::StallThreshold),
            max_victims: usize::try_from(count(Id::MaxVictims)).unwrap_or(usize::MAX),
            max_stall_logs_per_second: saturate(count(Id::MaxStallLogsPerSecond)),
            stacks,
            stack_signal,
            max_stacks_per_minute,
            span_level: match value(Id::SpanLevel) {
                Some(Value::Level(level)) => *level,
                _ => DEFAULT_SPAN_LEVEL,
            },
            library_prefixes: match value(Id::LibraryPrefixes) {
                Some(Value::List(prefixes)) => prefixes.clone().into(),
                _ => Arc::from(Vec::new()),
            },
            max_culprit_functions: usize::try_from(count(Id::MaxCulpritFunctions))
                .unwrap_or(usize::MAX),
        })
    }
}

/// Installs the stack-capture signal handler for `signal` (once per signal per process).
fn install_stack_handler(resolved: &Resolved, signal: i32) -> Result<StackSupport, Error> {
    use crate::stack::StackError;
    match crate::stack::install(signal) {
        Ok(()) => Ok(StackSupport::Enabled),
        Err(StackError::Unsupported) => Ok(StackSupport::Unsupported),
        Err(StackError::InvalidSignal { .. }) => {
            Err(resolved.invalid(Value::shown, SIGNAL_ACCEPTED))
        }
        Err(StackError::SignalInUse { .. }) => Err(resolved.invalid(
            |n| format!("{} (another handler is installed for it)", n.shown()),
            SIGNAL_ACCEPTED,
        )),
        Err(StackError::Os(err)) => Err(Error::StackHandler(err)),
        Err(other) => Err(Error::StackHandler(std::io::Error::other(
            other.to_string(),
        ))),
    }
}
