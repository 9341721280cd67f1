#!/usr/bin/env bash
# The one test command (README.md): installs what the tests need, then runs every check and
# every test in both build configurations (stable and --cfg tokio_unstable).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "tools"
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "format and lints"
cargo fmt --check
cargo clippy --all-targets -- -D warnings

step "docs (deny missing docs and broken links)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

step "tests, stable build"
cargo nextest run --no-fail-fast
cargo test --doc --quiet

step "tests, --cfg tokio_unstable build"
RUSTFLAGS="--cfg tokio_unstable" RUSTDOCFLAGS="--cfg tokio_unstable" \
    CARGO_TARGET_DIR=target/unstable cargo clippy --all-targets -- -D warnings
RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/unstable \
    cargo nextest run --no-fail-fast

step "model checking of the slot protocol (loom)"
# A crate-specific cfg, not `loom`: tokio changes its API under cfg(loom). loom is the vendored,
# patched 0.7.3 (vendor/loom/PATCHED.md). The preemption bound keeps this under a minute.
RUSTFLAGS="--cfg looplag_loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=5 \
    cargo test --release --lib loom_
