#!/usr/bin/env python3
"""Check collector/, the alert rules, the Grafana dashboard and docker-compose.yml against
the telemetry names the looplag crate emits.

    python3 scripts/check_collector_config.py [--telemetry src/telemetry.rs] [--require-promtool]

Single source of the crate's names: the string literals matching "tokio\\.[a-z._]+" in
src/telemetry.rs (e.g. `pub(crate) const DELAY: &str = "tokio.eventloop.delay";`). When that
file does not exist yet, an embedded copy of the crate's names (FALLBACK_NAMES) is used and a
warning is printed. Where telemetry.rs also shows how an instrument is built
(`.f64_histogram(DELAY) ... .with_unit("s")`), its kind and unit are checked too: they decide
the Prometheus name.

Checked:
  * every metric, label, label value (tokio_eventloop_stall_kind, le) and span name used in
    the collector config, the Prometheus config, alerts.yml, alerts.test.yml, the Grafana
    provisioning and dashboard is one the crate emits after the OTel -> Prometheus translation
    of the collector's prometheus exporter (see translate_metric());
  * every `tokio.*` / `tokio_*` token anywhere in those files (comments included) is known;
  * the pieces fit together: pipelines use defined components, Prometheus scrapes the
    exporter's port, Grafana data-source uids exist, compose mounts exist and land where the
    configs expect them;
  * docker-compose.yml: every published port is bound to 127.0.0.1, every image is pinned to
    an exact version (no `latest`, no bare name);
  * if promtool is available ($PROMTOOL or on PATH): `promtool check rules`,
    `promtool test rules collector/alerts.test.yml`, `promtool check config`, and a parse of
    every dashboard query.

Exit status 0 when everything matches, 1 with one line per problem otherwise.
Needs PyYAML (`pip install pyyaml`).
"""

from __future__ import annotations

import argparse
import difflib
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
COLLECTOR = ROOT / "collector"

# --------------------------------------------------------------------------------------
# The telemetry contract (README.md's table). The names themselves come from src/telemetry.rs
# when it exists; this table only says what each metric is (kind, unit, attributes), which
# the translation needs. FALLBACK_NAMES is used only while src/telemetry.rs does not exist.
# --------------------------------------------------------------------------------------
METRICS = {
    # name: (kind, unit, attributes carried by its data points)
    "tokio.eventloop.delay": ("histogram", "s", ("tokio.runtime.name",)),
    "tokio.eventloop.stalls": ("counter", "{stall}", ("tokio.runtime.name", "tokio.eventloop.stall.kind")),
    "tokio.eventloop.stall.duration": ("histogram", "s", ("tokio.runtime.name", "tokio.eventloop.stall.kind")),
}
STALL_SPAN = "tokio.eventloop.stall"          # span name and victim event name
STALL_KIND_ATTR = "tokio.eventloop.stall.kind"
STALL_KIND_VALUES = ("cpu", "blocked", "mixed")
# Names that came with a later step (the stall diagnosis adds tokio.eventloop.stall.kind to the
# stall metrics): collector/ already uses them (a panel that stays empty, a label
# that is absent); while the crate does not define them yet, that is a warning, not an error.
PLANNED_NAMES = ("tokio.eventloop.stall.kind",)
DEFAULT_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FALLBACK_NAMES = (
    "tokio.eventloop.delay", "tokio.eventloop.stalls", "tokio.eventloop.stall.duration",
    "tokio.runtime.name", "tokio.eventloop.stall.kind", "tokio.eventloop.stall",
    "tokio.task.id", "tokio.eventloop.stall.cpu_time", "tokio.eventloop.stall.syscall",
    "tokio.eventloop.stall.trace_id", "tokio.eventloop.stall.span_id",
)
# Labels the collector's prometheus exporter adds to every series (job/instance from the
# resource's service.name/service.instance.id, scope labels), and le on histogram buckets.
EXPORTER_LABELS = {"job", "instance", "otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}

# --------------------------------------------------------------------------------------
# OTel -> Prometheus translation, as done by the collector-contrib prometheus exporter with
# its default translation_strategy (UnderscoreEscapingWithSuffixes): it calls
# github.com/prometheus/otlptranslator MetricNamer{WithMetricSuffixes: true,
# UTF8Allowed: false} (metric_namer.go normalizeName, unit_namer.go buildUnitSuffixes):
#   * the name is split on every character outside [a-zA-Z0-9:] and joined with "_";
#   * the unit is split at "/" into main and per unit; a part containing "{" or "}" (an
#     annotation such as {stall}) adds nothing; known UCUM units map to words (s -> seconds,
#     ms -> milliseconds, By -> bytes, 1 -> nothing, ...), others are used as they are;
#     the per unit becomes "per_<word>"; a suffix already among the name tokens is not added;
#   * monotonic sums (counters) get "_total" (an existing "total" token is moved to the end);
#   * gauges with unit "1" get "_ratio";
#   * a classic histogram is exposed as <name>_bucket{le=...}, <name>_sum, <name>_count.
# Attribute keys become labels by replacing every character outside [a-zA-Z0-9_] with "_"
# (otlptranslator LabelNamer; a leading digit gets a "key_" prefix, a single leading "_" a
# "key" prefix).
# --------------------------------------------------------------------------------------
UNIT_WORDS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes",
    "MiBy": "mebibytes", "GiBy": "gibibytes", "TiBy": "tebibytes", "KBy": "kilobytes",
    "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes", "m": "meters", "V": "volts",
    "A": "amperes", "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius", "Hz": "hertz",
    "1": "", "%": "percent",
}
PER_UNIT_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}


def _clean_unit(word: str) -> str:
    word = re.sub(r"[^a-zA-Z0-9:]", "_", word)
    word = re.sub(r"__+", "_", word)
    return word.lstrip("_")


def translate_metric(name: str, kind: str, unit: str) -> str:
    tokens = [t for t in re.split(r"[^a-zA-Z0-9:]+", name) if t]
    parts = unit.split("/", 1)
    main = parts[0].strip()
    main_suffix = UNIT_WORDS.get(main, main) if main and not re.search(r"[{}]", main) else ""
    per_suffix = ""
    if len(parts) > 1 and parts[1].strip() and not re.search(r"[{}]", parts[1]):
        per_suffix = "per_" + PER_UNIT_WORDS.get(parts[1].strip(), parts[1].strip())
    main_suffix, per_suffix = _clean_unit(main_suffix), _clean_unit(per_suffix)
    if main_suffix in tokens:
        main_suffix = ""
    if per_suffix == "per_":
        per_suffix = ""
    else:
        per_suffix = per_suffix.rstrip("_")
        if per_suffix in tokens:
            per_suffix = ""
    if per_suffix:
        main_suffix = main_suffix.rstrip("_")
    tokens += [s for s in (main_suffix, per_suffix) if s]
    if kind == "counter":
        tokens = [t for t in tokens if t != "total"] + ["total"]
    if kind == "gauge" and unit == "1":
        tokens = [t for t in tokens if t != "ratio"] + ["ratio"]
    out = "_".join(tokens)
    return "_" + out if out[:1].isdigit() else out


def translate_label(key: str) -> str:
    label = re.sub(r"[^a-zA-Z0-9_]", "_", key)
    if label[:1].isdigit():
        label = "key_" + label
    elif label.startswith("_") and not label.startswith("__"):
        label = "key" + label
    return label


def series_names(name: str, kind: str, unit: str) -> list[str]:
    base = translate_metric(name, kind, unit)
    if kind == "histogram":
        return [base + "_bucket", base + "_sum", base + "_count"]
    return [base]


def format_bound(b: float) -> list[str]:
    """le values as Prometheus 2 (Go strconv 'g'-like, as exposed) and 3 (float form) store them."""
    text = repr(float(b))
    short = text[:-2] if text.endswith(".0") else text
    return sorted({short, text if "." in text or "e" in text else text + ".0"})


# --------------------------------------------------------------------------------------
class Checker:
    def __init__(self, telemetry: Path, require_promtool: bool):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.telemetry = telemetry
        self.require_promtool = require_promtool
        self.exprs_checked = 0
        self.files_checked: set[str] = set()

    # ---- reporting -------------------------------------------------------------------
    def error(self, where: str, msg: str) -> None:
        line = f"{where}: {msg}"
        if line not in self.errors:
            self.errors.append(line)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(ROOT))
        except ValueError:
            return str(path)

    def load_yaml(self, path: Path):
        self.files_checked.add(self.rel(path))
        try:
            return yaml.safe_load(path.read_text())
        except FileNotFoundError:
            self.error(self.rel(path), "missing")
        except yaml.YAMLError as e:
            self.error(self.rel(path), f"invalid YAML: {e}")
        return None

    def load_json(self, path: Path):
        self.files_checked.add(self.rel(path))
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            self.error(self.rel(path), "missing")
        except json.JSONDecodeError as e:
            self.error(self.rel(path), f"invalid JSON: {e}")
        return None

    # ---- the crate's names -----------------------------------------------------------
    def load_names(self) -> None:
        self.metrics = dict(METRICS)
        self.bounds = DEFAULT_BOUNDS
        if self.telemetry.is_file():
            src = self.telemetry.read_text()
            names = set(re.findall(r'"(tokio\.[a-z._]+)"', src))
            self.names_source = self.rel(self.telemetry)
            if not names:
                self.error(self.names_source, 'no string literal matching "tokio\\.[a-z._]+" found')
            self.inspect_instruments(src)
        else:
            names = set(FALLBACK_NAMES)
            self.names_source = "embedded fallback list"
            self.warn(f"{self.rel(self.telemetry)} does not exist (yet): using the embedded copy of the "
                      f"crate's names; the check is only as current as this script")
        for planned in PLANNED_NAMES:
            if planned not in names:
                self.warn(f"{planned} is not defined in {self.names_source} yet (added with the stall "
                          f"diagnosis); collector/ uses it as label {translate_label(planned)}, which stays absent until then")
                names.add(planned)
        self.names = names
        for metric, (_kind, _unit, attrs) in self.metrics.items():
            if metric not in names:
                self.error(self.names_source, f"metric {metric} is used by collector/ (alerts, dashboard) "
                                              f"but the crate does not define it")
            for attr in attrs:
                if attr not in names:
                    self.error(self.names_source, f"attribute {attr} (label {translate_label(attr)}) is used "
                                                  f"by collector/ but the crate does not define it")
        if STALL_SPAN not in names:
            self.error(self.names_source, f"span/event name {STALL_SPAN} is used by the collector's tail "
                                          f"sampling and the dashboard but the crate does not define it")
        # Allowed Prometheus series -> (metric, kind, labels)
        self.series: dict[str, tuple[str, str, set[str]]] = {}
        for metric, (kind, unit, attrs) in self.metrics.items():
            labels = {translate_label(a) for a in attrs} | EXPORTER_LABELS
            for s in series_names(metric, kind, unit):
                self.series[s] = (metric, kind, labels | ({"le"} if s.endswith("_bucket") and kind == "histogram" else set()))
        self.all_labels = set().union(*(v[2] for v in self.series.values()))
        self.kind_label = translate_label(STALL_KIND_ATTR)
        self.le_values = {v for b in self.bounds for v in format_bound(b)} | {"+Inf"}

    def inspect_instruments(self, src: str) -> None:
        """Best effort: find `.<t>_<kind>(NAME)...with_unit(UNIT)` in telemetry.rs and compare."""
        consts = dict(re.findall(r'const\s+([A-Z][A-Z0-9_]*)\s*:\s*&(?:\'static\s+)?str\s*=\s*"([^"]*)"', src))

        def resolve(tok: str) -> str | None:
            tok = tok.strip()
            if tok.startswith('"'):
                return tok.strip('"')
            return consts.get(tok.split("::")[-1])

        kinds = {"histogram": "histogram", "counter": "counter", "up_down_counter": "updowncounter",
                 "gauge": "gauge", "observable_counter": "counter", "observable_gauge": "gauge",
                 "observable_up_down_counter": "updowncounter"}
        found = {}
        for m in re.finditer(r'\.(?:f64|u64|i64)_(observable_up_down_counter|observable_counter|observable_gauge|'
                             r'up_down_counter|histogram|counter|gauge)\(\s*([A-Za-z_][\w:]*|"[^"]*")\s*\)', src):
            name = resolve(m.group(2))
            if not name or not name.startswith("tokio."):
                continue
            chain = src[m.end(): m.end() + 600]
            chain = re.split(r"\.build\(\)|;", chain, maxsplit=1)[0]
            u = re.search(r'\.with_unit\(\s*([A-Za-z_][\w:]*|"[^"]*")\s*\)', chain)
            unit = resolve(u.group(1)) if u else ""
            found[name] = (kinds[m.group(1)], unit)
        for name, (kind, unit) in found.items():
            if name not in self.metrics:
                self.warn(f"{self.rel(self.telemetry)}: instrument {name} ({kind}, unit {unit!r}) is not "
                          f"covered by collector/ (no alert or dashboard panel uses it)")
                continue
            want_kind, want_unit, attrs = self.metrics[name]
            if kind != want_kind or unit != want_unit:
                self.error(self.rel(self.telemetry),
                           f"instrument {name} is built as {kind} with unit {unit!r}, collector/ expects "
                           f"{want_kind} with unit {want_unit!r} (Prometheus name would be "
                           f"{translate_metric(name, kind, unit)!r}, not {translate_metric(name, want_kind, want_unit)!r})")
        if found:
            self.notes.append(f"instrument kinds/units read from {self.rel(self.telemetry)}: "
                              + ", ".join(f"{n}={k}/{u or '-'}" for n, (k, u) in sorted(found.items())))
        # Explicit bucket boundaries, when they are spelled out as a float array.
        arr = re.search(r"\[\s*(0\.0001\s*,[\d.,\s_]*)\]", src)
        if arr:
            try:
                bounds = tuple(float(x.replace("_", "")) for x in arr.group(1).split(",") if x.strip())
                self.bounds = bounds
            except ValueError:
                pass

    # ---- PromQL ----------------------------------------------------------------------
    TOKEN = re.compile(r"""
        (?P<ws>\s+) | (?P<comment>\#[^\n]*) |
        (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`) |
        (?P<range>\[[^\]]*\]) |
        (?P<num>0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|s|m|h|d|w|y)?|\.\d+) |
        (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*) |
        (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},@])
    """, re.X)
    AGGREGATORS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                   "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
    KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan", "start", "end", "atan2"}
    GRAFANA_VARS = re.compile(r"\$__(rate_interval|interval|range|interval_ms|range_s|range_ms)\b|\$\{__[a-z_]+\}")

    def lex(self, expr: str):
        pos, out = 0, []
        while pos < len(expr):
            m = self.TOKEN.match(expr, pos)
            if not m:
                raise ValueError(f"cannot parse at {expr[pos:pos + 20]!r}")
            pos = m.end()
            kind = m.lastgroup
            if kind in ("ws", "comment"):
                continue
            out.append((kind, m.group(kind)))
        return out

    @staticmethod
    def unquote(s: str) -> str:
        if s[0] == "`":
            return s[1:-1]
        return bytes(s[1:-1], "utf-8").decode("unicode_escape")

    def check_promql(self, where: str, expr: str, grafana: bool = False) -> set[str]:
        """Check one PromQL expression; returns the labels its metrics may carry."""
        self.exprs_checked += 1
        text = self.GRAFANA_VARS.sub("5m", expr) if grafana else expr
        try:
            toks = self.lex(text)
        except ValueError as e:
            self.error(where, f"PromQL {e}: {expr!r}")
            return set()
        metrics, labels_used, matchers = [], [], []
        i = 0
        while i < len(toks):
            kind, val = toks[i]
            nxt = toks[i + 1] if i + 1 < len(toks) else (None, None)
            if kind == "ident" and val in ("by", "without", "on", "ignoring", "group_left", "group_right"):
                if nxt == ("op", "("):
                    j = i + 2
                    while j < len(toks) and toks[j] != ("op", ")"):
                        if toks[j][0] == "ident":
                            labels_used.append(toks[j][1])
                        j += 1
                    i = j + 1
                    continue
            elif kind == "ident" and val not in self.KEYWORDS:
                is_call = nxt == ("op", "(") or (val in self.AGGREGATORS and nxt[1] in ("by", "without"))
                if not is_call:
                    metrics.append(val)
            elif (kind, val) == ("op", "{"):
                j = i + 1
                while j < len(toks) and toks[j] != ("op", "}"):
                    if toks[j][0] == "ident" and j + 2 < len(toks) and toks[j + 1][0] == "op" \
                            and toks[j + 1][1] in ("=", "!=", "=~", "!~") and toks[j + 2][0] == "str":
                        matchers.append((toks[j][1], toks[j + 1][1], self.unquote(toks[j + 2][1])))
                        j += 3
                        continue
                    j += 1
                i = j + 1
                continue
            i += 1

        allowed_labels: set[str] = set()
        unknown = False
        for m in metrics:
            if m not in self.series:
                hint = ""
                close = difflib.get_close_matches(m, list(self.series), n=2, cutoff=0.8)
                if close:
                    hint = f" (did you mean {' or '.join(close)}?)"
                self.error(where, f"metric {m} is not emitted by the crate after translation{hint}")
                unknown = True
            else:
                allowed_labels |= self.series[m][2]
        if not metrics or unknown:  # nothing (certain) to hold the labels against
            allowed_labels = set(self.all_labels)
        for name, op, value in matchers:
            if name == "__name__":
                continue
            labels_used.append(name)
            self.check_label_value(where, name, op, value)
        for label in labels_used:
            if label not in allowed_labels:
                self.error(where, f"label {label} is not carried by {', '.join(sorted(set(metrics))) or 'any looplag metric'}"
                                  f" (allowed: {', '.join(sorted(allowed_labels))})")
        return allowed_labels

    def check_label_value(self, where: str, label: str, op: str, value: str) -> None:
        if "$" in value:  # Grafana variable
            return
        if label == self.kind_label:
            alts = value.split("|") if op in ("=~", "!~") else [value]
            for alt in alts:
                if re.fullmatch(r"[a-z_]+", alt) and alt not in STALL_KIND_VALUES:
                    self.error(where, f"{label}=\"{alt}\": the crate emits only {', '.join(STALL_KIND_VALUES)}")
        elif label == "le":
            if op in ("=", "!="):
                if value not in self.le_values:
                    self.error(where, f'le="{value}" is not a bucket bound (bounds: {", ".join(f"{b:g}" for b in self.bounds)}, +Inf)')
            else:
                try:
                    rx = re.compile(value)
                except re.error as e:
                    self.error(where, f"le=~{value!r}: bad regex: {e}")
                    return
                hits = [v for v in self.le_values if rx.fullmatch(v)]
                if not hits:
                    self.error(where, f"le=~\"{value}\" matches no bucket bound")
                else:
                    bounds_hit = {float(v.replace("+Inf", "inf")) for v in hits}
                    for b in bounds_hit:
                        forms = format_bound(b) if b != float("inf") else ["+Inf"]
                        missing = [f for f in forms if not rx.fullmatch(f)]
                        if missing:
                            self.warn(f"{where}: le=~\"{value}\" matches bound {b:g} only as "
                                      f"{', '.join(f for f in forms if f not in missing)}, not as {', '.join(missing)} "
                                      f"(Prometheus 3 stores le=\"1.0\", Prometheus 2 le=\"1\")")

    def check_template_labels(self, where: str, text: str, allowed: set[str]) -> None:
        for label in re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", text):
            if label not in allowed:
                self.error(where, f"template uses $labels.{label}, which the alert's series do not carry")

    # ---- files -----------------------------------------------------------------------
    def check_collector_config(self) -> dict:
        path = COLLECTOR / "otel-collector.yaml"
        where = self.rel(path)
        cfg = self.load_yaml(path) or {}
        info = {}
        sections = {s: (cfg.get(s) or {}) for s in ("receivers", "processors", "exporters", "extensions", "connectors")}
        service = cfg.get("service") or {}
        for ext in service.get("extensions") or []:
            if ext not in sections["extensions"]:
                self.error(where, f"service.extensions: {ext} is not defined")
        pipelines = service.get("pipelines") or {}
        for req in ("traces", "metrics"):
            if req not in pipelines:
                self.error(where, f"no {req} pipeline")
        for pname, p in pipelines.items():
            for role, section in (("receivers", "receivers"), ("processors", "processors"), ("exporters", "exporters")):
                for comp in p.get(role) or []:
                    if comp not in sections[section] and comp not in sections["connectors"]:
                        self.error(where, f"pipeline {pname}: {role[:-1]} {comp} is not defined")
            procs = p.get("processors") or []
            if procs and not procs[0].startswith("memory_limiter"):
                self.error(where, f"pipeline {pname}: memory_limiter must be the first processor")
        otlp = (sections["receivers"].get("otlp") or {}).get("protocols") or {}
        for proto, port in (("grpc", "4317"), ("http", "4318")):
            ep = (otlp.get(proto) or {}).get("endpoint", "")
            if not ep.endswith(":" + port):
                self.error(where, f"otlp {proto} receiver endpoint {ep!r} should listen on port {port}")
        # tail sampling: a policy keeping stall spans and stall events.
        ts = sections["processors"].get("tail_sampling")
        if not ts:
            self.error(where, "no tail_sampling processor")
        else:
            traces_procs = (pipelines.get("traces") or {}).get("processors") or []
            if "tail_sampling" not in traces_procs:
                self.error(where, "tail_sampling is not in the traces pipeline")
            policies = ts.get("policies") or []
            ottl = [p for p in policies if p.get("type") == "ottl_condition"]
            if not ottl:
                self.error(where, "tail_sampling: no ottl_condition policy")
            span_ok = event_ok = False
            for p in ottl:
                conds = p.get("ottl_condition") or {}
                for ctx in ("span", "spanevent"):
                    for cond in conds.get(ctx) or []:
                        for lit in re.findall(r'"((?:[^"\\]|\\.)*)"', cond):
                            if lit.startswith("tokio") and lit not in self.names:
                                self.error(where, f"OTTL {ctx} condition {cond!r}: {lit} is not emitted by the crate")
                        if re.search(r'\bname\s*==\s*"' + re.escape(STALL_SPAN) + '"', cond):
                            if ctx == "span":
                                span_ok = True
                            else:
                                event_ok = True
            if not span_ok:
                self.error(where, f'tail_sampling: no span condition name == "{STALL_SPAN}"')
            if not event_ok:
                self.error(where, f'tail_sampling: no spanevent condition name == "{STALL_SPAN}"')
            prob = [p for p in policies if p.get("type") == "probabilistic"]
            if not prob:
                self.error(where, "tail_sampling: no probabilistic policy for the other traces")
        prom = sections["exporters"].get("prometheus")
        if prom is None:
            self.error(where, "no prometheus exporter")
        else:
            strategy = prom.get("translation_strategy")
            if strategy not in (None, "UnderscoreEscapingWithSuffixes") or prom.get("add_metric_suffixes") is False:
                self.error(where, f"prometheus exporter translation ({strategy or 'add_metric_suffixes: false'}) "
                                  f"changes the metric names this check and the rules assume")
            if prom.get("namespace"):
                self.error(where, f"prometheus exporter namespace {prom['namespace']!r} would prefix every metric name")
            m = re.search(r":(\d+)$", str(prom.get("endpoint", "")))
            info["prometheus_port"] = m.group(1) if m else None
        exporters = sections["exporters"]
        jaeger = [k for k, v in exporters.items() if k.split("/")[0] in ("otlp", "otlp_grpc") and "jaeger" in str((v or {}).get("endpoint", ""))]
        if not jaeger:
            self.error(where, "no OTLP exporter to jaeger")
        return info

    def check_prometheus(self, collector_info: dict, compose: dict) -> None:
        path = COLLECTOR / "prometheus.yml"
        where = self.rel(path)
        cfg = self.load_yaml(path) or {}
        rule_files = cfg.get("rule_files") or []
        if not any(Path(r).name == "alerts.yml" for r in rule_files):
            self.error(where, "rule_files does not load alerts.yml")
        mounts = compose.get("mount_targets", {}).get("prometheus", {})
        for r in rule_files:
            if mounts and r not in mounts:
                self.error(where, f"rule file {r} is not mounted into the prometheus container")
        targets = [t for sc in cfg.get("scrape_configs") or [] for st in sc.get("static_configs") or [] for t in st.get("targets") or []]
        port = collector_info.get("prometheus_port")
        services = set(compose.get("services", {}))
        hit = False
        for sc in cfg.get("scrape_configs") or []:
            for st in sc.get("static_configs") or []:
                for t in st.get("targets") or []:
                    host, _, tport = t.rpartition(":")
                    if tport == port and (not services or host in services):
                        hit = True
                        if not sc.get("honor_labels"):
                            self.error(where, f"scrape job {sc.get('job_name')}: set honor_labels: true so the exporter's job/instance labels survive")
        if not hit:
            self.error(where, f"no scrape target <collector service>:{port} (the prometheus exporter's port); targets: {targets}")

    def check_alerts(self) -> None:
        path = COLLECTOR / "alerts.yml"
        where = self.rel(path)
        cfg = self.load_yaml(path) or {}
        rules = [r for g in cfg.get("groups") or [] for r in g.get("rules") or []]
        if not rules:
            self.error(where, "no rules")
        names = {r.get("alert") for r in rules}
        for r in rules:
            rw = f"{where}: {r.get('alert') or r.get('record')}"
            allowed = self.check_promql(rw, r.get("expr", ""))
            for k in ("summary", "description"):
                self.check_template_labels(rw, (r.get("annotations") or {}).get(k, ""), allowed)
        expected = {"TokioEventLoopDelayP50High", "TokioEventLoopDelayP99High", "TokioEventLoopStallOver1s"}
        for n in sorted(expected - names):
            self.error(where, f"alert {n} is missing")

    def check_alert_tests(self) -> None:
        path = COLLECTOR / "alerts.test.yml"
        if not path.exists():
            return
        where = self.rel(path)
        cfg = self.load_yaml(path) or {}
        for t in cfg.get("tests") or []:
            for s in t.get("input_series") or []:
                self.check_promql(f"{where}: input series", s.get("series", ""))

    def check_grafana(self, compose: dict) -> None:
        ds_path = COLLECTOR / "grafana" / "provisioning" / "datasources" / "datasources.yml"
        ds = self.load_yaml(ds_path) or {}
        uids = {d.get("uid"): d.get("type") for d in ds.get("datasources") or []}
        if "prometheus" not in uids.values() or "jaeger" not in uids.values():
            self.error(self.rel(ds_path), "needs a prometheus and a jaeger data source")
        for d in ds.get("datasources") or []:
            url = str(d.get("url", ""))
            host = re.sub(r"^\w+://", "", url).split(":")[0].split("/")[0]
            if compose.get("services") and host not in compose["services"]:
                self.error(self.rel(ds_path), f"data source {d.get('name')}: host {host} is not a compose service")
        prov_path = COLLECTOR / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
        prov = self.load_yaml(prov_path) or {}
        grafana_mounts = compose.get("mount_targets", {}).get("grafana", {})
        for p in prov.get("providers") or []:
            dpath = (p.get("options") or {}).get("path")
            if grafana_mounts and dpath not in grafana_mounts:
                self.error(self.rel(prov_path), f"provider {p.get('name')}: {dpath} is not mounted into the grafana container")
        dash_dir = COLLECTOR / "grafana" / "dashboards"
        dashboards = sorted(dash_dir.glob("*.json"))
        if not dashboards:
            self.error(self.rel(dash_dir), "no dashboard JSON")
        for path in dashboards:
            self.check_dashboard(path, uids)

    def check_dashboard(self, path: Path, uids: dict) -> None:
        where = self.rel(path)
        dash = self.load_json(path)
        if not dash:
            return

        def ds_uid(ds):
            return ds.get("uid") if isinstance(ds, dict) else ds

        def panels(ps):
            for p in ps or []:
                yield p
                yield from panels(p.get("panels"))

        seen_jaeger_link = False
        text_blob = json.dumps(dash)
        if re.search(r"/search\?[^\"]*operation=" + re.escape(STALL_SPAN), text_blob) or \
                re.search(r"operation%22%3A%22" + re.escape(STALL_SPAN), text_blob):
            seen_jaeger_link = True
        for v in (dash.get("templating") or {}).get("list") or []:
            if v.get("type") != "query":
                continue
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            vw = f"{where}: variable {v.get('name')}"
            m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q or "")
            if m:
                allowed = self.check_promql(vw, m.group(1), grafana=True)
                if m.group(2) not in allowed:
                    self.error(vw, f"label_values(..., {m.group(2)}): label not carried by the series")
            elif q:
                self.check_promql(vw, q, grafana=True)
        for p in panels(dash.get("panels")):
            pw = f"{where}: panel {p.get('title')!r}"
            panel_uid = ds_uid(p.get("datasource"))
            if panel_uid and panel_uid not in uids and not str(panel_uid).startswith("$"):
                self.error(pw, f"data source uid {panel_uid} is not provisioned")
            allowed_all: set[str] = set()
            for t in p.get("targets") or []:
                uid = ds_uid(t.get("datasource")) or panel_uid
                if uid and uid not in uids and not str(uid).startswith("$"):
                    self.error(pw, f"target data source uid {uid} is not provisioned")
                dstype = uids.get(uid)
                if "expr" in t:
                    if dstype not in (None, "prometheus"):
                        self.error(pw, f"PromQL target on a {dstype} data source")
                    allowed = self.check_promql(pw, t["expr"], grafana=True)
                    allowed_all |= allowed
                    for label in re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", t.get("legendFormat", "")):
                        if label not in allowed:
                            self.error(pw, f"legendFormat uses {{{{{label}}}}}, not a label of the queried series")
                if dstype == "jaeger":
                    op = t.get("operation")
                    if op and op not in self.names:
                        self.error(pw, f"Jaeger operation {op} is not a span name the crate emits")
                    if op == STALL_SPAN:
                        seen_jaeger_link = True
            for label in re.findall(r"__field\.labels\.([a-zA-Z_][a-zA-Z0-9_]*)", json.dumps(p.get("fieldConfig") or {})):
                if label not in allowed_all:
                    self.error(pw, f"${{__field.labels.{label}}} is not a label of the queried series")
        if not seen_jaeger_link:
            self.error(where, f"no link or Jaeger query for spans named {STALL_SPAN}")

    def check_compose(self) -> dict:
        path = ROOT / "docker-compose.yml"
        where = self.rel(path)
        cfg = self.load_yaml(path) or {}
        services = cfg.get("services") or {}
        info = {"services": services, "mount_targets": {}}
        if not services:
            self.error(where, "no services")
        for name, svc in services.items():
            sw = f"{where}: service {name}"
            image = svc.get("image")
            if not image:
                self.error(sw, "no image (build: is not allowed here; pin an image)")
            else:
                m = re.fullmatch(r"(?P<repo>[^@:]+(?::\d+/[^@:]+)?)(?::(?P<tag>[^@]+))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?", image)
                tag = m.group("tag") if m else None
                digest = m.group("digest") if m else None
                if not m or (not tag and not digest):
                    self.error(sw, f"image {image!r} is not pinned (add an exact version tag)")
                elif tag and (tag == "latest" or "latest" in tag or not re.search(r"\d", tag) or "${" in tag):
                    self.error(sw, f"image {image!r}: tag {tag!r} is not an exact version")
                elif tag and not re.fullmatch(r"v?\d+(\.\d+){1,3}([-.+][0-9A-Za-z.-]+)?", tag) and not digest:
                    self.error(sw, f"image {image!r}: tag {tag!r} does not look like an exact version (x.y.z)")
            if svc.get("network_mode") == "host":
                self.error(sw, "network_mode: host publishes every port on all interfaces")
            for port in svc.get("ports") or []:
                if isinstance(port, dict):
                    if port.get("host_ip") != "127.0.0.1":
                        self.error(sw, f"port {port}: host_ip must be 127.0.0.1")
                    if "published" not in port:
                        self.error(sw, f"port {port}: no published port (Docker would pick one on all interfaces)")
                else:
                    p = str(port)
                    if not re.fullmatch(r"127\.0\.0\.1:\d+(-\d+)?:\d+(-\d+)?(/(tcp|udp))?", p):
                        self.error(sw, f"port {p!r} is not bound to 127.0.0.1 (write \"127.0.0.1:HOST:CONTAINER\")")
            targets = {}
            for vol in svc.get("volumes") or []:
                if isinstance(vol, dict):
                    src, dst = vol.get("source", ""), vol.get("target", "")
                else:
                    parts = str(vol).split(":")
                    src, dst = (parts[0], parts[1]) if len(parts) >= 2 else ("", parts[0])
                if src.startswith(".") or src.startswith("/"):
                    if not (path.parent / src).resolve().exists():
                        self.error(sw, f"volume source {src} does not exist")
                targets[dst] = src
            # Files mounted into a directory target count as that directory's children.
            expanded = dict(targets)
            for dst, src in targets.items():
                sp = (path.parent / src).resolve() if src else None
                if sp and sp.is_dir():
                    for f in sp.rglob("*"):
                        expanded[str(Path(dst) / f.relative_to(sp))] = str(f)
            info["mount_targets"][name] = expanded
            cmd = svc.get("command")
            cmd_text = " ".join(cmd) if isinstance(cmd, list) else str(cmd or "")
            for flag in re.findall(r"--config(?:\.file)?=(\S+)", cmd_text):
                if flag not in expanded:
                    self.error(sw, f"{flag} (from command) is not mounted")
        return info

    def scan_tokens(self) -> None:
        """Every tokio.* / tokio_* token in collector/ and docker-compose.yml must be known."""
        files = [p for p in COLLECTOR.rglob("*") if p.is_file() and "testdata" not in p.relative_to(COLLECTOR).parts]
        files.append(ROOT / "docker-compose.yml")
        for path in files:
            if path.suffix not in (".yml", ".yaml", ".json", ".md", ".txt", ".rules"):
                continue
            text = path.read_text()
            self.files_checked.add(self.rel(path))
            for tok in set(re.findall(r"(?<![\w.])tokio\.[a-z_][a-z0-9_.]*", text)):
                tok = tok.rstrip(".")
                if tok not in self.names:
                    self.error(self.rel(path), f"{tok} is not a name the crate emits")
            # Histogram base names are allowed in prose (the native-histogram name when users
            # switch to exponential aggregation); PromQL is held to the classic series above.
            bases = {translate_metric(n, k, u) for n, (k, u, _a) in self.metrics.items()}
            for tok in set(re.findall(r"(?<![\w.])tokio_[a-z0-9_]+", text)):
                if tok not in self.series and tok not in self.all_labels and tok not in bases:
                    self.error(self.rel(path), f"{tok} is not a Prometheus series or label the crate's telemetry translates to")

    # ---- promtool --------------------------------------------------------------------
    def run_promtool(self, dashboard_exprs: list[tuple[str, str]]) -> None:
        promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
        if not promtool:
            msg = "promtool not found (set $PROMTOOL or put it on PATH): alert rule unit tests and PromQL parsing skipped"
            if self.require_promtool:
                self.error("promtool", msg)
            else:
                self.warn(msg)
            return

        def run(args, cwd, what):
            r = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True)
            if r.returncode != 0:
                out = (r.stdout + r.stderr).strip().replace("\n", "\n    ")
                self.error(f"promtool {what}", f"failed:\n    {out}")
            else:
                self.notes.append(f"promtool {what}: ok")

        run(["check", "rules", "alerts.yml"], COLLECTOR, "check rules alerts.yml")
        if (COLLECTOR / "alerts.test.yml").exists():
            run(["test", "rules", "alerts.test.yml"], COLLECTOR, "test rules alerts.test.yml")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = yaml.safe_load((COLLECTOR / "prometheus.yml").read_text())
            cfg["rule_files"] = [str(COLLECTOR / Path(r).name) for r in cfg.get("rule_files") or []]
            (Path(tmp) / "prometheus.yml").write_text(yaml.safe_dump(cfg))
            run(["check", "config", "prometheus.yml"], tmp, "check config prometheus.yml")
            rules = {"groups": [{"name": "dashboard", "rules": [
                {"record": f"dashboard:query_{i}", "expr": self.grafana_to_promql(e)} for i, (_, e) in enumerate(dashboard_exprs)]}]}
            (Path(tmp) / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
            run(["check", "rules", "dashboard_rules.yml"], tmp, f"parse of {len(dashboard_exprs)} dashboard queries")

    def grafana_to_promql(self, expr: str) -> str:
        expr = self.GRAFANA_VARS.sub("5m", expr)
        return re.sub(r"\$\{?[a-zA-Z_][a-zA-Z0-9_]*(:[a-z]+)?\}?", "x", expr)

    def dashboard_exprs(self) -> list[tuple[str, str]]:
        out = []
        for path in sorted((COLLECTOR / "grafana" / "dashboards").glob("*.json")):
            try:
                dash = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            stack = list(dash.get("panels") or [])
            while stack:
                p = stack.pop()
                stack.extend(p.get("panels") or [])
                for t in p.get("targets") or []:
                    if t.get("expr"):
                        out.append((p.get("title", ""), t["expr"]))
        return out

    # ---- main ------------------------------------------------------------------------
    def run(self) -> int:
        self.load_names()
        compose = self.check_compose()
        collector_info = self.check_collector_config()
        self.check_prometheus(collector_info, compose)
        self.check_alerts()
        self.check_alert_tests()
        self.check_grafana(compose)
        self.scan_tokens()
        self.run_promtool(self.dashboard_exprs())

        print(f"check_collector_config: crate names from {self.names_source}: {len(self.names)} names")
        print("  Prometheus series: " + ", ".join(sorted(self.series)))
        print("  labels: " + ", ".join(sorted(self.all_labels)))
        for n in self.notes:
            print(f"  {n}")
        for w in self.warnings:
            print(f"WARNING: {w}", file=sys.stderr)
        if self.errors:
            for e in self.errors:
                print(f"ERROR: {e}", file=sys.stderr)
            print(f"check_collector_config: FAILED: {len(self.errors)} problem(s) in {len(self.files_checked)} files "
                  f"({self.exprs_checked} PromQL expressions)", file=sys.stderr)
            return 1
        print(f"check_collector_config: OK: {len(self.files_checked)} files, {self.exprs_checked} PromQL expressions "
              f"match the crate's telemetry")
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--telemetry", type=Path, default=ROOT / "src" / "telemetry.rs",
                    help="Rust source holding the telemetry name consts (default: src/telemetry.rs)")
    ap.add_argument("--require-promtool", action="store_true",
                    help="fail instead of warning when promtool is not available")
    args = ap.parse_args()
    return Checker(args.telemetry.resolve(), args.require_promtool).run()


if __name__ == "__main__":
    sys.exit(main())
