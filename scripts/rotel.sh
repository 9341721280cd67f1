#!/usr/bin/env bash
# rotel.sh: install, start and stop the rotel OpenTelemetry collector for looplag's
# end-to-end tests. rotel is a Rust OTLP collector shipped as a binary inside the PyPI
# package `rotel` (rotel/rotel-agent in the wheel; the wheel is tagged cp311 manylinux_2_34
# x86_64, so it needs CPython 3.11 and glibc >= 2.34).
#
#   scripts/rotel.sh install
#       pip-installs the pinned rotel into a venv at
#       ${LOOPLAG_ROTEL_VENV:-$HOME/.cache/looplag/rotel-venv}; fails loudly if it cannot.
#   scripts/rotel.sh bin
#       prints the path of the rotel-agent binary (for tests that spawn it themselves).
#   scripts/rotel.sh start <grpc_port> <http_port> <logfile> [-- <rotel start args>...]
#       starts `rotel-agent start` on 127.0.0.1:<grpc_port> (OTLP gRPC) and
#       127.0.0.1:<http_port> (OTLP HTTP), stdout+stderr appended to <logfile>, waits
#       (bounded, ${LOOPLAG_ROTEL_START_TIMEOUT:-15} s) until this very process listens on
#       both ports, then prints its PID on stdout. Non-zero exit, log tail on stderr, and
#       nothing left running if it does not come up.
#       Default rotel args: --exporter blackhole --debug-log traces --debug-log metrics
#       --debug-log-verbosity detailed   (every span/metric received is printed in the log).
#       Args after `--` replace those defaults, e.g. forward to an OTLP receiver of the test:
#         start 14317 14318 log -- --exporter otlp \
#           --otlp-exporter-endpoint http://127.0.0.1:24317 --otlp-exporter-protocol grpc
#   scripts/rotel.sh stop <pid>
#       SIGTERM to that PID (only if it is a rotel-agent), SIGKILL after 5 s.
#   scripts/rotel.sh free-ports [n]
#       prints n (default 2) currently free TCP ports on 127.0.0.1, one per line
#       (rotel panics on port 0, so callers must pick real ports).
#   scripts/rotel.sh version
#       prints the pinned PyPI version and the binary's own version.
set -euo pipefail

# Pinned: PyPI rotel 0.0.1a15 (latest on PyPI when pinned; its binary reports
# "rotel 0.0.1-alpha10"). Only pre-releases exist, `==` pins it without --pre.
ROTEL_PYPI_VERSION="0.0.1a15"
VENV="${LOOPLAG_ROTEL_VENV:-$HOME/.cache/looplag/rotel-venv}"
START_TIMEOUT="${LOOPLAG_ROTEL_START_TIMEOUT:-15}"
PYTHON="${LOOPLAG_ROTEL_PYTHON:-python3}"

die() { echo "rotel.sh: error: $*" >&2; exit 1; }
note() { echo "rotel.sh: $*" >&2; }

find_bin() {
    local b
    for b in "$VENV"/lib/python3*/site-packages/rotel/rotel-agent; do
        if [[ -x "$b" ]]; then echo "$b"; return 0; fi
    done
    return 1
}

installed_version() {
    local d
    for d in "$VENV"/lib/python3*/site-packages/rotel-*.dist-info; do
        [[ -d "$d" ]] || continue
        d="${d##*/rotel-}"; echo "${d%.dist-info}"; return 0
    done
    return 1
}

cmd_install() {
    local have bin
    have="$(installed_version || true)"
    if [[ "$have" == "$ROTEL_PYPI_VERSION" ]] && bin="$(find_bin)" && "$bin" --version >/dev/null 2>&1; then
        note "rotel $ROTEL_PYPI_VERSION already installed in $VENV"
        echo "$bin"
        return 0
    fi
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set LOOPLAG_ROTEL_PYTHON)"
    local pyver
    pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    [[ "$pyver" == "3.11" ]] || note "warning: $PYTHON is $pyver; rotel $ROTEL_PYPI_VERSION ships cp311 wheels only"
    if [[ ! -x "$VENV/bin/pip" ]]; then
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV" || die "cannot create a venv at $VENV ($PYTHON -m venv failed; on Debian: apt-get install python3-venv)"
    fi
    "$VENV/bin/pip" install --disable-pip-version-check --no-input "rotel==$ROTEL_PYPI_VERSION" >&2 \
        || die "pip install rotel==$ROTEL_PYPI_VERSION into $VENV failed"
    bin="$(find_bin)" || die "rotel installed, but no executable rotel/rotel-agent under $VENV"
    "$bin" --version >&2 || die "$bin does not run (glibc >= 2.34 and x86_64 are required)"
    note "installed rotel $ROTEL_PYPI_VERSION in $VENV"
    echo "$bin"
}

cmd_bin() {
    find_bin || die "rotel is not installed in $VENV; run: $0 install"
}

is_port() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 65535 )); }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# True when process $1 owns a socket listening on 127.0.0.1:$2 (/proc/net/tcp: local
# address 0100007F:PORT in hex, state 0A = LISTEN, field 10 = inode).
pid_listens_on() {
    local pid="$1" port_hex inode
    port_hex="$(printf '%04X' "$2")"
    while read -r inode; do
        [[ -n "$inode" ]] || continue
        if find "/proc/$pid/fd" -maxdepth 1 -lname "socket:\[$inode\]" 2>/dev/null | grep -q .; then
            return 0
        fi
    done < <(awk -v a="0100007F:$port_hex" '$2 == a && $4 == "0A" { print $10 }' /proc/net/tcp 2>/dev/null)
    return 1
}

cmd_start() {
    [[ $# -ge 3 ]] || die "usage: $0 start <grpc_port> <http_port> <logfile> [-- <rotel start args>...]"
    local grpc="$1" http="$2" log="$3"; shift 3
    is_port "$grpc" || die "bad gRPC port '$grpc' (rotel cannot use port 0: pick one, see free-ports)"
    is_port "$http" || die "bad HTTP port '$http'"
    [[ "$grpc" != "$http" ]] || die "gRPC and HTTP ports must differ"
    local -a args=(--exporter blackhole --debug-log traces --debug-log metrics --debug-log-verbosity detailed)
    if [[ $# -gt 0 ]]; then
        [[ "$1" == "--" ]] || die "unexpected argument '$1' (rotel args go after --)"
        shift
        args=("$@")
    fi
    local bin
    bin="$(find_bin)" || die "rotel is not installed in $VENV; run: $0 install"
    local p
    for p in "$grpc" "$http"; do
        ! port_open "$p" || die "127.0.0.1:$p is already in use"
    done
    mkdir -p "$(dirname "$log")"
    : >>"$log" || die "cannot write $log"

    # NO_COLOR: plain text log lines (otherwise rotel writes ANSI colour codes even to a file).
    # stdin from /dev/null and both output streams to the log, so a caller reading this
    # script's stdout (e.g. Rust's Command::output) is not held open by rotel.
    NO_COLOR=1 "$bin" start \
        --otlp-grpc-endpoint "127.0.0.1:$grpc" \
        --otlp-http-endpoint "127.0.0.1:$http" \
        "${args[@]}" </dev/null >>"$log" 2>&1 &
    local pid=$!

    # Ready = this process listens on both ports. The "Starting Rotel." log line is printed
    # before configuration errors are detected and before the ports are bound, so it is not
    # a readiness signal.
    local deadline=$(( SECONDS + START_TIMEOUT ))
    while :; do
        if ! alive "$pid"; then
            local rc=0
            wait "$pid" 2>/dev/null || rc=$?
            echo "rotel.sh: error: rotel exited (status $rc) before listening on 127.0.0.1:$grpc and :$http; log $log:" >&2
            tail -n 20 "$log" >&2 || true
            exit 1
        fi
        if pid_listens_on "$pid" "$grpc" && pid_listens_on "$pid" "$http"; then
            break
        fi
        if (( SECONDS >= deadline )); then
            echo "rotel.sh: error: rotel (pid $pid) not listening on 127.0.0.1:$grpc and :$http after ${START_TIMEOUT}s; stopping it; log $log:" >&2
            tail -n 20 "$log" >&2 || true
            kill -TERM "$pid" 2>/dev/null || true
            sleep 1
            kill -KILL "$pid" 2>/dev/null || true
            exit 1
        fi
        sleep 0.05
    done
    echo "$pid"
}

# True while process $1 exists and has not exited. An exited rotel started by `start` is
# reparented to PID 1 and stays a zombie until PID 1 reaps it (1-2 s in this sandbox),
# so `kill -0` alone would report it as still running.
alive() {
    local state
    state="$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != "Z" && "$state" != "X" ]]
}

cmd_stop() {
    [[ $# -eq 1 && "$1" =~ ^[0-9]+$ ]] || die "usage: $0 stop <pid>"
    local pid="$1"
    if ! alive "$pid"; then
        note "pid $pid is not running"
        return 0
    fi
    # Never signal a PID that was recycled for another program.
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmdline" == *rotel-agent* ]] || die "pid $pid is not rotel-agent ($cmdline); not stopping it"
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 100); do
        alive "$pid" || { note "stopped rotel pid $pid"; return 0; }
        sleep 0.05
    done
    note "rotel pid $pid ignored SIGTERM for 5 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_free_ports() {
    local n="${1:-2}"
    [[ "$n" =~ ^[0-9]+$ ]] || die "usage: $0 free-ports [n]"
    "$PYTHON" - "$n" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
    s.close()
EOF
}

cmd_version() {
    echo "pinned: rotel==$ROTEL_PYPI_VERSION"
    local bin
    if bin="$(find_bin)"; then "$bin" --version; else echo "not installed in $VENV"; fi
}

sub="${1:-}"
[[ $# -gt 0 ]] && shift
case "$sub" in
    install) cmd_install "$@" ;;
    bin) cmd_bin "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    free-ports) cmd_free_ports "$@" ;;
    version) cmd_version "$@" ;;
    *) die "usage: $0 {install|bin|start <grpc_port> <http_port> <logfile> [-- args]|stop <pid>|free-ports [n]|version}" ;;
esac
