#!/usr/bin/env python3
"""Check collector/, the alert rules, the Grafana dashboard and docker-compose.yml against
what the looplag crate emits.

    PROMTOOL=... python3 scripts/check_collector_config.py [--require-promtool] [--self-test]

The names come from collector/series.txt, a table of the Prometheus series (with their labels
and label values) and of the span, event and attribute names the crate emits. It is generated
from the crate's instruments by the unit test at the end of src/telemetry.rs, which fails when
it is out of date (regenerate: LOOPLAG_BLESS=1 cargo test --lib telemetry). This script does
no OTel -> Prometheus translation of its own.

Checked:
  * names: every `tokio.*` / `tokio_*` token in collector/ and docker-compose.yml (comments
    included) is in the table; in PromQL (alerts, their unit tests' input series, dashboard
    queries) every label in a matcher or grouping is one the table gives that series (or any
    series, for groupings), `le` and `tokio_eventloop_stall_kind` values are ones the crate
    emits, and Grafana legends, field links and label_values() use known labels;
  * structure: pipelines use defined components, the tail sampling keeps the stall span and
    event, Prometheus scrapes the exporter's port, Grafana data-source uids exist, compose
    mounts exist, compose ports are bound to 127.0.0.1 and images are pinned;
  * with promtool ($PROMTOOL or on PATH): `check rules` and `test rules` of the alerts,
    `check config` of prometheus.yml, and a parse of every dashboard query.

--self-test then runs the same checks on copies of the files with one mistake each (a misspelt
metric, a label the crate does not emit, ...) and fails unless each copy is rejected.
Exit status 0 when everything holds, 1 with one line per problem otherwise. Needs PyYAML.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("check_collector_config: PyYAML is required (pip install pyyaml)")

ROOT = Path(__file__).resolve().parent.parent
TABLE = Path("collector") / "series.txt"

OTEL_TOKEN = re.compile(r"(?<![\w.])tokio\.[a-z_][a-z0-9_.]*")
PROM_TOKEN = re.compile(r"(?<![\w.])tokio_[a-z0-9_]+")
SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)?\s*\{([^{}]*)\}")
MATCHER = re.compile(r"""([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
GRAFANA_VAR = re.compile(r"\$\{?[a-zA-Z_]\w*(?::[a-z]+)?\}?")


class Table:
    """collector/series.txt."""

    def __init__(self, path: Path):
        self.bases: set[str] = set()
        self.series: dict[str, set[str]] = {}
        self.exporter_labels: set[str] = set()
        self.values: dict[str, list[str]] = {}
        self.otel: set[str] = set()  # metric, span, event and attribute names
        self.spans: set[str] = set()
        self.events: set[str] = set()
        for line in path.read_text().splitlines():
            kind, *rest = line.split() or ["#"]
            if kind.startswith("#"):
                continue
            if kind == "metric":
                self.otel.add(rest[0])
                self.bases.add(rest[-1])
            elif kind == "series":
                self.series[rest[0]] = set(rest[1:])
            elif kind == "exporter_labels":
                self.exporter_labels = set(rest)
            elif kind == "values":
                self.values[rest[0]] = rest[1:]
            elif kind in ("span", "event", "attribute"):
                self.otel.add(rest[0])
                {"span": self.spans, "event": self.events}.get(kind, set()).add(rest[0])
            else:
                raise ValueError(f"{path}: unknown line {line!r}")
        for labels in self.series.values():
            labels |= self.exporter_labels
        self.labels = set().union(*self.series.values())


class Checker:
    def __init__(self, root: Path, promtool: str | None, require_promtool: bool):
        self.root = root
        self.collector = root / "collector"
        self.promtool = promtool
        self.require_promtool = require_promtool
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.exprs: list[tuple[str, str]] = []  # (where, PromQL) of the dashboard

    def error(self, where: str, msg: str) -> None:
        line = f"{where}: {msg}"
        if line not in self.errors:
            self.errors.append(line)

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def load(self, path: Path):
        try:
            text = path.read_text()
            return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except FileNotFoundError:
            self.error(self.rel(path), "missing")
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            self.error(self.rel(path), f"cannot be parsed: {e}")
        return None

    # ---- names ---------------------------------------------------------------------
    def scan_tokens(self) -> None:
        """Every tokio.* / tokio_* token in collector/ and docker-compose.yml is in the table."""
        files = [p for p in sorted(self.collector.rglob("*")) if p.is_file() and p != self.root / TABLE]
        for path in files + [self.root / "docker-compose.yml"]:
            try:
                text = path.read_text()
            except (UnicodeDecodeError, FileNotFoundError):
                continue
            for tok in sorted(set(OTEL_TOKEN.findall(text))):
                if tok.rstrip(".") not in self.t.otel:
                    self.error(self.rel(path), f"{tok} is not a metric, span, event or attribute name in {TABLE}")
            for tok in sorted(set(PROM_TOKEN.findall(text))):
                if tok not in self.t.series and tok not in self.t.labels and tok not in self.t.bases:
                    self.error(self.rel(path), f"{tok} is not a Prometheus series or label in {TABLE}")

    def check_promql(self, where: str, expr: str) -> None:
        """Series, labels and label values of one PromQL expression, by the table."""
        for tok in sorted(set(PROM_TOKEN.findall(expr))):
            if tok not in self.t.series and tok not in self.t.labels:
                self.error(where, f"{tok} is neither a series nor a label in {TABLE}")
        for name, block in SELECTOR.findall(expr):
            allowed = self.t.series.get(name, self.t.labels)
            for label, op, quoted in MATCHER.findall(block):
                if label == "__name__":
                    continue
                if label not in allowed:
                    self.error(where, f"label {label} is not on {name or 'any series'} in {TABLE} "
                                      f"(it has: {', '.join(sorted(allowed))})")
                self.check_value(where, label, op, bytes(quoted[1:-1], "utf-8").decode("unicode_escape"))
        for group in GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                if label not in self.t.labels:
                    self.error(where, f"label {label} (in a grouping) is not on any series in {TABLE}")

    def check_value(self, where: str, label: str, op: str, value: str) -> None:
        allowed = self.t.values.get(label)
        if allowed is None or "$" in value:
            return
        if label == "le":  # Prometheus 3 stores le="1" as "1.0"
            allowed = allowed + [v + ".0" for v in allowed if re.fullmatch(r"\d+", v)]
        if op in ("=", "!="):
            ok = value in allowed
        else:
            try:
                ok = any(re.fullmatch(value, v) for v in allowed)
            except re.error as e:
                self.error(where, f"{label}{op}{value!r}: bad regex: {e}")
                return
        if not ok:
            self.error(where, f"{label}{op}\"{value}\" matches no value the crate emits ({' '.join(allowed)})")

    def check_labels(self, where: str, labels: list[str]) -> None:
        for label in labels:
            if label not in self.t.labels:
                self.error(where, f"label {label} is not on any series in {TABLE}")

    # ---- files ---------------------------------------------------------------------
    def check_compose(self) -> dict:
        path = self.root / "docker-compose.yml"
        where = self.rel(path)
        services = (self.load(path) or {}).get("services") or {}
        if not services:
            self.error(where, "no services")
        mounts: dict[str, set[str]] = {}
        for name, svc in services.items():
            sw = f"{where}: service {name}"
            image = str(svc.get("image") or "")
            tag = image.rpartition(":")[2] if ":" in image.split("/")[-1] else ""
            if "@sha256:" not in image and not re.fullmatch(r"v?\d+(\.\d+){1,3}([-.+][0-9A-Za-z.-]+)?", tag):
                self.error(sw, f"image {image!r} is not pinned to an exact version (x.y.z)")
            if svc.get("network_mode") == "host":
                self.error(sw, "network_mode: host publishes every port on all interfaces")
            for port in svc.get("ports") or []:
                ok = (port.get("host_ip") == "127.0.0.1" and "published" in port) if isinstance(port, dict) \
                    else re.fullmatch(r"127\.0\.0\.1:\d+(-\d+)?:\d+(-\d+)?(/(tcp|udp))?", str(port))
                if not ok:
                    self.error(sw, f"port {port!r} is not bound to 127.0.0.1 (write \"127.0.0.1:HOST:CONTAINER\")")
            targets = mounts.setdefault(name, set())
            for vol in svc.get("volumes") or []:
                if isinstance(vol, dict):
                    src, dst = str(vol.get("source", "")), str(vol.get("target", ""))
                else:
                    src, _, dst = str(vol).partition(":")
                    dst = dst.split(":")[0]
                source = (path.parent / src).resolve()
                if src.startswith((".", "/")) and not source.exists():
                    self.error(sw, f"volume source {src} does not exist")
                targets.add(dst)
                if source.is_dir():  # files inside a mounted folder
                    targets |= {str(Path(dst) / f.relative_to(source)) for f in source.rglob("*")}
            cmd = svc.get("command")
            for flag in re.findall(r"--config(?:\.file)?=(\S+)", " ".join(cmd) if isinstance(cmd, list) else str(cmd or "")):
                if flag not in targets:
                    self.error(sw, f"{flag} (from command) is not mounted")
        return mounts

    def check_collector_config(self) -> str | None:
        """Returns the prometheus exporter's port."""
        path = self.collector / "otel-collector.yaml"
        where = self.rel(path)
        cfg = self.load(path) or {}
        defined = {s: set(cfg.get(s) or {}) for s in ("receivers", "processors", "exporters", "extensions", "connectors")}
        service = cfg.get("service") or {}
        for ext in service.get("extensions") or []:
            if ext not in defined["extensions"]:
                self.error(where, f"service.extensions: {ext} is not defined")
        pipelines = service.get("pipelines") or {}
        for req in ("traces", "metrics"):
            if req not in pipelines:
                self.error(where, f"no {req} pipeline")
        for pname, p in pipelines.items():
            for role in ("receivers", "processors", "exporters"):
                for comp in p.get(role) or []:
                    if comp not in defined[role] | defined["connectors"]:
                        self.error(where, f"pipeline {pname}: {role[:-1]} {comp} is not defined")
        # Tail sampling keeps every trace with a stall span or a stall (victim) event.
        ts = (cfg.get("processors") or {}).get("tail_sampling") or {}
        if "tail_sampling" not in ((pipelines.get("traces") or {}).get("processors") or []):
            self.error(where, "no tail_sampling processor in the traces pipeline")
        kept = {"span": set(), "spanevent": set()}
        for policy in ts.get("policies") or []:
            for ctx, conds in (policy.get("ottl_condition") or {}).items():
                for cond in conds if isinstance(conds, list) else []:
                    kept.setdefault(ctx, set()).update(re.findall(r'\bname\s*==\s*"([^"]*)"', cond))
        for ctx, names in (("span", self.t.spans), ("spanevent", self.t.events)):
            for name in sorted(names - kept[ctx]):
                self.error(where, f'tail_sampling: no {ctx} condition name == "{name}"')
        prom = (cfg.get("exporters") or {}).get("prometheus")
        if prom is None:
            self.error(where, "no prometheus exporter")
            return None
        if prom.get("translation_strategy") not in (None, "UnderscoreEscapingWithSuffixes") \
                or prom.get("add_metric_suffixes") is False or prom.get("namespace"):
            self.error(where, f"prometheus exporter: translation settings change the names {TABLE} lists")
        m = re.search(r":(\d+)$", str(prom.get("endpoint", "")))
        return m.group(1) if m else None

    def check_prometheus(self, port: str | None, mounts: dict) -> None:
        path = self.collector / "prometheus.yml"
        where = self.rel(path)
        cfg = self.load(path) or {}
        rule_files = cfg.get("rule_files") or []
        if not any(Path(r).name == "alerts.yml" for r in rule_files):
            self.error(where, "rule_files does not load alerts.yml")
        for r in rule_files:
            if r not in mounts.get("prometheus", set()):
                self.error(where, f"rule file {r} is not mounted into the prometheus container")
        scraped = False
        for sc in cfg.get("scrape_configs") or []:
            for t in (t for st in sc.get("static_configs") or [] for t in st.get("targets") or []):
                host, _, tport = t.rpartition(":")
                if tport == port and host in mounts:
                    scraped = True
                    if not sc.get("honor_labels"):
                        self.error(where, f"scrape job {sc.get('job_name')}: honor_labels: true keeps the exporter's job/instance")
        if not scraped:
            self.error(where, f"no scrape target <compose service>:{port} (the collector's prometheus exporter)")

    def check_alerts(self) -> None:
        path = self.collector / "alerts.yml"
        cfg = self.load(path) or {}
        rules = [r for g in cfg.get("groups") or [] for r in g.get("rules") or []]
        if not rules:
            self.error(self.rel(path), "no rules")
        for r in rules:
            where = f"{self.rel(path)}: {r.get('alert') or r.get('record')}"
            self.check_promql(where, str(r.get("expr", "")))
            for text in (r.get("annotations") or {}).values():
                self.check_labels(where, re.findall(r"\$labels\.(\w+)", str(text)))
        tests = self.collector / "alerts.test.yml"
        for t in (self.load(tests) or {}).get("tests") or []:
            for s in t.get("input_series") or []:
                self.check_promql(f"{self.rel(tests)}: input series", str(s.get("series", "")))

    def check_grafana(self, mounts: dict) -> None:
        ds_path = self.collector / "grafana" / "provisioning" / "datasources" / "datasources.yml"
        sources = (self.load(ds_path) or {}).get("datasources") or []
        uids = {d.get("uid"): d.get("type") for d in sources}
        if not {"prometheus", "jaeger"} <= set(uids.values()):
            self.error(self.rel(ds_path), "needs a prometheus and a jaeger data source")
        for d in sources:
            host = re.sub(r"^\w+://", "", str(d.get("url", ""))).split(":")[0].split("/")[0]
            if host not in mounts:
                self.error(self.rel(ds_path), f"data source {d.get('name')}: host {host} is not a compose service")
        prov_path = self.collector / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
        for p in (self.load(prov_path) or {}).get("providers") or []:
            dpath = (p.get("options") or {}).get("path")
            if dpath not in mounts.get("grafana", set()):
                self.error(self.rel(prov_path), f"provider {p.get('name')}: {dpath} is not mounted into grafana")
        dashboards = sorted((self.collector / "grafana" / "dashboards").glob("*.json"))
        if not dashboards:
            self.error("collector/grafana/dashboards", "no dashboard JSON")
        for path in dashboards:
            self.check_dashboard(path, uids)

    def check_dashboard(self, path: Path, uids: dict) -> None:
        where = self.rel(path)
        dash = self.load(path) or {}
        text = json.dumps(dash)
        jaeger_ops = set(re.findall(r"operation(?:=|%22%3A%22)([\w.]+)", text))
        for v in (dash.get("templating") or {}).get("list") or []:
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            m = re.fullmatch(r"\s*label_values\((?:(.*),)?\s*(\w+)\s*\)\s*", str(q or ""))
            if v.get("type") == "query" and m:
                vw = f"{where}: variable {v.get('name')}"
                self.check_promql(vw, m.group(1) or "")
                self.check_labels(vw, [m.group(2)])
        stack = list(dash.get("panels") or [])
        while stack:
            p = stack.pop(0)
            stack.extend(p.get("panels") or [])
            pw = f"{where}: panel {p.get('title')!r}"
            for t in [p] + list(p.get("targets") or []):
                ds = t.get("datasource")
                uid = ds.get("uid") if isinstance(ds, dict) else ds
                if uid and uid not in uids and not str(uid).startswith("$"):
                    self.error(pw, f"data source uid {uid} is not provisioned")
                if t.get("operation"):
                    jaeger_ops.add(t["operation"])
                if t.get("expr"):
                    self.check_promql(pw, t["expr"])
                    self.exprs.append((pw, t["expr"]))
                    self.check_labels(pw, re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            self.check_labels(pw, re.findall(r"__field\.labels\.(\w+)", json.dumps(p.get("fieldConfig") or {})))
        for op in sorted(jaeger_ops - self.t.spans):
            self.error(where, f"Jaeger operation {op} is not a span name in {TABLE}")
        if not jaeger_ops & self.t.spans:
            self.error(where, f"no link or Jaeger query for the stall span ({', '.join(sorted(self.t.spans))})")

    # ---- promtool ------------------------------------------------------------------
    def run_promtool(self) -> None:
        if not self.promtool:
            msg = "promtool not found (set $PROMTOOL or put it on PATH): rules, rule tests and PromQL parsing not checked"
            if self.require_promtool:
                self.error("promtool", msg)
            else:
                print(f"WARNING: {msg}", file=sys.stderr)
            return

        def run(args: list[str], cwd: Path, what: str) -> None:
            r = subprocess.run([self.promtool, *args], cwd=cwd, capture_output=True, text=True)
            if r.returncode != 0:
                out = (r.stdout + r.stderr).strip().replace("\n", "\n    ")
                self.error(f"promtool {what}", f"failed:\n    {out}")
            else:
                self.notes.append(f"promtool {what}: ok")

        run(["check", "rules", "alerts.yml"], self.collector, "check rules alerts.yml")
        run(["test", "rules", "alerts.test.yml"], self.collector, "test rules alerts.test.yml")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = self.load(self.collector / "prometheus.yml") or {}
            cfg["rule_files"] = [str(self.collector / Path(r).name) for r in cfg.get("rule_files") or []]
            (Path(tmp) / "prometheus.yml").write_text(yaml.safe_dump(cfg))
            run(["check", "config", "prometheus.yml"], Path(tmp), "check config prometheus.yml")
            # Dashboard queries, with Grafana's variables filled in, as recording rules.
            rules = [{"record": f"dashboard:query_{i}",
                      "expr": GRAFANA_VAR.sub(lambda m: "5m" if "__" in m.group(0) else "x", e)}
                     for i, (_, e) in enumerate(self.exprs)]
            (Path(tmp) / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
            run(["check", "rules", "dashboard.yml"], Path(tmp), f"parse of {len(rules)} dashboard queries")

    def run(self) -> int:
        try:
            self.t = Table(self.root / TABLE)
        except (OSError, ValueError, IndexError) as e:
            self.error(str(TABLE), f"cannot be read: {e}")
            return 1
        mounts = self.check_compose()
        self.check_prometheus(self.check_collector_config(), mounts)
        self.check_alerts()
        self.check_grafana(mounts)
        self.scan_tokens()
        self.run_promtool()
        return 1 if self.errors else 0


# ---- self-test: one mistake per copy, each must be caught ------------------------------
MISTAKES = [
    # (file, text, replacement, expected in an error line)
    ("collector/alerts.yml", "rate(tokio_eventloop_delay_seconds_bucket[1m])",
     "rate(tokio_eventloop_delay_second_bucket[1m])", "tokio_eventloop_delay_second_bucket"),
    ("collector/alerts.yml", "sum by (job, instance, tokio_runtime_name, le)",
     "sum by (job, instance, tokio_runtime_name, code_function, le)", "label code_function"),
    ("collector/alerts.yml", "{{ $labels.tokio_runtime_name }} of {{ $labels.job }}: a stall",
     "{{ $labels.tokio_runtime_nam }} of {{ $labels.job }}: a stall", "tokio_runtime_nam"),
    ("collector/alerts.yml", '{le=~"1(\\\\.0)?"}', '{le="0.3"}', 'le="0.3"'),
    ("collector/alerts.test.yml", 'tokio_runtime_name="idle",le="0.0001"',
     'tokio_runtime_name="idle",tokio_eventloop_stall_kind="cpu",le="0.0001"',
     "label tokio_eventloop_stall_kind is not on tokio_eventloop_delay_seconds_bucket"),
    ("collector/grafana/dashboards/looplag.json", '"legendFormat": "{{tokio_eventloop_stall_kind}}"',
     '"legendFormat": "{{stall_kind}}"', "label stall_kind"),
    ("collector/otel-collector.yaml", "- 'name == \"tokio.eventloop.stall\"'",
     "- 'name == \"tokio.eventloop.stalled\"'", "tokio.eventloop.stalled"),
    ("docker-compose.yml", '"127.0.0.1:9090:9090"', '"9090:9090"', "not bound to 127.0.0.1"),
    ("docker-compose.yml", "prom/prometheus:v3.5.0", "prom/prometheus:latest", "not pinned"),
]
PROMTOOL_MISTAKES = [
    ("collector/alerts.test.yml", "p50 = 175ms over 1m", "p50 = 170ms over 1m", "promtool test rules"),
    ("collector/grafana/dashboards/looplag.json", "histogram_quantile(0.5, sum by",
     "histogram_quantile(0.5, sum by by", "dashboard queries"),
]


def self_test(promtool: str | None) -> int:
    failures = []
    mistakes = MISTAKES + (PROMTOOL_MISTAKES if promtool else [])
    with tempfile.TemporaryDirectory() as tmp:
        for i, mistake in enumerate([None] + mistakes):
            copy = Path(tmp) / str(i)
            shutil.copytree(ROOT / "collector", copy / "collector")
            shutil.copy(ROOT / "docker-compose.yml", copy / "docker-compose.yml")
            if mistake:
                rel, old, new, expect = mistake
                text = (copy / rel).read_text()
                if old not in text:
                    failures.append(f"{rel}: the self-test's text {old!r} is gone; update MISTAKES")
                    continue
                (copy / rel).write_text(text.replace(old, new, 1))
            checker = Checker(copy, promtool, require_promtool=False)
            checker.run()
            if mistake is None:
                failures += [f"unchanged copy: {e}" for e in checker.errors]
            elif not any(expect in e for e in checker.errors):
                failures.append(f"{rel}: {old!r} -> {new!r} was not reported (expected {expect!r}); "
                                f"got: {checker.errors or 'no error'}")
            else:
                first = next(e for e in checker.errors if expect in e).splitlines()[0]
                print(f"  self-test: {rel}: {new!r} -> {first}")
    for f in failures:
        print(f"ERROR: self-test: {f}", file=sys.stderr)
    print(f"check_collector_config: self-test {'FAILED' if failures else 'OK'}: "
          f"{len(mistakes)} broken copies{'' if promtool else ' (promtool cases skipped: no promtool)'}",
          file=sys.stderr if failures else sys.stdout)
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--require-promtool", action="store_true",
                    help="fail instead of warning when promtool is not available")
    ap.add_argument("--self-test", action="store_true",
                    help="after the check, show that broken copies of the files are rejected")
    args = ap.parse_args()
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    checker = Checker(ROOT, promtool, args.require_promtool)
    status = checker.run()
    for note in checker.notes:
        print(f"  {note}")
    for e in checker.errors:
        print(f"ERROR: {e}", file=sys.stderr)
    if status:
        print(f"check_collector_config: FAILED: {len(checker.errors)} problem(s)", file=sys.stderr)
    else:
        print(f"check_collector_config: OK: collector/, docker-compose.yml and {len(checker.exprs)} dashboard "
              f"queries use only what {TABLE} lists")
    if args.self_test:
        status |= self_test(promtool)
    return status


if __name__ == "__main__":
    sys.exit(main())
