//! End to end, as a user runs it: `examples/tokio_main.rs` (axum + tower-http's `TraceLayer`
//! under `#[looplag::main]`, OpenTelemetry set up inside `main`) exports over OTLP/HTTP to a
//! real `rotel` collector; the stall of its `/block` request arrives as the child of that
//! request's span, with its stack and kind, next to looplag's metrics.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::rotel::Collector;

const SERVICE: &str = "tokio-main-e2e";

/// The example's binary, built (or found up to date) in this test's target directory, so that
/// running this test alone never runs a stale example.
fn example() -> PathBuf {
    let test = std::env::current_exe().expect("the test binary");
    let profile_dir = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let target_dir = profile_dir.parent().expect("target/<profile>");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--example",
            "tokio_main",
            "--target-dir",
        ])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build --example tokio_main");
    assert!(status.success(), "cargo build --example tokio_main failed");
    let binary = profile_dir.join("examples").join("tokio_main");
    assert!(binary.exists(), "{} is missing", binary.display());
    binary
}

#[test]
fn the_tokio_main_example_s_stall_reaches_the_collector_under_its_request() {
    let collector = Collector::start();
    let output = Command::new(example())
        .arg("--self-drive")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.http_url())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", SERVICE)
        .env("LOOPLAG_STALL_THRESHOLD", "50ms")
        .output()
        .expect("run the example");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the example failed:\n{stdout}\n{stderr}"
    );
    let dump = collector.wait_for(Duration::from_secs(20), |dump| {
        dump.spans_of(SERVICE)
            .any(|span| span.name == "tokio.eventloop.stall")
            && dump.last_point(SERVICE, "tokio.eventloop.stalls").is_some()
    });
    let spans: Vec<_> = dump.spans_of(SERVICE).collect();
    let stall = spans
        .iter()
        .find(|span| span.name == "tokio.eventloop.stall")
        .unwrap_or_else(|| panic!("no stall span at the collector; the example said:\n{stdout}"));
    let parent = spans
        .iter()
        .find(|span| span.span_id == stall.parent_id)
        .unwrap_or_else(|| panic!("the stall span's parent was not exported: {stall:#?}"));
    assert_eq!(parent.name, "request", "{parent:#?}");
    assert!(
        parent
            .attr("uri")
            .is_some_and(|uri| uri.text().contains("/block")),
        "the parent is the /block request: {parent:#?}"
    );
    assert!(
        stall.attr("tokio.eventloop.stall.kind").is_some(),
        "{stall:#?}"
    );
    assert!(
        stall.attr("code.stacktrace").is_some()
            || stall.attr("tokio.eventloop.stall.stack_status").is_some(),
        "{stall:#?}"
    );
    assert!(
        stall.duration() >= Duration::from_millis(250),
        "the stall lasted the 300 ms block: {:?}",
        stall.duration()
    );
    for metric in ["tokio.eventloop.stalls", "tokio.eventloop.delay"] {
        assert!(
            dump.last_point(SERVICE, metric).is_some(),
            "{metric} reached the collector"
        );
    }
}
