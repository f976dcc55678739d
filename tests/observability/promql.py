"""What the operator exports, what the README documents, and what PromQL expressions use.

The exported metrics come from the operator's own definitions (``connbudget.report.metrics``):
each metric is given one child and collected, so every sample name (``_total``, ``_bucket``,
``_count``, ...) is known with its labels. Expressions are read at the level the checks need
(metric names, label matchers, grouping clauses, legend and annotation templates), not parsed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from connbudget.report.metrics import Metrics

README = Path(__file__).resolve().parents[2] / "README.md"
METRIC = re.compile(r"\bconnbudget_[a-z0-9_]+\b")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
SELECTOR = re.compile(r"\{([^{}]*)\}")
GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
TEMPLATE_LABEL = re.compile(r"\$labels\.(\w+)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# A README token is a metric when it has labels or ends in a unit or suffix of Prometheus'
# naming conventions; that leaves out the monitoring role `connbudget_monitor`.
METRIC_SUFFIXES = ("_total", "_seconds", "_ratio", "_connections", "_per_second", "_bytes")
DOCUMENTED = re.compile(r"`(connbudget_[a-z0-9_]+)(?:\{([^}`]*)\})?`")
# Labels the operator puts on every budget's series.
BUDGET_LABELS = frozenset({"namespace", "budget"})
# Labels a scrape adds to every series, and the metric name's own.
SCRAPE_LABELS = frozenset({"job", "instance", "__name__"})


def exported_samples() -> dict[str, frozenset[str]]:
    """Every sample name the operator exports, with its labels (``le`` for buckets)."""
    metrics = Metrics()
    # Registered by the operator's runtime once its Kubernetes client exists.
    metrics.count_throttling(lambda: 0.0)
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*("x" for _ in metric._labelnames))
    return {
        sample.name: frozenset(sample.labels)
        for family in metrics.registry.collect()
        for sample in family.samples
    }


def documented_metrics(text: str | None = None) -> dict[str, frozenset[str]]:
    """The metrics the README names in backquotes, with the labels it gives them."""
    text = README.read_text() if text is None else text
    found: dict[str, set[str]] = {}
    for name, labels in DOCUMENTED.findall(text):
        if labels or name.endswith(METRIC_SUFFIXES):
            given = {part.strip() for part in labels.split(",") if part.strip()}
            found.setdefault(name, set()).update(given)
    return {k: frozenset(v) for k, v in found.items()}


def sample_names(name: str, exported: Mapping[str, frozenset[str]]) -> list[str]:
    """The sample names a metric's name stands for (a histogram's ``_count``, ``_sum`` and
    ``_bucket``; a counter documented without ``_total``); empty if none is exported."""
    candidates = [name, f"{name}_total", f"{name}_count", f"{name}_sum", f"{name}_bucket"]
    return [c for c in candidates if c in exported]


def metrics_of(expr: str) -> set[str]:
    """The metric names an expression reads."""
    return set(METRIC.findall(expr))


def labels_of(expr: str) -> set[str]:
    """The label names an expression matches on or groups by."""
    found: set[str] = set()
    for selector in SELECTOR.findall(expr):
        found.update(MATCHER.findall(selector))
    for group in GROUPING.findall(expr):
        found.update(part.strip() for part in group.split(",") if part.strip())
    return found


def result_labels(expr: str, exported: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """The labels an expression's result can carry: the outermost ``by (...)`` when it starts
    with an aggregation, else every label of the metrics it reads (less ``le``)."""
    outer = re.match(r"\s*\w+\s+by\s*\(([^()]*)\)", expr)
    if outer:
        return frozenset(p.strip() for p in outer.group(1).split(",") if p.strip())
    return frozenset().union(*(exported[m] for m in metrics_of(expr) if m in exported)) - {"le"}


def template_labels(texts: Iterable[str]) -> set[str]:
    """The ``$labels.X`` an alert's annotations use."""
    return {label for t in texts for label in TEMPLATE_LABEL.findall(t)}


def legend_labels(legend: str) -> set[str]:
    """The labels a Grafana legend format shows (``{{owner}}``)."""
    return set(LEGEND_LABEL.findall(legend))


def problems(expr: str, exported: Mapping[str, frozenset[str]]) -> list[str]:
    """What an expression reads that the operator does not export: unknown metric names, and
    labels that none of the metrics it reads carries (nor a scrape adds)."""
    found = [f"{m} is not exported" for m in sorted(metrics_of(expr)) if m not in exported]
    known = SCRAPE_LABELS.union(*(exported.get(m, frozenset()) for m in metrics_of(expr)))
    found += [
        f"label {label!r} is on none of {sorted(metrics_of(expr))}"
        for label in sorted(labels_of(expr) - known)
    ]
    return found
