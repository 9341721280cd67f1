//! The one table of settings: for each, its builder method, its environment variable, its
//! default, the form and range it accepts, and what README's table says of it.
//!
//! Everything else follows from [`SETTINGS`]: `Builder`'s setters store a [`Value`] under
//! the setting's [`Id`], `from_env` reads every variable listed here, `Builder::validate`
//! parses and checks each row in order, and README's settings table is checked against this
//! table by a unit test (`LOOPLAG_BLESS=1 cargo test --lib settings` rewrites it). Adding a
//! setting is a row here, an `Id`, a setter with its docs, a `Config` field and its getter.

use std::ffi::OsString;
use std::time::Duration;

use super::env;

/// What kind of value a setting holds, which decides how its variable is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// UTF-8 text.
    Text,
    /// `<digits><unit>`, unit `us`, `ms` or `s`.
    Duration,
    /// Digits only.
    Count,
    /// `true` or `false`.
    Bool,
    /// A signal number, digits only.
    Signal,
    /// A level name in lower case.
    Level,
    /// Comma-separated items.
    List,
}

impl Kind {
    /// The form a variable of this kind must have, for errors about values that do not parse.
    pub(crate) fn form(self) -> &'static str {
        match self {
            Kind::Text => env::TEXT_FORM,
            Kind::Duration => env::DURATION_FORM,
            Kind::Count | Kind::Signal => env::COUNT_FORM,
            Kind::Bool => env::BOOL_FORM,
            Kind::Level => env::LEVEL_FORM,
            Kind::List => env::LIST_FORM,
        }
    }

    /// Parses a variable's text (strictly: see `env`).
    pub(crate) fn parse(self, text: &str) -> Option<Value> {
        match self {
            Kind::Text => Some(Value::Text(text.to_string())),
            Kind::Duration => env::parse_duration(text).map(Value::Duration),
            Kind::Count => env::parse_count(text).map(Value::Count),
            Kind::Bool => env::parse_bool(text).map(Value::Bool),
            Kind::Signal => env::parse_count(text)
                .and_then(|n| i32::try_from(n).ok())
                .map(Value::Signal),
            Kind::Level => env::parse_level(text).map(Value::Level),
            Kind::List => Some(Value::List(env::parse_list(text))),
        }
    }
}

/// The range a parsed value must be in.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Range {
    /// Text of 1 to `max_chars` characters, none of them a control character.
    Text { max_chars: usize },
    /// A duration from `min` to `max`.
    Duration { min: Duration, max: Duration },
    /// A duration from the value of another (earlier) duration setting up to `max`.
    DurationFrom { setting: Id, max: Duration },
    /// A count up to `max`.
    Count { max: u64 },
    /// At most `max_items` items of 1 to `max_chars` characters, without whitespace,
    /// control characters or commas.
    List { max_items: usize, max_chars: usize },
    /// Any value of the kind (checked elsewhere, as the stack signal is when its handler is
    /// installed).
    Any,
}

/// One setting.
#[derive(Debug)]
pub(crate) struct Setting {
    /// The builder method, which also names the setting in errors about a value it was given.
    pub(crate) method: &'static str,
    /// The environment variable read by `from_env`, which names the setting in errors about
    /// a value from the environment.
    pub(crate) variable: &'static str,
    pub(crate) kind: Kind,
    /// The default, written as the variable would be (and parsed as such).
    pub(crate) default: &'static str,
    pub(crate) range: Range,
    /// What the setting accepts, as errors and README say it.
    pub(crate) accepted: &'static str,
    /// README only: what special values do.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) note: &'static str,
}

/// The settings, by [`Id`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Id {
    RuntimeName,
    SampleInterval,
    StallThreshold,
    MaxVictims,
    MaxStallLogsPerSecond,
    CaptureStacks,
    StackSignal,
    MaxStacksPerMinute,
    SpanLevel,
    LibraryPrefixes,
    MaxCulpritFunctions,
}

/// Number of settings.
pub(crate) const COUNT: usize = 11;

/// Every [`Id`], in table order.
pub(crate) const ID_ORDER: [Id; COUNT] = [
    Id::RuntimeName,
    Id::SampleInterval,
    Id::StallThreshold,
    Id::MaxVictims,
    Id::MaxStallLogsPerSecond,
    Id::CaptureStacks,
    Id::StackSignal,
    Id::MaxStacksPerMinute,
    Id::SpanLevel,
    Id::LibraryPrefixes,
    Id::MaxCulpritFunctions,
];

/// The table, in [`Id`] order (checked by a test). Ranges that refer to another setting
/// refer to an earlier one: rows are validated in order.
pub(crate) const SETTINGS: [Setting; COUNT] = [
    Setting {
        method: "runtime_name",
        variable: "LOOPLAG_RUNTIME_NAME",
        kind: Kind::Text,
        default: "main",
        range: Range::Text { max_chars: 128 },
        accepted: "1 to 128 characters, no control characters",
        note: "",
    },
    Setting {
        method: "sample_interval",
        variable: "LOOPLAG_SAMPLE_INTERVAL",
        kind: Kind::Duration,
        default: "10ms",
        range: Range::Duration {
            min: Duration::from_millis(1),
            max: Duration::from_secs(1),
        },
        accepted: "a duration from 1ms to 1s",
        note: "",
    },
    Setting {
        method: "stall_threshold",
        variable: "LOOPLAG_STALL_THRESHOLD",
        kind: Kind::Duration,
        default: "50ms",
        range: Range::DurationFrom {
            setting: Id::SampleInterval,
            max: Duration::from_secs(3600),
        },
        accepted: "a duration from the sample interval up to 1h",
        note: "",
    },
    Setting {
        method: "max_victims",
        variable: "LOOPLAG_MAX_VICTIMS",
        kind: Kind::Count,
        default: "1000",
        range: Range::Count { max: 100_000 },
        accepted: "a count from 0 to 100000",
        note: "0: no victim events",
    },
    Setting {
        method: "max_stall_logs_per_second",
        variable: "LOOPLAG_MAX_STALL_LOGS_PER_SECOND",
        kind: Kind::Count,
        default: "10",
        range: Range::Count { max: 100_000 },
        accepted: "a count from 0 to 100000",
        note: "0: summary lines only",
    },
    Setting {
        method: "capture_stacks",
        variable: "LOOPLAG_CAPTURE_STACKS",
        kind: Kind::Bool,
        default: "true",
        range: Range::Any,
        accepted: "`true` or `false`",
        note: "",
    },
    Setting {
        method: "stack_signal",
        variable: "LOOPLAG_STACK_SIGNAL",
        kind: Kind::Signal,
        default: "42",
        range: Range::Any,
        accepted: SIGNAL_ACCEPTED,
        note: "",
    },
    Setting {
        method: "max_stacks_per_minute",
        variable: "LOOPLAG_MAX_STACKS_PER_MINUTE",
        kind: Kind::Count,
        default: "30",
        range: Range::Count { max: 6000 },
        accepted: "a count from 0 to 6000",
        note: "0: no stacks",
    },
    Setting {
        method: "span_level",
        variable: "LOOPLAG_SPAN_LEVEL",
        kind: Kind::Level,
        default: "debug",
        range: Range::Any,
        accepted: "`trace`, `debug`, `info`, `warn` or `error`",
        note: "spans at or above it exist for looplag even if no other layer wants them",
    },
    Setting {
        method: "library_prefixes",
        variable: "LOOPLAG_LIBRARY_PREFIXES",
        kind: Kind::List,
        default: "",
        range: Range::List {
            max_items: 100,
            max_chars: 256,
        },
        accepted: "at most 100 prefixes of 1 to 256 characters, without whitespace, control \
                   characters or commas",
        note: "comma-separated; a Rust path, or a source path with a `/`",
    },
    Setting {
        method: "max_culprit_functions",
        variable: "LOOPLAG_MAX_CULPRIT_FUNCTIONS",
        kind: Kind::Count,
        default: "100",
        range: Range::Count { max: 10_000 },
        accepted: "a count from 0 to 10000",
        note: "distinct `code.function.name` values on the duration histogram; more share `other`",
    },
];

/// What [`Id::StackSignal`] accepts (checked when its handler is installed).
pub(crate) const SIGNAL_ACCEPTED: &str =
    "SIGUSR1, SIGUSR2 or a real-time signal (SIGRTMIN..=SIGRTMAX) with no other handler";

impl Id {
    /// The setting's row.
    pub(crate) fn setting(self) -> &'static Setting {
        &SETTINGS[self as usize]
    }
}

/// A setting's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Value {
    Text(String),
    Duration(Duration),
    Count(u64),
    Bool(bool),
    Signal(i32),
    Level(tracing::Level),
    List(Vec<String>),
}

impl Value {
    /// The value as an error shows one given to a builder method.
    pub(crate) fn shown(&self) -> String {
        match self {
            Value::Text(text) => format!("{text:?}"),
            Value::Duration(duration) => format!("{duration:?}"),
            Value::Count(count) => count.to_string(),
            Value::Bool(flag) => flag.to_string(),
            Value::Signal(signal) => signal.to_string(),
            Value::Level(level) => level.to_string(),
            Value::List(items) => format!("{items:?}"),
        }
    }

    /// Whether the value is in `range`; `earlier` gives the values of earlier settings.
    pub(crate) fn in_range(&self, range: Range, earlier: &dyn Fn(Id) -> Option<Duration>) -> bool {
        match (range, self) {
            (Range::Text { max_chars }, Value::Text(text)) => {
                !text.is_empty()
                    && text.chars().count() <= max_chars
                    && !text.chars().any(char::is_control)
            }
            (Range::Duration { min, max }, Value::Duration(d)) => (min..=max).contains(d),
            (Range::DurationFrom { setting, max }, Value::Duration(d)) => {
                earlier(setting).is_some_and(|min| (min..=max).contains(d))
            }
            (Range::Count { max }, Value::Count(n)) => *n <= max,
            (
                Range::List {
                    max_items,
                    max_chars,
                },
                Value::List(items),
            ) => {
                items.len() <= max_items
                    && items.iter().all(|item| {
                        !item.is_empty()
                            && item.chars().count() <= max_chars
                            && !item
                                .chars()
                                .any(|c| c.is_whitespace() || c.is_control() || c == ',')
                    })
            }
            (Range::Any, _) => true,
            _ => false,
        }
    }
}

/// Values by setting: the builder's explicit ones, the environment's, the resolved ones.
#[derive(Clone, Debug)]
pub(crate) struct Values<T>(pub(crate) [Option<T>; COUNT]);

impl<T> Default for Values<T> {
    fn default() -> Self {
        Values(std::array::from_fn(|_| None))
    }
}

impl<T> Values<T> {
    pub(crate) fn get(&self, id: Id) -> Option<&T> {
        self.0[id as usize].as_ref()
    }

    pub(crate) fn set(&mut self, id: Id, value: T) {
        self.0[id as usize] = Some(value);
    }
}

/// Reads every setting's variable from the process environment (an empty variable counts as
/// unset). Never fails.
pub(crate) fn read_env() -> Values<OsString> {
    Values(std::array::from_fn(|index| {
        std::env::var_os(SETTINGS[index].variable).filter(|value| !value.is_empty())
    }))
}

/// README's settings table, from [`SETTINGS`].
#[cfg(test)]
pub(crate) fn readme_table() -> String {
    let mut table =
        String::from("| variable | builder method | default | accepted |\n|---|---|---|---|\n");
    for setting in &SETTINGS {
        let note = if setting.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", setting.note)
        };
        let default = if setting.default.is_empty() {
            "none".to_string()
        } else {
            format!("`{}`", setting.default)
        };
        table.push_str(&format!(
            "| `{}` | `{}` | {} | {}{} |\n",
            setting.variable, setting.method, default, setting.accepted, note
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_id_order_and_every_default_is_valid() {
        for (index, id) in ID_ORDER.into_iter().enumerate() {
            assert_eq!(id as usize, index);
            let setting = id.setting();
            assert!(setting.variable.starts_with("LOOPLAG_"), "{setting:?}");
            assert_eq!(
                setting.variable,
                format!("LOOPLAG_{}", setting.method.to_uppercase()),
                "the variable is named after the method"
            );
            let default = setting
                .kind
                .parse(setting.default)
                .unwrap_or_else(|| panic!("{}'s default parses", setting.method));
            let earlier = |other: Id| match other.setting().kind.parse(other.setting().default) {
                Some(Value::Duration(d)) if (other as usize) < index => Some(d),
                _ => None,
            };
            assert!(default.in_range(setting.range, &earlier), "{setting:?}");
        }
    }

    #[test]
    fn the_public_defaults_are_the_table_s() {
        let parsed = |id: Id| id.setting().kind.parse(id.setting().default);
        assert_eq!(
            parsed(Id::RuntimeName),
            Some(Value::Text(crate::config::DEFAULT_RUNTIME_NAME.into()))
        );
        assert_eq!(
            parsed(Id::SampleInterval),
            Some(Value::Duration(crate::config::DEFAULT_SAMPLE_INTERVAL))
        );
        assert_eq!(
            parsed(Id::StallThreshold),
            Some(Value::Duration(crate::config::DEFAULT_STALL_THRESHOLD))
        );
        assert_eq!(
            parsed(Id::MaxVictims),
            Some(Value::Count(crate::config::DEFAULT_MAX_VICTIMS as u64))
        );
        assert_eq!(
            parsed(Id::MaxStallLogsPerSecond),
            Some(Value::Count(u64::from(
                crate::config::DEFAULT_MAX_STALL_LOGS_PER_SECOND
            )))
        );
        assert_eq!(parsed(Id::CaptureStacks), Some(Value::Bool(true)));
        assert_eq!(parsed(Id::LibraryPrefixes), Some(Value::List(Vec::new())));
        assert_eq!(
            parsed(Id::MaxCulpritFunctions),
            Some(Value::Count(
                crate::config::DEFAULT_MAX_CULPRIT_FUNCTIONS as u64
            ))
        );
        assert_eq!(
            parsed(Id::SpanLevel),
            Some(Value::Level(crate::config::DEFAULT_SPAN_LEVEL))
        );
        assert_eq!(
            parsed(Id::StackSignal),
            Some(Value::Signal(crate::config::DEFAULT_STACK_SIGNAL))
        );
        assert_eq!(
            parsed(Id::MaxStacksPerMinute),
            Some(Value::Count(u64::from(
                crate::config::DEFAULT_MAX_STACKS_PER_MINUTE
            )))
        );
    }

    /// README's table between its markers is the one this table gives.
    #[test]
    fn readme_lists_every_setting_as_the_table_says() {
        const START: &str = "<!-- settings-table:start -->\n";
        const END: &str = "<!-- settings-table:end -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let (Some(start), Some(end)) = (readme.find(START), readme.find(END)) else {
            panic!("README.md has no {START:?} ... {END:?} markers");
        };
        let start = start + START.len();
        let expected = readme_table();
        if readme[start..end] != expected {
            if std::env::var("LOOPLAG_BLESS").is_ok_and(|v| v == "1") {
                let updated = format!("{}{expected}{}", &readme[..start], &readme[end..]);
                std::fs::write(path, updated).expect("rewrite README.md");
            } else {
                panic!(
                    "README's settings table differs from src/config/settings.rs; expected:\n\
                     {expected}\nrun `LOOPLAG_BLESS=1 cargo test --lib settings` to rewrite it"
                );
            }
        }
    }
}
