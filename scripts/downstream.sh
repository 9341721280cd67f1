#!/usr/bin/env bash
# looplag installs next to anything (issue 16): a scratch crate outside the repository that
# depends on looplag by path resolves to the newest release of every dependency (no lock
# file, so Cargo picks the newest semver-compatible versions; backtrace >= 0.3.77 is asked
# for explicitly, the release an exact pin once kept out) and builds; then every crate of
# the workspace packages and passes `cargo publish --dry-run`, with a package that holds
# only what a user needs.
#
#   ./scripts/downstream.sh [repo]     repo defaults to this checkout
set -euo pipefail
root=$(cd "${1:-$(dirname "$0")/..}" && pwd)
target="${CARGO_TARGET_DIR:-$root/target}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

mkdir "$scratch/src"
cat > "$scratch/Cargo.toml" <<TOML
[package]
name = "looplag-downstream-check"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
looplag = { path = "$root" }
backtrace = "0.3.77"
TOML
cat > "$scratch/src/main.rs" <<'RS'
#[looplag::main(flavor = "current_thread")]
async fn main() {
    let _: looplag::LoopLagLayer = looplag::layer();
}
RS
echo "downstream: resolving the newest releases against $root"
(cd "$scratch" && cargo generate-lockfile --quiet)
(cd "$scratch" && cargo tree --quiet --depth 1 -e normal) | sed 's/^/  /'
echo "downstream: building (target dir $target/downstream)"
(cd "$scratch" && cargo build --quiet --target-dir "$target/downstream")

echo "package: cargo publish --dry-run for every crate of the workspace"
(cd "$root" && cargo publish --quiet --workspace --dry-run --allow-dirty)
files=$(cd "$root" && cargo package --quiet --list --allow-dirty -p looplag)
bad=$(printf '%s\n' "$files" | grep -E '^(vendor|benches|tests|scripts|collector|examples|\.ci|\.config)/' || true)
if [ -n "$bad" ]; then
    echo "error: the looplag package holds files a user never needs:" >&2
    printf '  %s\n' $bad >&2
    exit 1
fi
# `publish --workspace` leaves the packages it built in package/tmp-crate/.
crate=$(ls "$target"/package/tmp-crate/looplag-[0-9]*.crate "$target"/package/looplag-[0-9]*.crate \
    2>/dev/null | head -n 1 || true)
if [ -z "$crate" ]; then
    echo "error: no looplag .crate file under $target/package" >&2
    exit 1
fi
size=$(stat -c %s "$crate")
echo "package: $(printf '%s\n' "$files" | wc -l) files, $size bytes ($crate)"
if [ "$size" -gt 1048576 ]; then
    echo "error: the looplag package is $size bytes, over 1 MiB" >&2
    exit 1
fi
