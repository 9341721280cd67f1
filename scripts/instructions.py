#!/usr/bin/env python3
"""Instruction counts of looplag's hot path under callgrind, and the CI guard on them.

    scripts/instructions.py                      table of every row (stable and unstable builds)
    scripts/instructions.py --check              ... and compare with the committed baseline
    scripts/instructions.py --write-baseline     ... and replace the committed baseline
    scripts/instructions.py --self-test          unit test of the comparison, then a run with an
                                                 injected cost that the guard must reject

Each (row, variant) of benches/instructions.rs runs in its own process under
`valgrind --tool=callgrind --collect-atstart=no --toggle-collect=*instructions::measured*`,
with N and 2N iterations; (I(2N) - I(N)) / (N x operations per iteration) is the count per
operation, with setup, warm-up and teardown cancelled out. "added" is on - off: what looplag
adds in the same setup. Every process runs under `env -i` with a fixed PATH.

The guard (`--check`) fails when a row's added count is more than 2 % over the baseline's (at
least 1 instruction per operation, so that rows near zero do not fail on one instruction).
It enforces only when the toolchain and the machine as the program sees it match the
baseline: rustc, glibc and valgrind versions, and the CPU that valgrind presents to the
program (CPUID under valgrind is one of a few canned models chosen by the host's instruction
set, the same on Intel Xeon and AMD EPYC hosts with AVX2). When one of those differs, counts
move for reasons that are not looplag's, so the guard prints both tables and the
difference and passes with a warning; `--write-baseline` on the new setup re-arms it.
"""

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "benches", "instructions-baseline.json")
TOLERANCE = 0.02  # 2 %
FLOOR = 1.0  # instructions per operation
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}
# Keys that must match the baseline for the guard to enforce.
COMPARABLE = ("rustc", "glibc", "valgrind", "guest_cpu")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def build(unstable, target_dir):
    """Builds benches/instructions.rs (release profile) and returns the executable's path."""
    env = dict(os.environ)
    if unstable:
        env["RUSTFLAGS"] = (env.get("RUSTFLAGS", "") + " --cfg tokio_unstable").strip()
        env["CARGO_TARGET_DIR"] = os.path.join(target_dir, "unstable")
    else:
        env["CARGO_TARGET_DIR"] = target_dir
    out = subprocess.run(
        ["cargo", "bench", "--no-run", "--quiet", "--bench", "instructions",
         "--message-format=json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, check=True, text=True,
    ).stdout
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
                and msg["target"]["name"] == "instructions":
            return msg["executable"]
    raise SystemExit("error: cargo did not report the instructions executable")


def callgrind(exe, args):
    """Runs `exe args` under callgrind; returns (instructions collected, calls of measured)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={out_file}",
               "--collect-atstart=no", "--toggle-collect=*instructions::measured*", exe] + args
        proc = subprocess.run(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
        with open(out_file) as f:
            text = f.read()
    foreign = sorted(path for path in set(re.findall(r"^f[lie]=\(\d+\) (/\S+)", text, re.M))
                     if not path.startswith(ROOT + "/") and not path.startswith(("/rustc/", "/rust/"))
                     and "/.cargo/registry/" not in path and not path.startswith("/usr/"))
    if foreign:
        raise SystemExit(f"error: {args}: the binary has code from another source tree "
                         f"(a target directory shared with another checkout?): {foreign[:3]}")
    totals = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if not totals:
        raise SystemExit(f"error: no totals in callgrind output of {args}")
    ids = set(re.findall(r"\((\d+)\) instructions::measured\b", text))
    calls = 0
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"cfn=\((\d+)\)", line)
        if m and m.group(1) in ids and i + 1 < len(lines):
            c = re.match(r"calls=(\d+)", lines[i + 1])
            calls += int(c.group(1)) if c else 0
    return int(totals.group(1)), calls


def rows_of(exe):
    """(name, operations per iteration, builds) for each row the binary knows."""
    out = subprocess.run([exe, "--list"], env=ENV, stdout=subprocess.PIPE, check=True,
                         text=True).stdout
    rows = []
    for line in out.splitlines():
        name, ops, builds, what = line.split("\t")
        rows.append((name, int(ops), builds, what))
    return rows


def per_op(counts, row, variant, ops, n):
    """Instructions per operation of one (row, variant), from I(N) and I(2N)."""
    fixed = 2 * counts[0] - counts[1]
    if fixed < 0:
        raise SystemExit(f"error: {row} {variant}: I(N)={counts[0]}, I(2N)={counts[1]}: "
                         "the cost per iteration is not constant")
    return (counts[1] - counts[0]) / (n * ops)


def count(exe, row, variant, iterations, extra):
    """Instructions collected in one process, checking that `measured` ran exactly once."""
    # Fixed-width arguments: the same argv size in every run.
    args = [row, variant, f"{iterations:08d}", f"{extra:08d}"]
    total, calls = callgrind(exe, args)
    if calls != 1:
        raise SystemExit(f"error: {row} {variant}: callgrind saw {calls} calls of "
                         "`instructions::measured`, expected exactly 1 (merged or inlined?)")
    return total


def environment(exe):
    def first_line(cmd):
        try:
            return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True).stdout.splitlines()[0].strip()
        except (OSError, IndexError):
            return "unknown"
    host = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    host = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    guest = subprocess.run(["valgrind", "--tool=callgrind", "--quiet",
                            "--callgrind-out-file=/dev/null", exe, "--cpuid"],
                           env=ENV, stdout=subprocess.PIPE, text=True).stdout.strip()
    return {
        "host_cpu": host,
        "guest_cpu": guest,
        "rustc": first_line(["rustc", "--version"]),
        "glibc": first_line(["getconf", "GNU_LIBC_VERSION"]),
        "valgrind": first_line(["valgrind", "--version"]),
    }


def measure(args):
    target_dir = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    builds = [("stable", False)] + ([] if args.stable_only else [("unstable", True)])
    inject = dict(item.split("=") for item in args.inject)
    result = {"rows": {}}
    started = time.monotonic()
    for build_name, unstable in builds:
        log(f"==> building benches/instructions.rs ({build_name})")
        exe = build(unstable, target_dir)
        if build_name == "stable":
            result["env"] = environment(exe)
        rows = [(name, ops, what) for name, ops, only, what in rows_of(exe)
                # The span and park rows are measured in the stable build; the poll hooks
                # exist only under tokio_unstable.
                if (only == "unstable") == unstable
                and (not args.rows or name in args.rows.split(","))]
        # Every process is deterministic on its own: running them side by side changes no
        # count, only the wall time.
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {
                (name, variant, k): pool.submit(
                    count, exe, name, variant, k * args.n,
                    int(inject.get(name, 0)) if variant == "on" else 0)
                for name, _, _ in rows for variant in ("off", "on") for k in (1, 2)
            }
            counts = {key: future.result() for key, future in futures.items()}
        for name, ops, what in rows:
            off, on = (per_op([counts[(name, v, 1)], counts[(name, v, 2)]], name, v, ops, args.n)
                       for v in ("off", "on"))
            result["rows"][name] = {"what": what, "build": build_name,
                                    "off": round(off, 1), "on": round(on, 1),
                                    "added": round(on - off, 1)}
            log(f"    {name}: off {off:.1f}, on {on:.1f}, added {on - off:+.1f}")
    sanity(result["rows"])
    return {"env": result["env"], "iterations": [args.n, 2 * args.n],
            "seconds": round(time.monotonic() - started, 1), "rows": result["rows"]}


def sanity(rows):
    """The poll-boundary rows must run looplag's slot code: they cost clearly more than the
    plain thread's enter+exit, which finds no slot. Otherwise the slot was not registered."""
    plain = rows.get("plain.enter_exit")
    if not plain:
        return
    for name in ("ct.boundary", "mt.boundary"):
        row = rows.get(name)
        if row and row["added"] < plain["added"] + 10:
            raise SystemExit(f"error: {name} adds {row['added']} instructions, the plain thread "
                             f"{plain['added']}: the worker's slot was not registered")


def table(result, baseline=None):
    lines = ["| row | off | on | added | added % |" + (" baseline added |" if baseline else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if baseline else "")]
    for name, row in result["rows"].items():
        pct = 100.0 * row["added"] / row["off"] if row["off"] else 0.0
        line = (f"| {name}: {row['what']} | {row['off']:.1f} | {row['on']:.1f} | "
                f"{row['added']:+.1f} | {pct:+.1f} % |")
        if baseline:
            base = baseline["rows"].get(name)
            line += f" {base['added']:+.1f} |" if base else " (new) |"
        lines.append(line)
    return "\n".join(lines)


def compare(result, baseline):
    """(failures, notes): a failure is a row more than 2 % (at least 1 instruction) over the
    baseline's added count. Rows missing from either side are notes, not failures."""
    failures, notes = [], []
    for name, base in baseline["rows"].items():
        row = result["rows"].get(name)
        if row is None:
            notes.append(f"{name}: in the baseline, not measured in this run")
            continue
        limit = base["added"] + max(abs(base["added"]) * TOLERANCE, FLOOR)
        if row["added"] > limit:
            failures.append(f"{name}: looplag adds {row['added']:+.1f} instructions per "
                            f"operation, baseline {base['added']:+.1f} (limit {limit:+.1f}, "
                            f"+{TOLERANCE:.0%})")
        elif row["added"] < base["added"] - max(abs(base["added"]) * TOLERANCE, FLOOR):
            notes.append(f"{name}: {row['added']:+.1f}, below the baseline's "
                         f"{base['added']:+.1f}: update the baseline to keep the gain")
    for name in result["rows"]:
        if name not in baseline["rows"]:
            notes.append(f"{name}: not in the baseline")
    return failures, notes


def mismatches(result, baseline):
    return [f"{key}: baseline {baseline['env'].get(key)!r}, here {result['env'].get(key)!r}"
            for key in COMPARABLE if baseline["env"].get(key) != result["env"].get(key)]


def check(result, path):
    with open(path) as f:
        baseline = json.load(f)
    print(table(result, baseline))
    failures, notes = compare(result, baseline)
    for note in notes:
        print(f"note: {note}")
    differ = mismatches(result, baseline)
    if differ:
        print("warning: not comparable with the baseline, so not enforced:")
        for d in differ:
            print(f"    {d}")
        for failure in failures:
            print(f"warning (not enforced): {failure}")
        print("warning: refresh it on this setup with scripts/instructions.py --write-baseline")
        return 0
    if failures:
        for failure in failures:
            print(f"FAIL: {failure}")
        print("A change that must cost more updates benches/instructions-baseline.json in the "
              "same commit (scripts/instructions.py --write-baseline) and says why.")
        return 1
    compared = sum(1 for name in baseline["rows"] if name in result["rows"])
    print(f"instruction counts within {TOLERANCE:.0%} of the baseline ({compared} rows)")
    return 0


def self_test(args):
    """The comparison rejects a row 2 % over, accepts one at the limit, and only warns on
    another setup; then a real run with an injected cost in the on variant must fail."""
    env = {k: "x" for k in COMPARABLE}
    base = {"env": env, "rows": {"a": {"added": 100.0}, "b": {"added": 0.0}}}
    ok = {"env": env, "rows": {"a": {"added": 102.0}, "b": {"added": 1.0}}}
    bad = {"env": env, "rows": {"a": {"added": 102.1}, "b": {"added": 0.0}}}
    near_zero = {"env": env, "rows": {"a": {"added": 100.0}, "b": {"added": 1.5}}}
    assert compare(ok, base)[0] == [], compare(ok, base)
    assert len(compare(bad, base)[0]) == 1 and "a:" in compare(bad, base)[0][0]
    assert len(compare(near_zero, base)[0]) == 1
    other = dict(bad, env=dict(env, rustc="y"))
    assert mismatches(other, base) and not mismatches(bad, base)
    log("self-test: comparison rejects +2.1 %, accepts +2.0 %, warns only on another setup")
    # End to end: inject one trip of a loop into one row's "on" variant (about 4
    # instructions per enter+exit, +3 %), compare with a baseline made from a run without it.
    row = "ct.boundary"
    clean = measure(argparse.Namespace(n=args.n, rows=row, inject=[], stable_only=True,
                                       jobs=args.jobs))
    injected = measure(argparse.Namespace(n=args.n, rows=row, inject=[f"{row}=1"],
                                          stable_only=True, jobs=args.jobs))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(clean, f)
    log("self-test: a FAIL line for the injected cost is expected next")
    try:
        status = check(injected, f.name)
    finally:
        os.unlink(f.name)
    if status == 0:
        raise SystemExit("self-test: the guard accepted an injected cost")
    log(f"self-test: the guard rejects the injected cost (added {clean['rows'][row]['added']} "
        f"-> {injected['rows'][row]['added']})")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the baseline")
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--write-baseline", action="store_true")
    parser.add_argument("--self-test", action="store_true")
    parser.add_argument("--stable-only", action="store_true",
                        help="skip the --cfg tokio_unstable build (and the poll-hook row)")
    parser.add_argument("--rows", help="comma-separated rows (default: all)")
    parser.add_argument("--inject", action="append", default=[], metavar="ROW=K",
                        help="make ROW's on variant run K extra loop trips per iteration")
    parser.add_argument("-n", type=int, default=1000, help="iterations N (N and 2N are run)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="valgrind processes run side by side (default: one per CPU)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    if args.self_test:
        self_test(args)
        return 0
    result = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    env = result["env"]
    print(f"\nCPU {env['host_cpu']} (valgrind presents: {env['guest_cpu']}); {env['rustc']}; "
          f"glibc {env['glibc']}; {env['valgrind']}; {result['seconds']} s\n")
    status = 0
    if args.check:
        status = check(result, args.baseline)
    else:
        print(table(result))
    if args.write_baseline:
        with open(args.baseline, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        log(f"wrote {args.baseline}")
    return status


if __name__ == "__main__":
    sys.exit(main())
