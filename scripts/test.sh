#!/usr/bin/env bash
# The one test command (CONTRIBUTING.md): installs what the tests need, then runs every check and
# every test in both build configurations (stable and --cfg tokio_unstable).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "tools"
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# valgrind (callgrind) for the instruction-count guard at the end, from the distribution.
if ! command -v valgrind >/dev/null 2>&1; then
    SUDO=()
    if [[ "$(id -u)" != 0 ]]; then SUDO=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get install -y -qq valgrind >/dev/null \
        || { "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y -qq valgrind >/dev/null; }
fi

step "rotel collector for the end-to-end tests (PyPI rotel, pinned in scripts/rotel.sh)"
# The e2e tests (tests/e2e_collector.rs) start this binary on loopback; without it they fail,
# so a failed install stops the run here with rotel.sh's message.
if ! LOOPLAG_ROTEL_BIN="$(./scripts/rotel.sh install)"; then
    echo "error: could not install the rotel collector (scripts/rotel.sh install)" >&2
    exit 1
fi
export LOOPLAG_ROTEL_BIN
./scripts/rotel.sh version

step "collector config, alert rules and dashboard match the crate's telemetry names"
python3 -c "import yaml" 2>/dev/null || python3 -m pip install --quiet pyyaml
PROMTOOL="$(./scripts/promtool.sh)" python3 scripts/check_collector_config.py --require-promtool --self-test

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

step "docs (deny missing docs and broken links)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

step "tests, stable build"
cargo nextest run --no-fail-fast
cargo test --doc --quiet

step "stacks in a release build (debug = \"line-tables-only\") still name the culprit"
cargo nextest run --release --no-fail-fast --test stacks

step "stacks in a release build without line tables: the culprit by crate name, or \"not found\""
# Only looplag and this test rebuild (about 30 s): the dependencies keep their artifacts.
LOOPLAG_TEST_NO_LINE_TABLES=1 cargo nextest run --release --no-fail-fast --test stacks \
    --config 'profile.release.package.looplag.debug=false' \
    -E 'test(with_or_without_line_tables_the_culprit_is_named) | test(a_stack_of_library_code_only_says_it_has_no_culprit)'

step "stacks in a release build with debug = \"limited\" (README's profile): inlined culprits named in full"
# Only looplag and this test rebuild, as above.
LOOPLAG_TEST_DEBUG_LIMITED=1 cargo nextest run --release --no-fail-fast --test stacks \
    --config 'profile.release.package.looplag.debug="limited"' \
    -E 'test(an_inlined_culprit_is_named_in_full_with_limited_debug_info) | test(with_or_without_line_tables_the_culprit_is_named)'

step "the demo, as a newcomer runs it (cargo run --example demo: 15 s, drives its own traffic)"
cargo build --quiet --example demo
./scripts/check_demo.sh target/debug/examples/demo

step "tests, --cfg tokio_unstable build"
RUSTFLAGS="--cfg tokio_unstable" RUSTDOCFLAGS="--cfg tokio_unstable" \
    CARGO_TARGET_DIR=target/unstable cargo clippy --all-targets -- -D warnings
# The compile-fail tests of #[looplag::main] check the macro's messages, which no cfg changes:
# they run in the stable build only (trybuild builds every dependency once more).
RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/unstable \
    cargo nextest run --no-fail-fast -E 'not binary(main_compile_fail)'

step "model checking of the slot protocol (loom)"
# A crate-specific cfg, not `loom`: tokio changes its API under cfg(loom). loom is the vendored,
# patched 0.7.3 (vendor/loom/PATCHED.md). The preemption bound keeps this under a minute.
RUSTFLAGS="--cfg looplag_loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=5 \
    cargo test --release --lib loom_

step "instruction counts of the hot path against benches/instructions-baseline.json (callgrind)"
# Fails when looplag adds more than 2 % (at least 1 instruction) over the baseline to any
# row; only warns when rustc, glibc, valgrind or the CPU valgrind presents differ from the
# baseline's. The self-test first shows the guard rejects an injected cost. Stable build
# only (its release dependencies are built above): the poll-hook row needs a release build of
# every dependency under --cfg tokio_unstable (≈ 2.5 min more); run it with
# `scripts/instructions.py --check`. BENCHMARKS.md, section "Instructions".
python3 scripts/instructions.py --self-test
python3 scripts/instructions.py --check --stable-only

step "installs next to anything: newest dependencies downstream, cargo publish --dry-run"
./scripts/downstream.sh
