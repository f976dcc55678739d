"""The operator's metrics, the chart's alerts and its dashboard, against a real Prometheus.

Debian's Prometheus scrapes the operator every second through a leak episode on the sandbox (a
leaking app and a steady one under one budget, and a second budget whose Secret is missing, so
probes fail) and evaluates the chart's alert rules every second. The test checks that every
metric the README documents is there with its documented labels, that the leak alert fires for
the leaking workload only and resolves once the leak stops, that every rule evaluates without
error, and that every dashboard panel's query, as Grafana would send it, returns data.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from e2e.conftest import Budgets, Operator
from observability.promql import BUDGET_LABELS, documented_metrics, exported_samples, sample_names
from sandbox.core import Sandbox
from sandbox.fixtures import STEADY_IMAGE, Workloads
from sandbox.prometheus import (
    Prometheus,
    Target,
    alert_rules,
    chart_rule_groups,
    load_dashboard,
    panel_queries,
    render_dashboard,
    running,
    substitute,
    variable_queries,
    with_for,
    write_rules,
)

pytestmark = pytest.mark.sandbox

LEAK_ALERT = "ConnectionBudgetLeakDetected"
# The chart waits 2 minutes before a leak alert fires. Here it waits 5 s, so the episode can be
# short: what is tested is that the expression selects the leaking workload on live data, and
# that the alert fires and resolves; the `for:` itself is promtool's to test (rules_test.yaml).
LEAK_FOR = "5s"
# Grafana's $__rate_interval is max(4 x the scrape interval, the step + the scrape interval): 4 s
# for a 1 s scrape; a little more here, so a rate spans a few of the operator's 1 s polls.
RATE_INTERVAL = "10s"
SHOP = {"tier": "shop"}


@pytest.fixture
def prometheus(sandbox: Sandbox, operator: Operator, tmp_path: Path) -> Iterator[Prometheus]:
    """Prometheus scraping ``operator`` every second, with the chart's rules (the leak alert's
    ``for:`` shortened to ``LEAK_FOR``)."""
    groups = chart_rule_groups(sandbox.bin_dir / "helm")
    (leak,) = (r for r in alert_rules(groups) if r["alert"] == LEAK_ALERT)
    assert leak["for"] == "2m"  # what the comment on LEAK_FOR says
    rules = write_rules(tmp_path / "rules.yaml", with_for(groups, LEAK_ALERT, LEAK_FOR))
    target = Target(address=f"127.0.0.1:{operator.metrics_port}")
    with running(tmp_path / "prometheus", [target], tag=sandbox.tag, rule_files=[rules]) as prom:
        yield prom


def firing(prom: Prometheus, name: str) -> list[dict[str, Any]]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]


def finite(result: list[dict[str, Any]]) -> int:
    """How many samples of a range query's result are numbers (not NaN)."""
    return sum(1 for s in result for _, v in s["values"] if not math.isnan(float(v)))


def scraped(prom: Prometheus, selector: str, since: float) -> list[dict[str, str]]:
    return prom.series(selector, since, time.time())


def test_metrics_alerts_and_dashboard_on_a_live_leak(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    prometheus: Prometheus,
    tmp_path: Path,
) -> None:
    prom = prometheus
    started = time.time()
    prom.wait(prom.targets_up, timeout=20, what="the operator scraped")
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    workloads.deploy(
        namespace,
        "steady",
        image=STEADY_IMAGE,
        env={"POOL_SIZE": "2", "QUERY_INTERVAL": "0.5"},
        labels=SHOP,
    )
    workloads.deploy(namespace, "leaky", env={"LEAK_RATE": "3"}, labels=SHOP)
    budgets.create(
        "shop",
        {
            "database": {"secretRef": {"name": "pg-monitor"}},
            "budget": {"maxConnections": 60},
            "selector": {"matchLabels": SHOP},
            "pollSeconds": 1,
        },
    )
    # A budget whose Secret is missing: its probes fail, which is what the error series show.
    budgets.create(
        "unprobed",
        {
            "database": {"secretRef": {"name": "no-such-secret"}},
            "budget": {"maxConnections": 10},
            "selector": {"matchLabels": {"tier": "none"}},
            "pollSeconds": 1,
        },
    )

    # The leak alert fires for the leaking workload, and for nothing else.
    alerts = prom.wait(
        lambda: firing(prom, LEAK_ALERT), timeout=90, interval=1, what=f"{LEAK_ALERT} firing"
    )
    assert [a["labels"] for a in alerts] == [
        {
            "alertname": LEAK_ALERT,
            "severity": "warning",
            "namespace": namespace,
            "budget": "shop",
            "owner": "Deployment/leaky",
            "job": "connbudget",
            "instance": f"127.0.0.1:{operator.metrics_port}",
        }
    ]
    fired = time.time()
    (alert,) = alerts
    assert alert["annotations"]["summary"] == (
        f"Deployment/leaky leaks PostgreSQL connections (ConnectionBudget {namespace}/shop)"
    )
    assert f"kubectl connbudget leaks -n {namespace}" in alert["annotations"]["description"]
    # Let the operator terminate a few of the leak's abandoned connections before it stops.
    prom.wait(
        lambda: prom.query(
            f'connbudget_terminated_connections_total{{namespace="{namespace}", budget="shop"}} > 0'
        ),
        timeout=60,
        what="terminations counted",
    )
    # The budget without a Secret has its probe alert pending (it waits 5 minutes), and no
    # other alert is pending or firing.
    others = [a for a in prom.alerts() if a["labels"]["alertname"] != LEAK_ALERT]
    assert [(a["labels"]["alertname"], a["state"]) for a in others] == [
        ("ConnectionBudgetProbeFailing", "pending")
    ], others
    assert others[0]["labels"]["budget"] == "unprobed"
    assert others[0]["labels"]["reason"] == "SecretMissing"

    # Every metric the README documents, with the labels it documents and the budget's own.
    exported = exported_samples()
    for name, labels in documented_metrics().items():
        samples = sample_names(name, exported)
        assert samples, f"the README documents {name}, which the operator does not export"
        for sample in samples:
            # A budget's series (operator-wide ones carry no namespace) of this test's budgets.
            of_budget = exported[sample] >= BUDGET_LABELS
            selector = f'{sample}{{namespace="{namespace}"}}' if of_budget else sample
            series = prom.wait(
                functools.partial(scraped, prom, selector, started),
                timeout=30,
                what=f"{sample} scraped",
            )
            for s in series:
                assert labels <= set(s), f"{sample}: the README says {sorted(labels)}: {s}"
                if of_budget:
                    assert s["budget"] in ("shop", "unprobed"), s

    # The leak stops: its pods are gone, and the alert resolves.
    apps = kubernetes.client.AppsV1Api(sandbox.api_client())
    apps.patch_namespaced_deployment_scale("leaky", namespace, {"spec": {"replicas": 0}})
    stopped = time.time()
    prom.wait(
        lambda: not [a for a in prom.alerts() if a["labels"]["alertname"] == LEAK_ALERT],
        timeout=90,
        interval=1,
        what=f"{LEAK_ALERT} resolved",
    )
    ended = time.time()

    # Every rule evaluated on the live series without an error.
    rules = prom.rules()
    charted = alert_rules(chart_rule_groups(sandbox.bin_dir / "helm"))
    assert {r["name"] for r in rules} == {a["alert"] for a in charted}
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert not rule["lastEvaluation"].startswith("0001-"), rule  # the zero time: never

    # Every panel's query returns data, as Grafana sends it with namespace and budget chosen.
    board = load_dashboard()
    variables = variable_queries(board)
    assert namespace in prom.variable_values(variables["namespace"])
    budget_values = prom.variable_values(substitute(variables["budget"], {"namespace": namespace}))
    assert set(budget_values) == {"shop", "unprobed"}
    values = {
        "namespace": namespace,
        "budget": "(" + "|".join(budget_values) + ")",  # a multi-value variable, as Grafana
        "__rate_interval": RATE_INTERVAL,
    }
    shown: dict[str, list[dict[str, str]]] = {}
    for q in panel_queries(board):
        expr = substitute(q.expr, values)
        result = prom.query_range(expr, started, ended, step=1)
        assert finite(result), f"{q.panel} ({q.ref}) returned no data: {expr}"
        shown.setdefault(q.panel, []).extend(r["metric"] for r in result)
        # The namespace chosen is the only one shown.
        assert {r["metric"].get("namespace", namespace) for r in result} == {namespace}, q.panel
    # What the episode did is what the panels show.
    assert {"Deployment/leaky", "Deployment/steady"} <= {
        m["owner"] for m in shown["Leak rate per owner"]
    }
    assert {"action": "TerminateIdle", "result": "Succeeded"} in shown["Actions taken"]
    assert {"namespace": namespace, "budget": "unprobed", "reason": "SecretMissing"} in shown[
        "Probe errors"
    ]
    # The demo's drawing of the panels works on the same data.
    png = render_dashboard(prom, board, values, started, ended, tmp_path / "dashboard.png")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    print(
        f"leak alert fired {fired - started:.0f}s after the start, resolved "
        f"{ended - stopped:.0f}s after the leak stopped; "
        f"{len(panel_queries(board))} panel queries answered"
    )
