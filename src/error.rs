//! The one error type of looplag.

use std::fmt;

/// What went wrong while configuring or starting looplag.
///
/// Every variant names the thing that was wrong, the value it had and what is accepted,
/// so the message alone is enough to fix the call.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// let err = looplag::LoopLag::builder()
///     .sample_interval(Duration::ZERO)
///     .build()
///     .unwrap_err();
/// assert!(matches!(err, looplag::Error::InvalidSetting { setting: "sample_interval", .. }));
/// assert_eq!(
///     err.to_string(),
///     "invalid looplag setting `sample_interval`: 0ns (accepted: a duration from 1ms to 1s)"
/// );
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A builder setting (or the environment variable that set it) has a value looplag does
    /// not accept.
    InvalidSetting {
        /// The setting, as named by its builder method or environment variable.
        setting: &'static str,
        /// The rejected value, as given.
        value: String,
        /// What the setting accepts.
        accepted: &'static str,
    },
    /// [`LoopLag::start`](crate::LoopLag::start) was called while a watchdog of the same
    /// instance is still running; drop the first [`Watchdog`](crate::Watchdog) first.
    AlreadyStarted {
        /// The runtime name of the instance.
        runtime_name: String,
    },
    /// The operating system refused to start the watchdog thread.
    WatchdogThread(std::io::Error),
    /// The operating system refused to install the stack-capture signal handler; choose
    /// another [`stack_signal`](crate::Builder::stack_signal) or turn
    /// [`capture_stacks`](crate::Builder::capture_stacks) off.
    StackHandler(std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidSetting {
                setting,
                value,
                accepted,
            } => write!(
                f,
                "invalid looplag setting `{setting}`: {value} (accepted: {accepted})"
            ),
            Error::AlreadyStarted { runtime_name } => write!(
                f,
                "looplag is already watching runtime `{runtime_name}`: drop its Watchdog before \
                 calling start again"
            ),
            Error::WatchdogThread(err) => {
                write!(f, "looplag could not start its watchdog thread: {err}")
            }
            Error::StackHandler(err) => write!(
                f,
                "looplag could not install its stack-capture signal handler: {err} (choose \
                 another stack_signal or set capture_stacks(false))"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::WatchdogThread(err) | Error::StackHandler(err) => Some(err),
            _ => None,
        }
    }
}
