//! `Builder::from_env`: every `LOOPLAG_*` variable with good and bad values, and explicit
//! builder calls winning over the environment in either order.
//!
//! These tests change the process environment. They rely on nextest running every test in
//! its own process (the project's test command, `cargo nextest run`), and each one sets its
//! variables from the test's main thread before any other thread of the test exists. Under
//! `cargo test`'s one-process, many-threads runner they could see each other's variables.

use std::time::Duration;

use looplag::{Error, LoopLag};

const ALL: [&str; 10] = [
    "LOOPLAG_RUNTIME_NAME",
    "LOOPLAG_SAMPLE_INTERVAL",
    "LOOPLAG_STALL_THRESHOLD",
    "LOOPLAG_MAX_VICTIMS",
    "LOOPLAG_MAX_STALL_LOGS_PER_SECOND",
    "LOOPLAG_CAPTURE_STACKS",
    "LOOPLAG_STACK_SIGNAL",
    "LOOPLAG_MAX_STACKS_PER_MINUTE",
    "LOOPLAG_LIBRARY_PREFIXES",
    "LOOPLAG_MAX_CULPRIT_FUNCTIONS",
];

const DURATION_FORM: &str =
    "a whole number followed by a unit, us, ms or s, with no space (e.g. 250us, 50ms, 1s)";
const COUNT_FORM: &str = "a whole number written with digits only (e.g. 1000)";

/// Clears every looplag variable, then sets `vars`.
fn set_env(vars: &[(&str, &str)]) {
    for name in ALL {
        std::env::remove_var(name);
    }
    for (name, value) in vars {
        std::env::set_var(name, value);
    }
}

fn from_env() -> Result<LoopLag, Error> {
    LoopLag::builder().from_env().build()
}

/// `(setting, value, accepted)` of the `InvalidSetting` that `result` must be.
fn invalid(result: Result<LoopLag, Error>) -> (String, String, String) {
    match result {
        Err(err @ Error::InvalidSetting { .. }) => {
            let message = err.to_string();
            let Error::InvalidSetting {
                setting,
                value,
                accepted,
            } = err
            else {
                unreachable!()
            };
            assert!(
                message.contains(setting) && message.contains(&value) && message.contains(accepted),
                "the message names the variable, the value and the accepted form: {message}"
            );
            (setting.to_string(), value, accepted.to_string())
        }
        other => panic!("expected InvalidSetting, got {other:?}"),
    }
}

#[test]
fn without_variables_from_env_gives_the_defaults() {
    set_env(&[]);
    let looplag = from_env().expect("defaults");
    assert_eq!(looplag.runtime_name(), "main");
    assert_eq!(looplag.sample_interval(), looplag::DEFAULT_SAMPLE_INTERVAL);
    assert_eq!(looplag.stall_threshold(), looplag::DEFAULT_STALL_THRESHOLD);
    assert_eq!(looplag.max_victims(), looplag::DEFAULT_MAX_VICTIMS);
    assert_eq!(
        looplag.max_stall_logs_per_second(),
        looplag::DEFAULT_MAX_STALL_LOGS_PER_SECOND
    );
}

#[test]
fn every_variable_sets_its_setting() {
    set_env(&[
        ("LOOPLAG_RUNTIME_NAME", "api"),
        ("LOOPLAG_SAMPLE_INTERVAL", "5ms"),
        ("LOOPLAG_STALL_THRESHOLD", "250ms"),
        ("LOOPLAG_MAX_VICTIMS", "7"),
        ("LOOPLAG_MAX_STALL_LOGS_PER_SECOND", "3"),
    ]);
    let looplag = from_env().expect("valid environment");
    assert_eq!(looplag.runtime_name(), "api");
    assert_eq!(looplag.sample_interval(), Duration::from_millis(5));
    assert_eq!(looplag.stall_threshold(), Duration::from_millis(250));
    assert_eq!(looplag.max_victims(), 7);
    assert_eq!(looplag.max_stall_logs_per_second(), 3);
}

#[test]
fn variables_are_read_when_from_env_is_called() {
    set_env(&[("LOOPLAG_RUNTIME_NAME", "before")]);
    let builder = LoopLag::builder().from_env();
    set_env(&[("LOOPLAG_RUNTIME_NAME", "after")]);
    assert_eq!(builder.build().unwrap().runtime_name(), "before");
}

#[test]
fn runtime_name_good_and_bad() {
    set_env(&[("LOOPLAG_RUNTIME_NAME", "checkout-api")]);
    assert_eq!(from_env().unwrap().runtime_name(), "checkout-api");

    set_env(&[("LOOPLAG_RUNTIME_NAME", "")]);
    assert_eq!(
        from_env().unwrap().runtime_name(),
        "main",
        "an empty variable counts as unset"
    );

    set_env(&[("LOOPLAG_RUNTIME_NAME", "tab\there")]);
    assert_eq!(
        invalid(from_env()),
        (
            "LOOPLAG_RUNTIME_NAME".to_string(),
            "\"tab\\there\"".to_string(),
            "1 to 128 characters, no control characters".to_string()
        )
    );

    set_env(&[("LOOPLAG_RUNTIME_NAME", &"x".repeat(129))]);
    assert_eq!(invalid(from_env()).0, "LOOPLAG_RUNTIME_NAME");

    set_env(&[]);
    #[cfg(unix)]
    {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        std::env::set_var(
            "LOOPLAG_RUNTIME_NAME",
            OsString::from_vec(vec![b'a', 0xff, b'b']),
        );
        let (setting, value, accepted) = invalid(from_env());
        assert_eq!(setting, "LOOPLAG_RUNTIME_NAME");
        assert_eq!(value, "\"a\u{fffd}b\"");
        assert_eq!(accepted, "valid UTF-8 text");
    }
}

#[test]
fn sample_interval_good_and_bad() {
    for (text, expected) in [
        ("1ms", Duration::from_millis(1)),
        ("1000us", Duration::from_millis(1)),
        ("20ms", Duration::from_millis(20)),
        ("1s", Duration::from_secs(1)),
    ] {
        set_env(&[
            ("LOOPLAG_SAMPLE_INTERVAL", text),
            ("LOOPLAG_STALL_THRESHOLD", "1s"),
        ]);
        assert_eq!(from_env().unwrap().sample_interval(), expected, "{text}");
    }
    for bad in [
        "10", "10 ms", "1.5ms", "-10ms", "10MS", "fast", "10msec", " 10ms",
    ] {
        set_env(&[("LOOPLAG_SAMPLE_INTERVAL", bad)]);
        assert_eq!(
            invalid(from_env()),
            (
                "LOOPLAG_SAMPLE_INTERVAL".to_string(),
                format!("{bad:?}"),
                DURATION_FORM.to_string()
            ),
            "{bad:?}"
        );
    }
    for out_of_range in ["999us", "0ms", "2s"] {
        set_env(&[("LOOPLAG_SAMPLE_INTERVAL", out_of_range)]);
        assert_eq!(
            invalid(from_env()),
            (
                "LOOPLAG_SAMPLE_INTERVAL".to_string(),
                format!("{out_of_range:?}"),
                "a duration from 1ms to 1s".to_string()
            )
        );
    }
}

#[test]
fn stall_threshold_good_and_bad() {
    for (text, expected) in [
        ("10ms", Duration::from_millis(10)),
        ("200000us", Duration::from_millis(200)),
        ("3600s", Duration::from_secs(3600)),
    ] {
        set_env(&[("LOOPLAG_STALL_THRESHOLD", text)]);
        assert_eq!(from_env().unwrap().stall_threshold(), expected, "{text}");
    }
    for bad in ["50", "50 ms", "0.05s", "1h", "50ms\n"] {
        set_env(&[("LOOPLAG_STALL_THRESHOLD", bad)]);
        let (setting, value, accepted) = invalid(from_env());
        assert_eq!(setting, "LOOPLAG_STALL_THRESHOLD");
        assert_eq!(value, format!("{bad:?}"));
        assert_eq!(accepted, DURATION_FORM);
    }
    // Below the sample interval (which may itself come from the environment), or above 1 h.
    for (interval, threshold) in [("20ms", "10ms"), ("10ms", "3601s"), ("10ms", "0us")] {
        set_env(&[
            ("LOOPLAG_SAMPLE_INTERVAL", interval),
            ("LOOPLAG_STALL_THRESHOLD", threshold),
        ]);
        assert_eq!(
            invalid(from_env()),
            (
                "LOOPLAG_STALL_THRESHOLD".to_string(),
                format!("{threshold:?}"),
                "a duration from the sample interval up to 1h".to_string()
            )
        );
    }
}

#[test]
fn max_victims_good_and_bad() {
    for (text, expected) in [("0", 0), ("25", 25), ("100000", 100_000)] {
        set_env(&[("LOOPLAG_MAX_VICTIMS", text)]);
        assert_eq!(from_env().unwrap().max_victims(), expected);
    }
    for bad in ["-1", "1e3", "10 ", "1_000", "many", "0x10"] {
        set_env(&[("LOOPLAG_MAX_VICTIMS", bad)]);
        assert_eq!(
            invalid(from_env()),
            (
                "LOOPLAG_MAX_VICTIMS".to_string(),
                format!("{bad:?}"),
                COUNT_FORM.to_string()
            )
        );
    }
    set_env(&[("LOOPLAG_MAX_VICTIMS", "100001")]);
    assert_eq!(
        invalid(from_env()),
        (
            "LOOPLAG_MAX_VICTIMS".to_string(),
            "\"100001\"".to_string(),
            "a count from 0 to 100000".to_string()
        )
    );
    // Too many digits for any integer: not a count at all.
    set_env(&[("LOOPLAG_MAX_VICTIMS", "99999999999999999999999")]);
    assert_eq!(invalid(from_env()).2, COUNT_FORM);
}

#[test]
fn max_stall_logs_per_second_good_and_bad() {
    for (text, expected) in [("0", 0), ("1", 1), ("100000", 100_000)] {
        set_env(&[("LOOPLAG_MAX_STALL_LOGS_PER_SECOND", text)]);
        assert_eq!(from_env().unwrap().max_stall_logs_per_second(), expected);
    }
    for bad in ["-1", "ten", "5/s", "1.5", "+3"] {
        set_env(&[("LOOPLAG_MAX_STALL_LOGS_PER_SECOND", bad)]);
        assert_eq!(
            invalid(from_env()),
            (
                "LOOPLAG_MAX_STALL_LOGS_PER_SECOND".to_string(),
                format!("{bad:?}"),
                COUNT_FORM.to_string()
            )
        );
    }
    for out_of_range in ["100001", "4294967296"] {
        set_env(&[("LOOPLAG_MAX_STALL_LOGS_PER_SECOND", out_of_range)]);
        assert_eq!(
            invalid(from_env()),
            (
                "LOOPLAG_MAX_STALL_LOGS_PER_SECOND".to_string(),
                format!("{out_of_range:?}"),
                "a count from 0 to 100000".to_string()
            )
        );
    }
}

#[test]
fn explicit_calls_win_over_the_environment_in_either_order() {
    set_env(&[
        ("LOOPLAG_RUNTIME_NAME", "from-env"),
        ("LOOPLAG_SAMPLE_INTERVAL", "20ms"),
        ("LOOPLAG_STALL_THRESHOLD", "500ms"),
        ("LOOPLAG_MAX_VICTIMS", "5"),
        ("LOOPLAG_MAX_STALL_LOGS_PER_SECOND", "5"),
    ]);
    let explicit = |builder: looplag::Builder| {
        builder
            .runtime_name("explicit")
            .sample_interval(Duration::from_millis(2))
            .stall_threshold(Duration::from_millis(30))
            .max_victims(9)
            .max_stall_logs_per_second(1)
    };
    let before = explicit(LoopLag::builder()).from_env().build().unwrap();
    let after = explicit(LoopLag::builder().from_env()).build().unwrap();
    for looplag in [before, after] {
        assert_eq!(looplag.runtime_name(), "explicit");
        assert_eq!(looplag.sample_interval(), Duration::from_millis(2));
        assert_eq!(looplag.stall_threshold(), Duration::from_millis(30));
        assert_eq!(looplag.max_victims(), 9);
        assert_eq!(looplag.max_stall_logs_per_second(), 1);
    }

    // A setting left to the environment still comes from it.
    let mixed = LoopLag::builder()
        .from_env()
        .runtime_name("explicit")
        .build()
        .unwrap();
    assert_eq!(mixed.runtime_name(), "explicit");
    assert_eq!(mixed.sample_interval(), Duration::from_millis(20));
    assert_eq!(mixed.max_victims(), 5);

    // An explicit value makes the environment's value irrelevant, even a bad one.
    set_env(&[("LOOPLAG_SAMPLE_INTERVAL", "garbage")]);
    let overridden = LoopLag::builder()
        .from_env()
        .sample_interval(Duration::from_millis(10))
        .build()
        .expect("the explicit interval wins over the unparsable variable");
    assert_eq!(overridden.sample_interval(), Duration::from_millis(10));
    // An explicit value that is itself invalid is reported under the method's name.
    let (setting, _, _) = invalid(
        LoopLag::builder()
            .from_env()
            .sample_interval(Duration::ZERO)
            .build(),
    );
    assert_eq!(setting, "sample_interval");
}

#[test]
fn from_env_never_fails_and_build_reports_the_first_bad_variable() {
    set_env(&[
        ("LOOPLAG_SAMPLE_INTERVAL", "soon"),
        ("LOOPLAG_MAX_VICTIMS", "lots"),
    ]);
    // `from_env` returns a builder; only `build` looks at the values.
    let builder = LoopLag::builder().from_env();
    let err = builder.build().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "invalid looplag setting `LOOPLAG_SAMPLE_INTERVAL`: \"soon\" (accepted: {DURATION_FORM})"
        )
    );
}

#[test]
fn capture_stacks_good_and_bad() {
    for (text, expected) in [("true", true), ("false", false)] {
        set_env(&[("LOOPLAG_CAPTURE_STACKS", text)]);
        assert_eq!(from_env().unwrap().captures_stacks(), expected);
    }
    for bad in ["yes", "1", "TRUE", "on", " true"] {
        set_env(&[("LOOPLAG_CAPTURE_STACKS", bad)]);
        assert_eq!(
            invalid(from_env()),
            (
                "LOOPLAG_CAPTURE_STACKS".to_string(),
                format!("{bad:?}"),
                "`true` or `false`".to_string()
            )
        );
    }
}

#[test]
fn stack_signal_good_and_bad() {
    // 42 is the default; 50 is another free real-time signal.
    for (text, expected) in [("42", 42), ("50", 50)] {
        set_env(&[("LOOPLAG_STACK_SIGNAL", text)]);
        assert_eq!(from_env().unwrap().stack_signal(), expected);
    }
    for bad in ["SIGRTMIN", "-1", "4x"] {
        set_env(&[("LOOPLAG_STACK_SIGNAL", bad)]);
        assert_eq!(
            invalid(from_env()),
            (
                "LOOPLAG_STACK_SIGNAL".to_string(),
                format!("{bad:?}"),
                COUNT_FORM.to_string()
            )
        );
    }
    // A number, but not a signal looplag accepts: SIGKILL, SIGSEGV, out of range.
    for refused in ["9", "11", "1000"] {
        set_env(&[("LOOPLAG_STACK_SIGNAL", refused)]);
        let (setting, value, accepted) = invalid(from_env());
        assert_eq!(setting, "LOOPLAG_STACK_SIGNAL");
        assert_eq!(value, format!("{refused:?}"));
        assert!(accepted.contains("real-time signal"), "{accepted}");
    }
}

#[test]
fn max_stacks_per_minute_good_and_bad() {
    for (text, expected) in [("0", 0), ("1", 1), ("6000", 6000)] {
        set_env(&[("LOOPLAG_MAX_STACKS_PER_MINUTE", text)]);
        let looplag = from_env().unwrap();
        assert_eq!(looplag.max_stacks_per_minute(), expected);
        assert_eq!(
            looplag.captures_stacks(),
            expected > 0 && cfg!(all(target_os = "linux", target_arch = "x86_64"))
        );
    }
    for bad in ["-1", "ten", "1.5"] {
        set_env(&[("LOOPLAG_MAX_STACKS_PER_MINUTE", bad)]);
        assert_eq!(
            invalid(from_env()),
            (
                "LOOPLAG_MAX_STACKS_PER_MINUTE".to_string(),
                format!("{bad:?}"),
                COUNT_FORM.to_string()
            )
        );
    }
    set_env(&[("LOOPLAG_MAX_STACKS_PER_MINUTE", "6001")]);
    assert_eq!(
        invalid(from_env()),
        (
            "LOOPLAG_MAX_STACKS_PER_MINUTE".to_string(),
            "\"6001\"".to_string(),
            "a count from 0 to 6000".to_string()
        )
    );
}

#[test]
fn library_prefixes_good_and_bad() {
    set_env(&[]);
    assert!(from_env().unwrap().library_prefixes().is_empty());
    set_env(&[("LOOPLAG_LIBRARY_PREFIXES", "my_sdk,app::db,src/vendor/")]);
    assert_eq!(
        from_env().unwrap().library_prefixes(),
        ["my_sdk", "app::db", "src/vendor/"]
    );
    // An explicit call wins.
    let looplag = LoopLag::builder()
        .library_prefixes(["app::pool"])
        .from_env()
        .build()
        .unwrap();
    assert_eq!(looplag.library_prefixes(), ["app::pool"]);
    for bad in ["a,,b", "a, b", "a,", ",a"] {
        set_env(&[("LOOPLAG_LIBRARY_PREFIXES", bad)]);
        let (setting, value, accepted) = invalid(from_env());
        assert_eq!(setting, "LOOPLAG_LIBRARY_PREFIXES");
        assert_eq!(value, format!("{bad:?}"));
        assert!(accepted.contains("at most 100 prefixes"), "{accepted}");
    }
    set_env(&[]);
    let (setting, _, _) = invalid(LoopLag::builder().library_prefixes([""]).build());
    assert_eq!(setting, "library_prefixes");
    let many: Vec<String> = (0..101).map(|i| format!("crate{i}")).collect();
    let (setting, _, _) = invalid(LoopLag::builder().library_prefixes(many).build());
    assert_eq!(setting, "library_prefixes");
}

#[test]
fn max_culprit_functions_good_and_bad() {
    set_env(&[]);
    assert_eq!(from_env().unwrap().max_culprit_functions(), 100);
    for (text, expected) in [("0", 0), ("1", 1), ("10000", 10000)] {
        set_env(&[("LOOPLAG_MAX_CULPRIT_FUNCTIONS", text)]);
        assert_eq!(from_env().unwrap().max_culprit_functions(), expected);
    }
    for bad in ["-1", "ten", "1.5"] {
        set_env(&[("LOOPLAG_MAX_CULPRIT_FUNCTIONS", bad)]);
        assert_eq!(
            invalid(from_env()),
            (
                "LOOPLAG_MAX_CULPRIT_FUNCTIONS".to_string(),
                format!("{bad:?}"),
                COUNT_FORM.to_string()
            )
        );
    }
    set_env(&[("LOOPLAG_MAX_CULPRIT_FUNCTIONS", "10001")]);
    assert_eq!(
        invalid(from_env()),
        (
            "LOOPLAG_MAX_CULPRIT_FUNCTIONS".to_string(),
            "\"10001\"".to_string(),
            "a count from 0 to 10000".to_string()
        )
    );
}
