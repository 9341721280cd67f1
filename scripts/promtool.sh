#!/usr/bin/env bash
# Prints the path of a promtool binary, fetching Debian's prometheus package into a cache
# folder (not installing it: no service is started) when none is on PATH.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
    command -v promtool
    exit 0
fi
cache="${LOOPLAG_PROMTOOL_CACHE:-$HOME/.cache/looplag/promtool}"
if [ ! -x "$cache/usr/bin/promtool" ]; then
    mkdir -p "$cache"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && { apt-get download prometheus >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null; }; })
    dpkg -x "$work"/prometheus_*.deb "$cache"
fi
echo "$cache/usr/bin/promtool"
