#!/usr/bin/env bash
# Runs the demo binary (default: target/debug/examples/demo) with no collector and checks
# that its terminal output tells the story: the delay percentiles every second, and each of
# the four injected stalls with its duration, its request and its victims.
set -euo pipefail
cd "$(dirname "$0")/.."
demo="${1:-target/debug/examples/demo}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT

# Never a collector here: the demo must need none.
if ! env -u OTEL_EXPORTER_OTLP_ENDPOINT timeout 60 "$demo" >"$out" 2>&1; then
    cat "$out"
    echo "check_demo: the demo failed or did not end by itself within 60 s" >&2
    exit 1
fi
cat "$out"

fail=0
expect() {
    if ! grep -Eq "$1" "$out"; then
        echo "check_demo: missing from the demo's output: $2 (/$1/)" >&2
        fail=1
    fi
}
expect '^\[ *[0-9.]+s\] delay p50 .* p95 .* p99 .* max ' "a per-second delay line"
for request in '/block\?ms=300' '/cpu\?ms=200' '/mutex\?ms=250' '/block\?ms=1200'; do
    expect "STALL  ended after [0-9.]+ (ms|µs)  in GET ${request}: [0-9]+ waiting requests marked as victims" \
        "the ended stall of GET ${request//\\/} with its victim count"
done
expect 'STALL  blocked for [0-9.]+ ms so far  in GET /block\?ms=1200' "an in-progress report"
if [[ "$(uname -s)-$(uname -m)" == Linux-x86_64 ]]; then
    # Stacks and the stall diagnosis (Linux): what each stall did, and the line that did it.
    expect 'kind: blocked, .* waiting in clock_nanosleep\(\)' "the diagnosis of a sleeping handler"
    expect 'kind: cpu, ' "the diagnosis of a spinning handler"
    expect 'kind: blocked, .* waiting in futex\(\)' "the diagnosis of a handler waiting for a mutex"
    for culprit in block cpu mutex; do
        expect "demo::app::${culprit}.*<- the blocking code" "the stack frame of the ${culprit} handler"
    done
fi
expect '^summary: [0-9]+ stalls' "the summary line"
exit "$fail"
