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
use env::EnvValues;

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
/// Default [`Builder::max_culprit_functions`]: 100 distinct function names per instance.
pub const DEFAULT_MAX_CULPRIT_FUNCTIONS: usize = 100;

const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(1);
const MAX_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
const MAX_STALL_THRESHOLD: Duration = Duration::from_secs(3600);
const MAX_RUNTIME_NAME_LEN: usize = 128;
const MAX_VICTIMS_LIMIT: usize = 100_000;
const MAX_STALL_LOGS_LIMIT: u64 = 100_000;
const MAX_STACKS_PER_MINUTE_LIMIT: u64 = 6000;
const MAX_CULPRIT_FUNCTIONS_LIMIT: usize = 10_000;
const MAX_LIBRARY_PREFIXES: usize = 100;
const MAX_LIBRARY_PREFIX_LEN: usize = 256;

pub(crate) use crate::report::log::StallCallback;

/// Configures and builds a [`LoopLag`]; get one from [`LoopLag::builder`].
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
    explicit: Explicit,
    env: EnvValues,
    pub(crate) meter: Option<Meter>,
    pub(crate) tracer: Option<BoxedTracer>,
    pub(crate) on_stall: Option<StallCallback>,
}

/// The values set by builder methods, kept apart from the environment's so that an explicit
/// call wins over `from_env` whichever comes first.
#[derive(Clone, Debug, Default)]
struct Explicit {
    runtime_name: Option<String>,
    sample_interval: Option<Duration>,
    stall_threshold: Option<Duration>,
    max_victims: Option<usize>,
    max_stall_logs_per_second: Option<u32>,
    capture_stacks: Option<bool>,
    stack_signal: Option<i32>,
    max_stacks_per_minute: Option<u32>,
    library_prefixes: Option<Vec<String>>,
    max_culprit_functions: Option<usize>,
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
    /// Function path prefixes of code that is never the culprit frame.
    pub(crate) library_prefixes: Arc<[String]>,
    pub(crate) max_culprit_functions: usize,
}

/// A setting's value with what an error about it must say: the setting's name (builder
/// method or environment variable) and, for a value from the environment, the text given.
struct Resolved<T> {
    value: T,
    setting: &'static str,
    text: Option<String>,
}

impl<T> Resolved<T> {
    /// An `InvalidSetting` for this value: the environment text when it came from there,
    /// else `shown`.
    fn invalid(&self, shown: impl FnOnce(&T) -> String, accepted: &'static str) -> Error {
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

/// The explicit value if set, else the environment's (parsed), else the default.
fn resolve<T>(
    explicit: Option<T>,
    method: &'static str,
    env_value: Option<&OsString>,
    variable: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
    form: &'static str,
    default: T,
) -> Result<Resolved<T>, Error> {
    if let Some(value) = explicit {
        return Ok(Resolved {
            value,
            setting: method,
            text: None,
        });
    }
    let Some(raw) = env_value else {
        return Ok(Resolved {
            value: default,
            setting: method,
            text: None,
        });
    };
    let bad = |text: String| Error::InvalidSetting {
        setting: variable,
        value: format!("{text:?}"),
        accepted: form,
    };
    let Some(text) = raw.to_str() else {
        return Err(bad(raw.to_string_lossy().into_owned()));
    };
    match parse(text) {
        Some(value) => Ok(Resolved {
            value,
            setting: variable,
            text: Some(text.to_string()),
        }),
        None => Err(bad(text.to_string())),
    }
}

impl Builder {
    /// Sets the value of the `tokio.runtime.name` attribute on every metric and span, so
    /// several runtimes in one process can be told apart.
    ///
    /// Accepted: 1 to 128 characters, no control characters. Environment:
    /// `LOOPLAG_RUNTIME_NAME`. By default, `"main"`.
    pub fn runtime_name(self, name: impl Into<String>) -> Self {
        Builder {
            explicit: Explicit {
                runtime_name: Some(name.into()),
                ..self.explicit
            },
            ..self
        }
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
        Builder {
            explicit: Explicit {
                sample_interval: Some(interval),
                ..self.explicit
            },
            ..self
        }
    }

    /// Sets how long one poll must run before it counts as a stall.
    ///
    /// Accepted: from the sample interval up to one hour. Environment:
    /// `LOOPLAG_STALL_THRESHOLD` (e.g. `50ms`). By default, 50 ms.
    pub fn stall_threshold(self, threshold: Duration) -> Self {
        Builder {
            explicit: Explicit {
                stall_threshold: Some(threshold),
                ..self.explicit
            },
            ..self
        }
    }

    /// Sets how many waiting request spans get the victim event per stall; the rest are
    /// counted in the stall span's `tokio.eventloop.stall.victims_dropped` attribute.
    ///
    /// `0` turns victim events off, and with them the layer's record of request spans
    /// (see [`LoopLag::layer`](crate::LoopLag::layer)): a new root span then costs looplag
    /// nothing, where it otherwise adds about 30 ns (BENCHMARKS.md). Stall spans, stacks and
    /// metrics are unchanged. Accepted: 0 to 100 000. Environment: `LOOPLAG_MAX_VICTIMS`. By
    /// default, 1000.
    pub fn max_victims(self, max: usize) -> Self {
        Builder {
            explicit: Explicit {
                max_victims: Some(max),
                ..self.explicit
            },
            ..self
        }
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
        Builder {
            explicit: Explicit {
                max_stall_logs_per_second: Some(max),
                ..self.explicit
            },
            ..self
        }
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
        Builder {
            explicit: Explicit {
                capture_stacks: Some(capture),
                ..self.explicit
            },
            ..self
        }
    }

    /// Sets the signal sent to a stalled thread to record its stack.
    ///
    /// `build()` installs the handler and fails if another handler is already installed for
    /// that signal, rather than replacing it. Accepted: `SIGUSR1`, `SIGUSR2` or a real-time
    /// signal (`SIGRTMIN..=SIGRTMAX`). Environment: `LOOPLAG_STACK_SIGNAL`. By default, 42
    /// ([`DEFAULT_STACK_SIGNAL`]).
    pub fn stack_signal(self, signal: i32) -> Self {
        Builder {
            explicit: Explicit {
                stack_signal: Some(signal),
                ..self.explicit
            },
            ..self
        }
    }

    /// Sets how many stacks the watchdog may capture per minute (a token bucket that refills
    /// continuously). Stalls over the limit are still detected, counted and reported; their
    /// reports say the stack was rate limited and how many captures were suppressed.
    ///
    /// `0` captures no stacks. Accepted: 0 to 6000. Environment:
    /// `LOOPLAG_MAX_STACKS_PER_MINUTE`. By default, 30.
    pub fn max_stacks_per_minute(self, max: u32) -> Self {
        Builder {
            explicit: Explicit {
                max_stacks_per_minute: Some(max),
                ..self.explicit
            },
            ..self
        }
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
        Builder {
            explicit: Explicit {
                library_prefixes: Some(prefixes.into_iter().map(Into::into).collect()),
                ..self.explicit
            },
            ..self
        }
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
        Builder {
            explicit: Explicit {
                max_culprit_functions: Some(max),
                ..self.explicit
            },
            ..self
        }
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
            env: EnvValues::read(),
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

    pub(crate) fn validate(&self) -> Result<Config, Error> {
        let (explicit, env) = (&self.explicit, &self.env);
        let name = resolve(
            explicit.runtime_name.clone(),
            "runtime_name",
            env.runtime_name.as_ref(),
            env::RUNTIME_NAME,
            |text| Some(text.to_string()),
            env::TEXT_FORM,
            DEFAULT_RUNTIME_NAME.to_string(),
        )?;
        if name.value.is_empty()
            || name.value.chars().count() > MAX_RUNTIME_NAME_LEN
            || name.value.chars().any(char::is_control)
        {
            return Err(Error::InvalidSetting {
                setting: name.setting,
                value: format!("{:?}", name.value),
                accepted: "1 to 128 characters, no control characters",
            });
        }

        let interval = resolve(
            explicit.sample_interval,
            "sample_interval",
            env.sample_interval.as_ref(),
            env::SAMPLE_INTERVAL,
            env::parse_duration,
            env::DURATION_FORM,
            DEFAULT_SAMPLE_INTERVAL,
        )?;
        if !(MIN_SAMPLE_INTERVAL..=MAX_SAMPLE_INTERVAL).contains(&interval.value) {
            return Err(interval.invalid(|d| format!("{d:?}"), "a duration from 1ms to 1s"));
        }

        let threshold = resolve(
            explicit.stall_threshold,
            "stall_threshold",
            env.stall_threshold.as_ref(),
            env::STALL_THRESHOLD,
            env::parse_duration,
            env::DURATION_FORM,
            DEFAULT_STALL_THRESHOLD,
        )?;
        if threshold.value < interval.value || threshold.value > MAX_STALL_THRESHOLD {
            return Err(threshold.invalid(
                |d| format!("{d:?}"),
                "a duration from the sample interval up to 1h",
            ));
        }

        let max_victims = resolve(
            explicit.max_victims,
            "max_victims",
            env.max_victims.as_ref(),
            env::MAX_VICTIMS,
            |text| env::parse_count(text).map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            env::COUNT_FORM,
            DEFAULT_MAX_VICTIMS,
        )?;
        if max_victims.value > MAX_VICTIMS_LIMIT {
            return Err(max_victims.invalid(|n| n.to_string(), "a count from 0 to 100000"));
        }

        let max_logs = resolve(
            explicit.max_stall_logs_per_second.map(u64::from),
            "max_stall_logs_per_second",
            env.max_stall_logs_per_second.as_ref(),
            env::MAX_STALL_LOGS_PER_SECOND,
            env::parse_count,
            env::COUNT_FORM,
            u64::from(DEFAULT_MAX_STALL_LOGS_PER_SECOND),
        )?;
        let max_stall_logs_per_second = match u32::try_from(max_logs.value) {
            Ok(max) if max_logs.value <= MAX_STALL_LOGS_LIMIT => max,
            _ => {
                return Err(max_logs.invalid(|n| n.to_string(), "a count from 0 to 100000"));
            }
        };

        let max_stacks = resolve(
            explicit.max_stacks_per_minute.map(u64::from),
            "max_stacks_per_minute",
            env.max_stacks_per_minute.as_ref(),
            env::MAX_STACKS_PER_MINUTE,
            env::parse_count,
            env::COUNT_FORM,
            u64::from(DEFAULT_MAX_STACKS_PER_MINUTE),
        )?;
        let max_stacks_per_minute = match u32::try_from(max_stacks.value) {
            Ok(max) if max_stacks.value <= MAX_STACKS_PER_MINUTE_LIMIT => max,
            _ => return Err(max_stacks.invalid(|n| n.to_string(), "a count from 0 to 6000")),
        };
        let capture = resolve(
            explicit.capture_stacks,
            "capture_stacks",
            env.capture_stacks.as_ref(),
            env::CAPTURE_STACKS,
            env::parse_bool,
            env::BOOL_FORM,
            true,
        )?;
        let signal = resolve(
            explicit.stack_signal,
            "stack_signal",
            env.stack_signal.as_ref(),
            env::STACK_SIGNAL,
            |text| env::parse_count(text).and_then(|n| i32::try_from(n).ok()),
            env::COUNT_FORM,
            DEFAULT_STACK_SIGNAL,
        )?;
        let stacks = if !capture.value || max_stacks_per_minute == 0 {
            StackSupport::Disabled
        } else {
            install_stack_handler(&signal)?
        };

        let prefixes = resolve(
            explicit.library_prefixes.clone(),
            "library_prefixes",
            env.library_prefixes.as_ref(),
            env::LIBRARY_PREFIXES,
            |text| Some(env::parse_list(text)),
            env::LIST_FORM,
            Vec::new(),
        )?;
        let prefix_ok = |prefix: &String| {
            !prefix.is_empty()
                && prefix.chars().count() <= MAX_LIBRARY_PREFIX_LEN
                && !prefix
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == ',')
        };
        if prefixes.value.len() > MAX_LIBRARY_PREFIXES || !prefixes.value.iter().all(prefix_ok) {
            return Err(prefixes.invalid(
                |list| format!("{list:?}"),
                "at most 100 prefixes of 1 to 256 characters, without whitespace, control \
                 characters or commas",
            ));
        }

        let max_culprits = resolve(
            explicit.max_culprit_functions,
            "max_culprit_functions",
            env.max_culprit_functions.as_ref(),
            env::MAX_CULPRIT_FUNCTIONS,
            |text| env::parse_count(text).map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            env::COUNT_FORM,
            DEFAULT_MAX_CULPRIT_FUNCTIONS,
        )?;
        if max_culprits.value > MAX_CULPRIT_FUNCTIONS_LIMIT {
            return Err(max_culprits.invalid(|n| n.to_string(), "a count from 0 to 10000"));
        }

        Ok(Config {
            library_prefixes: prefixes.value.into(),
            max_culprit_functions: max_culprits.value,
            runtime_name: name.value,
            sample_interval: interval.value,
            stall_threshold: threshold.value,
            max_victims: max_victims.value,
            max_stall_logs_per_second,
            stacks,
            stack_signal: signal.value,
            max_stacks_per_minute,
        })
    }
}

/// Installs the stack-capture signal handler for `signal` (once per signal per process).
fn install_stack_handler(signal: &Resolved<i32>) -> Result<StackSupport, Error> {
    use crate::stack::StackError;
    const ACCEPTED: &str =
        "SIGUSR1, SIGUSR2 or a real-time signal (SIGRTMIN..=SIGRTMAX) with no other handler";
    match crate::stack::install(signal.value) {
        Ok(()) => Ok(StackSupport::Enabled),
        Err(StackError::Unsupported) => Ok(StackSupport::Unsupported),
        Err(StackError::InvalidSignal { .. }) => Err(signal.invalid(|n| n.to_string(), ACCEPTED)),
        Err(StackError::SignalInUse { .. }) => Err(signal.invalid(
            |n| format!("{n} (another handler is installed for it)"),
            ACCEPTED,
        )),
        Err(StackError::Os(err)) => Err(Error::StackHandler(err)),
        Err(other) => Err(Error::StackHandler(std::io::Error::other(
            other.to_string(),
        ))),
    }
}
