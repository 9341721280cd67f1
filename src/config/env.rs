//! The environment variables of [`Builder::from_env`](crate::Builder::from_env) and their
//! strict parsers.
//!
//! Values are read by `from_env` and parsed by `build`, so a bad value is reported by
//! `build` as [`Error::InvalidSetting`](crate::Error::InvalidSetting) naming the variable.
//! Parsing is strict on purpose: a setting that silently falls back to its default in
//! production is worse than a clear error at startup. No whitespace, sign, decimal point or
//! missing unit is accepted. An empty variable counts as unset (`LOOPLAG_X= program`).

use std::ffi::OsString;
use std::time::Duration;

/// Environment variable of [`Builder::runtime_name`](crate::Builder::runtime_name).
pub(crate) const RUNTIME_NAME: &str = "LOOPLAG_RUNTIME_NAME";
/// Environment variable of [`Builder::sample_interval`](crate::Builder::sample_interval).
pub(crate) const SAMPLE_INTERVAL: &str = "LOOPLAG_SAMPLE_INTERVAL";
/// Environment variable of [`Builder::stall_threshold`](crate::Builder::stall_threshold).
pub(crate) const STALL_THRESHOLD: &str = "LOOPLAG_STALL_THRESHOLD";
/// Environment variable of [`Builder::max_victims`](crate::Builder::max_victims).
pub(crate) const MAX_VICTIMS: &str = "LOOPLAG_MAX_VICTIMS";
/// Environment variable of
/// [`Builder::max_stall_logs_per_second`](crate::Builder::max_stall_logs_per_second).
pub(crate) const MAX_STALL_LOGS_PER_SECOND: &str = "LOOPLAG_MAX_STALL_LOGS_PER_SECOND";

/// The form a duration variable must have.
pub(crate) const DURATION_FORM: &str =
    "a whole number followed by a unit, us, ms or s, with no space (e.g. 250us, 50ms, 1s)";
/// The form a count variable must have.
pub(crate) const COUNT_FORM: &str = "a whole number written with digits only (e.g. 1000)";
/// Variable for [`Builder::capture_stacks`](crate::Builder::capture_stacks).
pub(crate) const CAPTURE_STACKS: &str = "LOOPLAG_CAPTURE_STACKS";
/// Variable for [`Builder::stack_signal`](crate::Builder::stack_signal).
pub(crate) const STACK_SIGNAL: &str = "LOOPLAG_STACK_SIGNAL";
/// Variable for [`Builder::max_stacks_per_minute`](crate::Builder::max_stacks_per_minute).
pub(crate) const MAX_STACKS_PER_MINUTE: &str = "LOOPLAG_MAX_STACKS_PER_MINUTE";
/// Variable for [`Builder::library_prefixes`](crate::Builder::library_prefixes).
pub(crate) const LIBRARY_PREFIXES: &str = "LOOPLAG_LIBRARY_PREFIXES";
/// Variable for [`Builder::max_culprit_functions`](crate::Builder::max_culprit_functions).
pub(crate) const MAX_CULPRIT_FUNCTIONS: &str = "LOOPLAG_MAX_CULPRIT_FUNCTIONS";
/// The form a list variable must have.
pub(crate) const LIST_FORM: &str =
    "comma-separated items without spaces (e.g. my_sdk,app::db); an empty item is an error";
/// The form a boolean variable must have.
pub(crate) const BOOL_FORM: &str = "`true` or `false`";

/// The form a text variable must have.
pub(crate) const TEXT_FORM: &str = "valid UTF-8 text";

/// The raw values of the variables that were set (and not empty) when `from_env` ran.
#[derive(Clone, Debug, Default)]
pub(crate) struct EnvValues {
    pub(crate) runtime_name: Option<OsString>,
    pub(crate) sample_interval: Option<OsString>,
    pub(crate) stall_threshold: Option<OsString>,
    pub(crate) max_victims: Option<OsString>,
    pub(crate) max_stall_logs_per_second: Option<OsString>,
    pub(crate) capture_stacks: Option<OsString>,
    pub(crate) stack_signal: Option<OsString>,
    pub(crate) max_stacks_per_minute: Option<OsString>,
    pub(crate) library_prefixes: Option<OsString>,
    pub(crate) max_culprit_functions: Option<OsString>,
}

impl EnvValues {
    /// Reads every variable from the process environment. Never fails.
    pub(crate) fn read() -> Self {
        let get = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
        EnvValues {
            runtime_name: get(RUNTIME_NAME),
            sample_interval: get(SAMPLE_INTERVAL),
            stall_threshold: get(STALL_THRESHOLD),
            max_victims: get(MAX_VICTIMS),
            max_stall_logs_per_second: get(MAX_STALL_LOGS_PER_SECOND),
            capture_stacks: get(CAPTURE_STACKS),
            stack_signal: get(STACK_SIGNAL),
            max_stacks_per_minute: get(MAX_STACKS_PER_MINUTE),
            library_prefixes: get(LIBRARY_PREFIXES),
            max_culprit_functions: get(MAX_CULPRIT_FUNCTIONS),
        }
    }
}

/// Parses `<digits><unit>` with unit `us`, `ms` or `s`, e.g. `250us`, `50ms`, `1s`.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let number = parse_digits(digits)?;
    match unit {
        "us" => Some(Duration::from_micros(number)),
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        _ => None,
    }
}

/// Parses `true` or `false` (exactly).
pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Splits a comma-separated list; items are kept as written (validation rejects empty ones
/// and whitespace).
pub(crate) fn parse_list(text: &str) -> Vec<String> {
    text.split(',').map(str::to_owned).collect()
}

/// Parses a count written with ASCII digits only.
pub(crate) fn parse_count(text: &str) -> Option<u64> {
    parse_digits(text)
}

/// ASCII digits only (no sign, no space, no `_`), without overflow.
fn parse_digits(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_a_unit_parse() {
        assert_eq!(parse_duration("50ms"), Some(Duration::from_millis(50)));
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("0ms"), Some(Duration::ZERO));
        assert_eq!(parse_duration("007ms"), Some(Duration::from_millis(7)));
        assert_eq!(
            parse_duration("18446744073709551615us"),
            Some(Duration::from_micros(u64::MAX))
        );
    }

    #[test]
    fn anything_else_is_not_a_duration() {
        for bad in [
            "",
            "50",
            "ms",
            "50 ms",
            " 50ms",
            "50ms ",
            "+50ms",
            "-50ms",
            "5.5ms",
            "50MS",
            "50m",
            "50ns",
            "1h",
            "50msx",
            "1_000ms",
            "１ms",
            "18446744073709551616us",
            "5e3us",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lists_split_on_commas_and_keep_empty_items_for_validation() {
        assert_eq!(parse_list("my_sdk,app::db"), vec!["my_sdk", "app::db"]);
        assert_eq!(parse_list("one"), vec!["one"]);
        assert_eq!(parse_list("a,,b"), vec!["a", "", "b"]);
        assert_eq!(parse_list("a, b"), vec!["a", " b"]);
    }

    #[test]
    fn counts_are_digits_only() {
        assert_eq!(parse_count("0"), Some(0));
        assert_eq!(parse_count("1000"), Some(1000));
        for bad in [
            "", "-1", "+1", "1 000", "1_000", "1e3", " 1", "1.0", "ten", "0x10",
        ] {
            assert_eq!(parse_count(bad), None, "{bad:?}");
        }
    }
}
