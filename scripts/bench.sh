#!/usr/bin/env bash
# The one benchmark command (BENCHMARKS.md): every benchmark, in the stable build and in the
# --cfg tokio_unstable build, printed as Markdown tables and saved under target/bench-results/.
#
#   ./scripts/bench.sh            full run (≈ 11 min on 2 cores, after the builds)
#   ./scripts/bench.sh --quick    smoke run (≈ 3.5 min): fewer rounds, shorter periods
#
# Benchmarks are not tests: nothing here asserts a time. Run it on a quiet machine; every
# table records the load average before and after it.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=()
if [[ "${1:-}" == "--quick" ]]; then
    QUICK=(--quick)
fi
OUT=target/bench-results
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
REPORT="$OUT/bench-$STAMP${QUICK:+-quick}.md"

BENCHES=(hot_path server watchdog_cpu accuracy detection)

{
    echo "# looplag benchmarks, $STAMP${QUICK:+ (--quick)}"
    echo
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
    echo "rustc: $(rustc --version)"
    echo "uptime before: $(uptime)"
} | tee "$REPORT"

echo "==> building (stable and --cfg tokio_unstable)" >&2
cargo bench --no-run --quiet
RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/unstable cargo bench --no-run --quiet
# tokio-blocked needs tokio's own task spans: tokio's `tracing` feature under tokio_unstable.
# It is turned on for this one build only; it would add tokio's spans to every test.
RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/unstable \
    cargo bench --no-run --quiet --features tokio/tracing --bench detection

run() {
    echo "==> $*" >&2
    "$@" 2>>"$OUT/stderr-$STAMP.log" | tee -a "$REPORT"
}

{ echo; echo "# stable build"; } | tee -a "$REPORT"
for bench in "${BENCHES[@]}"; do
    run cargo bench --quiet --bench "$bench" -- "${QUICK[@]}"
done

{ echo; echo "# --cfg tokio_unstable build"; } | tee -a "$REPORT"
for bench in hot_path server accuracy; do
    run env RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/unstable \
        cargo bench --quiet --bench "$bench" -- "${QUICK[@]}"
done
run env RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/unstable \
    cargo bench --quiet --features tokio/tracing --bench detection -- "${QUICK[@]}"

{ echo; echo "uptime after: $(uptime)"; } | tee -a "$REPORT"
echo "==> results: $REPORT" >&2
