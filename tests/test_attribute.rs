//! `#[looplag::test]` and `looplag::testing::assert_no_stalls` as a user runs them: the
//! fixture crate `tests/fixtures/blocking` is built (into this run's target directory, so
//! its dependencies are shared) and its tests run once, as a subprocess, by `cargo test`.
//! Each `blocks_*` test must fail with a message naming its own function and file, each
//! `clean_*` test must pass.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

/// The fixture's tests and whether each must fail.
const EXPECTED: &[(&str, bool)] = &[
    ("blocks_in_the_body", true),
    ("blocks_in_the_body_multi_thread", true),
    ("blocks_in_a_spawned_task", true),
    ("blocks_in_a_spawned_task_multi_thread", true),
    ("blocks_on_a_std_mutex", true),
    ("blocks_in_a_cpu_loop", true),
    ("blocks_in_the_function_form", true),
    ("clean_awaits_only", false),
    ("clean_multi_thread", false),
    ("clean_start_paused", false),
    ("clean_under_its_own_threshold", false),
    ("clean_function_form", false),
];

/// The tests that block in the future `block_on` runs (the body, or the function form's
/// future): looplag watches those polls itself, so their stall is exact, never estimated.
const BLOCKS_IN_THE_BODY: &[&str] = &[
    "blocks_in_the_body",
    "blocks_in_the_body_multi_thread",
    "blocks_in_a_cpu_loop",
    "blocks_in_the_function_form",
];

/// The text between `---- name stdout ----` and the next such line, per failed test.
fn failure_messages(output: &str) -> BTreeMap<String, String> {
    let mut messages = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in output.lines() {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|rest| rest.strip_suffix(" stdout ----"))
        {
            messages.extend(current.take());
            current = Some((name.to_string(), String::new()));
        } else if line == "failures:" {
            messages.extend(current.take());
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    messages.extend(current);
    messages
}

#[test]
fn blocking_tests_fail_naming_their_function_and_clean_ones_pass() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fixture = root.join("tests/fixtures/blocking");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .arg("test")
        .arg("--manifest-path")
        .arg(fixture.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .args(["--test", "blocking", "--", "--test-threads", "2"])
        .env("RUST_BACKTRACE", "0")
        .env_remove("LOOPLAG_TEST_STALL_THRESHOLD")
        .output()
        .expect("run cargo test on the fixture");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let all = format!("{stdout}\n{stderr}");
    let messages = failure_messages(&stdout);
    for &(name, fails) in EXPECTED {
        let ok = format!("test {name} ... ok");
        let failed = format!("test {name} ... FAILED");
        if !fails {
            assert!(all.contains(&ok), "{name} passes; output:\n{all}");
            continue;
        }
        assert!(all.contains(&failed), "{name} fails; output:\n{all}");
        let message = messages
            .get(name)
            .unwrap_or_else(|| panic!("{name}'s failure message in:\n{all}"));
        // The culprit line names the fixture's function and file (and line). A poll of the
        // body that the watchdog had no CPU to see while it blocked (a loaded machine) is
        // found when it returns, without a stack: the message then names the test function
        // (or the function form's call) and its file.
        let from_the_stack = message.contains(&format!("blocked in `blocking::{name}` at "))
            && message.contains("tests/fixtures/blocking/tests/blocking.rs:");
        let from_the_body_poll = message.contains("one poll of it took")
            && message.contains(name)
            && message.contains("tests/blocking.rs:");
        assert!(
            from_the_stack || (BLOCKS_IN_THE_BODY.contains(&name) && from_the_body_poll),
            "{name}'s message names its function and file:\n{message}"
        );
        if BLOCKS_IN_THE_BODY.contains(&name) {
            assert!(
                !message.contains("(estimated"),
                "{name} blocked in the body: its stall is exact:\n{message}"
            );
        }
        assert!(
            message.contains("looplag: this test blocked its tokio runtime")
                && message.contains("LOOPLAG_TEST_STALL_THRESHOLD"),
            "{name}'s message has the headline and the advice line:\n{message}"
        );
    }
    assert!(
        stdout.contains("5 passed; 7 failed"),
        "every fixture test ran:\n{all}"
    );
}
