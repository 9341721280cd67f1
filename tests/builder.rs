//! Every bad builder value is an error naming the setting, the value and what is accepted.

use std::time::Duration;

use looplag::{Error, LoopLag};

fn invalid(builder: looplag::Builder) -> (String, String, String, String) {
    match builder.build() {
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
            (setting.to_string(), value, accepted.to_string(), message)
        }
        other => panic!("expected InvalidSetting, got {other:?}"),
    }
}

#[test]
fn defaults_build() {
    let looplag = LoopLag::builder().build().expect("defaults are valid");
    assert_eq!(looplag.runtime_name(), "main");
    assert_eq!(looplag::DEFAULT_SAMPLE_INTERVAL, Duration::from_millis(10));
    assert_eq!(looplag::DEFAULT_STALL_THRESHOLD, Duration::from_millis(50));
    assert_eq!(looplag::DEFAULT_MAX_VICTIMS, 1000);
}

#[test]
fn sample_interval_zero_or_absurd_is_rejected() {
    for bad in [
        Duration::ZERO,
        Duration::from_micros(999),
        Duration::from_secs(2),
    ] {
        let (setting, value, accepted, message) = invalid(LoopLag::builder().sample_interval(bad));
        assert_eq!(setting, "sample_interval");
        assert_eq!(value, format!("{bad:?}"));
        assert_eq!(accepted, "a duration from 1ms to 1s");
        assert!(message.contains("sample_interval") && message.contains(&value));
    }
    for good in [Duration::from_millis(1), Duration::from_secs(1)] {
        LoopLag::builder()
            .sample_interval(good)
            .stall_threshold(Duration::from_secs(1))
            .build()
            .expect("in range");
    }
}

#[test]
fn stall_threshold_below_interval_or_absurd_is_rejected() {
    let (setting, value, accepted, _) = invalid(
        LoopLag::builder()
            .sample_interval(Duration::from_millis(20))
            .stall_threshold(Duration::from_millis(10)),
    );
    assert_eq!(setting, "stall_threshold");
    assert_eq!(value, "10ms");
    assert_eq!(accepted, "a duration from the sample interval up to 1h");
    let (setting, _, _, _) = invalid(LoopLag::builder().stall_threshold(Duration::from_secs(3601)));
    assert_eq!(setting, "stall_threshold");
    let (setting, _, _, _) = invalid(LoopLag::builder().stall_threshold(Duration::ZERO));
    assert_eq!(setting, "stall_threshold");
    LoopLag::builder()
        .stall_threshold(Duration::from_millis(10))
        .build()
        .expect("threshold equal to the interval is accepted");
}

#[test]
fn runtime_name_empty_or_bad_is_rejected() {
    for bad in ["", "tab\there", &"x".repeat(129)] {
        let (setting, value, accepted, _) = invalid(LoopLag::builder().runtime_name(bad));
        assert_eq!(setting, "runtime_name");
        assert_eq!(value, format!("{bad:?}"));
        assert_eq!(accepted, "1 to 128 characters, no control characters");
    }
    LoopLag::builder()
        .runtime_name("x".repeat(128))
        .build()
        .expect("128 characters are fine");
}

#[test]
fn max_victims_over_limit_is_rejected() {
    let (setting, value, accepted, _) = invalid(LoopLag::builder().max_victims(100_001));
    assert_eq!(setting, "max_victims");
    assert_eq!(value, "100001");
    assert_eq!(accepted, "a count from 0 to 100000");
    LoopLag::builder()
        .max_victims(0)
        .build()
        .expect("0 disables victims");
}

#[test]
fn start_twice_is_an_error_until_the_first_watchdog_is_dropped() {
    let looplag = LoopLag::builder().runtime_name("twice").build().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let first = looplag.start(runtime.handle()).expect("first start");
    match looplag.start(runtime.handle()) {
        Err(Error::AlreadyStarted { runtime_name }) => assert_eq!(runtime_name, "twice"),
        other => panic!("expected AlreadyStarted, got {other:?}"),
    }
    drop(first);
    let again = looplag.start(runtime.handle()).expect("restart after drop");
    drop(again);
}
