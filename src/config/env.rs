//! The environment variables of [`Builder::from_env`](crate::Builder::from_env) and their
//! strict parsers.
//!
//! Values are read by `from_env` and parsed by `build`, so a bad value is reported by
//! `build` as [`Error::InvalidSetting`](crate::Error::InvalidSetting) naming the variable.
//! Parsing is strict on purpose: a setting that silently falls back to its default in
//! production is worse than a clear error at startup. No whitespace, sign, decimal point or
//! missing unit is accepted. An empty variable counts as unset (`LOOPLAG_X= program`).

use std::time::Duration;

/// The form a duration variable must have.
pub(crate) const DURATION_FORM: &str =
    "a whole number followed by a unit, us, ms or s, with no space (e.g. 250us, 50ms, 1s)";
/// The form a count variable must have.
pub(crate) const COUNT_FORM: &str = "a whole number written with digits only (e.g. 1000)";
/// The form a level variable must have.
pub(crate) const LEVEL_FORM: &str = "`trace`, `debug`, `info`, `warn` or `error`";
/// The form a list variable must have.
pub(crate) const LIST_FORM: &str =
    "comma-separated items without spaces (e.g. my_sdk,app::db); an empty item is an error";
/// The form a boolean variable must have.
pub(crate) const BOOL_FORM: &str = "`true` or `false`";

/// The form a text variable must have.
pub(crate) const TEXT_FORM: &str = "valid UTF-8 text";

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

/// Parses a level name in lower case: `trace`, `debug`, `info`, `warn` or `error`.
pub(crate) fn parse_level(text: &str) -> Option<tracing::Level> {
    match text {
        "trace" => Some(tracing::Level::TRACE),
        "debug" => Some(tracing::Level::DEBUG),
        "info" => Some(tracing::Level::INFO),
        "warn" => Some(tracing::Level::WARN),
        "error" => Some(tracing::Level::ERROR),
        _ => None,
    }
}

/// Splits a comma-separated list; items are kept as written (validation rejects empty ones
/// and whitespace). The empty text is the empty list.
pub(crate) fn parse_list(text: &str) -> Vec<String> {
    if text.is_empty() {
        return Vec::new();
    }
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
    fn levels_are_lower_case_names() {
        assert_eq!(parse_level("trace"), Some(tracing::Level::TRACE));
        assert_eq!(parse_level("debug"), Some(tracing::Level::DEBUG));
        assert_eq!(parse_level("info"), Some(tracing::Level::INFO));
        assert_eq!(parse_level("warn"), Some(tracing::Level::WARN));
        assert_eq!(parse_level("error"), Some(tracing::Level::ERROR));
        for bad in ["", "INFO", "Info", " info", "info ", "warning", "off", "3"] {
            assert_eq!(parse_level(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lists_split_on_commas_and_keep_empty_items_for_validation() {
        assert_eq!(parse_list("my_sdk,app::db"), vec!["my_sdk", "app::db"]);
        assert_eq!(parse_list("one"), vec!["one"]);
        assert_eq!(parse_list("a,,b"), vec!["a", "", "b"]);
        assert_eq!(parse_list("a, b"), vec!["a", " b"]);
        assert!(parse_list("").is_empty());
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
