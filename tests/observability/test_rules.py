"""The chart's alert rules: valid for Prometheus, unit-tested with promtool (each alert fires and
resolves on synthetic series, with its labels and annotations), and written only against the
metrics and labels the operator exports."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from observability.promql import (
    BUDGET_LABELS,
    SCRAPE_LABELS,
    exported_samples,
    metrics_of,
    problems,
    result_labels,
    template_labels,
)
from sandbox.prometheus import (
    alert_rules,
    chart_rule_groups,
    helm_template,
    run_promtool,
    write_rules,
)

HERE = Path(__file__).resolve().parent
RULE_TESTS = HERE / "rules_test.yaml"


@pytest.fixture(scope="module")
def groups(helm: Path) -> list[dict[str, Any]]:
    return chart_rule_groups(helm)


def test_the_charts_rules_pass_promtool_check(groups: list[dict[str, Any]], tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.yaml", groups)
    res = run_promtool("check", "rules", str(rules))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found" in res.stdout


def test_every_alert_fires_and_resolves_in_the_promtool_unit_tests(
    groups: list[dict[str, Any]], tmp_path: Path
) -> None:
    write_rules(tmp_path / "rules.yaml", groups)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    res = run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    # Every alert of the chart is tested firing, and resolved later in the same test.
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for alert in alert_rules(groups):
        name = alert["alert"]
        checks = [
            (c["eval_time"], bool(c["exp_alerts"]))
            for t in cases
            for c in t.get("alert_rule_test", [])
            if c["alertname"] == name
        ]
        fired = [i for i, (_, firing) in enumerate(checks) if firing]
        assert fired, f"{name}: no promtool test where it fires"
        assert any(not firing for _, firing in checks[fired[0] + 1 :]), (
            f"{name}: no promtool test where it resolves after firing"
        )


def test_a_rule_that_never_fires_fails_the_unit_tests(
    groups: list[dict[str, Any]], tmp_path: Path
) -> None:
    # The unit tests can fail: with the leak alert's threshold out of reach, promtool says so.
    broken = yaml.safe_load(yaml.safe_dump(groups))
    (leak,) = (
        r for g in broken for r in g["rules"] if r.get("alert") == "ConnectionBudgetLeakDetected"
    )
    leak["expr"] = "connbudget_leak_rate_connections_per_second > 1000"
    write_rules(tmp_path / "rules.yaml", broken)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    res = run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert res.returncode != 0
    assert "ConnectionBudgetLeakDetected" in res.stdout + res.stderr


def test_the_rules_read_only_exported_metrics_and_labels(groups: list[dict[str, Any]]) -> None:
    exported = exported_samples()
    for rule in (r for g in groups for r in g["rules"]):
        expr = rule["expr"]
        name = rule.get("alert") or rule.get("record")
        assert metrics_of(expr), f"{name} reads no connbudget metric"
        assert not problems(expr, exported), f"{name}: {problems(expr, exported)}"
        used = template_labels(rule.get("annotations", {}).values())
        missing = used - result_labels(expr, exported)
        assert not missing, f"{name}'s annotations use labels its series lack: {missing}"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), name


def test_the_unit_tests_feed_the_series_the_operator_exports() -> None:
    # Synthetic series with invented names or labels would test rules against a fantasy.
    exported = exported_samples()
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for case in cases:
        for series in case["input_series"]:
            selector = series["series"]
            name, _, rest = selector.partition("{")
            labels = {part.split("=")[0].strip() for part in rest.rstrip("}").split(",") if part}
            assert name in exported, f"{name} is not exported"
            assert labels - SCRAPE_LABELS == exported[name], selector


def test_the_service_monitor_keeps_the_operators_namespace_label(helm: Path) -> None:
    # The operator's series carry the budget's `namespace`. A ServiceMonitor without
    # honorLabels lets the Prometheus Operator's own `namespace` target label (the operator's
    # namespace) win and renames the budget's to `exported_namespace`, and every alert and
    # dashboard panel would name the operator's namespace instead of the budget's.
    objs = helm_template(
        helm, "metrics.serviceMonitor.enabled=true", show_only="templates/servicemonitor.yaml"
    )
    assert exported_samples()["connbudget_usage_ratio"] >= BUDGET_LABELS
    (monitor,) = objs
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints
    for endpoint in endpoints:
        assert endpoint.get("honorLabels") is True, endpoint


@pytest.mark.parametrize(
    ("expr", "found"),
    [
        pytest.param("connbudget_usage_ratios > 1", "is not exported", id="a-misspelt-metric"),
        pytest.param(
            "sum by (exported_namespace) (connbudget_usage_ratio) > 1",
            "label 'exported_namespace'",
            id="a-label-no-metric-has",
        ),
        pytest.param(
            'connbudget_actions_total{reason="Blocked"}',
            "label 'reason'",
            id="another-metrics-label",
        ),
    ],
)
def test_the_metric_check_finds_what_the_operator_does_not_export(expr: str, found: str) -> None:
    assert any(found in p for p in problems(expr, exported_samples()))
