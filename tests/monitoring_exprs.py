"""Every PromQL expression of the chart's alert rules and Grafana dashboard, for tests.

The rules (``charts/sam-train/files/prometheus-rules.yaml``) write each alert as
``<value expression> <op> <number>``; :func:`split_threshold` takes it apart so a test can
check that the value expression alone returns data. Dashboard expressions use the Grafana
variables ``$namespace`` and ``$run`` only inside ``=~`` matchers; :func:`substitute` turns
them into ``.*`` so plain Prometheus evaluates them (``.*`` also matches an absent label, as
off Kubernetes where the scrape adds no ``namespace``).

Used by ``tests/unit/test_monitoring_files.py`` and the real-Prometheus exporter test::

    from tests.monitoring_exprs import all_exprs
    for source, expr in all_exprs():   # ("rule:SamTrainNoProgress", "max by (...) (...)")
        ...                            # GPU-only when "sam_gpu_" in expr; see DATA_NEEDS
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

FILES_DIR = Path(__file__).resolve().parent.parent / "charts" / "sam-train" / "files"
RULES_PATH = FILES_DIR / "prometheus-rules.yaml"
RULES_TEST_PATH = FILES_DIR / "prometheus-rules.test.yaml"
DASHBOARD_PATH = FILES_DIR / "grafana-dashboard.json"

#: Grafana variables the dashboard's expressions may use, and what plain Prometheus gets.
#: Grafana's built-in ``$__range`` (the dashboard's time range) becomes a fixed window.
DASHBOARD_VARIABLES = {"$namespace": ".*", "$run": ".*", "$__range": "1h"}

#: Non-GPU expressions that return data only under a condition a short CPU run may not meet
#: (GPU-only ones are those that mention ``sam_gpu_``): source -> what they need.
DATA_NEEDS = {
    "rule:SamTrainThroughputDrop": "samples older than 15m (its baseline is [1h] offset 15m)",
    "dashboard:MFU/A": "a known peak: metrics.peak_tflops > 0 off GPU",
    "dashboard:Eval mIoU/A": "an eval during the run (eval.shards set, eval.every <= max_iters)",
}

# `<value> <op> <number>` at the very end; DOTALL because folded YAML may keep newlines.
_THRESHOLD_RE = re.compile(r"^(?P<value>.*?\S)\s*(?P<op>==|!=|<=|>=|<|>)\s*"
                           r"(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$", re.DOTALL)
# Parts of PromQL that hold names which are not metric names.
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES_RE = re.compile(r"\{[^{}]*\}")
_RANGE_RE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT_RE = re.compile(r"(?<![\w.:])[a-zA-Z_:][\w:]*")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                       "offset", "and", "or", "unless", "inf", "nan"})


def load_rules() -> list[dict[str, Any]]:
    """Return every rule (alerting and recording) of the rules file, in file order."""
    doc = yaml.safe_load(RULES_PATH.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def split_threshold(expr: str) -> tuple[str, str, float]:
    """Split ``<value expression> <op> <number>`` into (value expression, op, number).

    Raises:
        ValueError: the expression does not end in a comparison with a plain number.
    """
    match = _THRESHOLD_RE.match(expr.strip())
    if match is None:
        raise ValueError(f"not of the form '<expr> <op> <number>': {expr!r}")
    return match["value"], match["op"], float(match["number"])


def substitute(expr: str) -> str:
    """Replace the dashboard's Grafana variables by what plain Prometheus can evaluate."""
    for variable, value in DASHBOARD_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def load_dashboard() -> dict[str, Any]:
    """Return the Grafana dashboard JSON model."""
    return json.loads(DASHBOARD_PATH.read_text())


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(``"<panel title>/<refId>"``, raw expr) for every panel target, rows' children included."""
    out = []
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))  # a collapsed row holds its panels
        for target in panel.get("targets", []):
            out.append((f"{panel['title']}/{target['refId']}", target["expr"]))
    return out


def all_exprs() -> list[tuple[str, str]]:
    """(source, expr) for every expression that plain Prometheus must evaluate.

    Alerts contribute their value expression (threshold stripped), recording rules their
    expr, dashboard targets their expr with variables substituted. Sources look like
    ``rule:SamTrainNoProgress`` and ``dashboard:Loss parts/A``.
    """
    out = []
    for rule in load_rules():
        if "alert" in rule:
            out.append((f"rule:{rule['alert']}", split_threshold(rule["expr"])[0]))
        else:
            out.append((f"rule:{rule['record']}", rule["expr"]))
    for source, expr in dashboard_targets(load_dashboard()):
        out.append((f"dashboard:{source}", substitute(expr)))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (function names, keywords, labels excluded)."""
    text = _STRING_RE.sub('""', expr)
    text = _BRACES_RE.sub(" ", text)
    text = _RANGE_RE.sub(" ", text)
    text = _LABEL_LIST_RE.sub(" ", text)
    names = set()
    for match in _IDENT_RE.finditer(text):
        rest = text[match.end():].lstrip()
        if match[0] in _KEYWORDS or rest.startswith("("):  # a function or aggregation call
            continue
        names.add(match[0])
    return names
