"""The Grafana dashboard: its queries read only what the operator exports, its layout and
variables hold together, and the chart ships it as an opt-in ConfigMap a Grafana sidecar finds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from observability.promql import (
    BUDGET_LABELS,
    exported_samples,
    legend_labels,
    metrics_of,
    problems,
    result_labels,
)
from sandbox.prometheus import (
    CHART,
    DASHBOARD,
    KUBE_VERSION,
    dashboard_panels,
    helm_template,
    load_dashboard,
    panel_queries,
    variable_queries,
    variables_of,
)

GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
GRID_COLUMNS = 24  # Grafana's grid width


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return load_dashboard()


def test_every_panel_query_reads_exported_metrics_and_shows_labels_it_has(
    board: dict[str, Any],
) -> None:
    exported = exported_samples()
    queries = panel_queries(board)
    assert queries
    for panel in dashboard_panels(board):
        for target in panel["targets"]:
            expr = target["expr"]
            assert not problems(expr, exported), f"{panel['title']}: {problems(expr, exported)}"
            shown = legend_labels(target.get("legendFormat", ""))
            missing = shown - result_labels(expr, exported)
            assert not missing, f"{panel['title']}: the legend shows {missing}, not in the result"
    for name, query in variable_queries(board).items():
        assert not problems(query, exported), f"variable {name}: {problems(query, exported)}"


def test_the_dashboard_covers_usage_leaks_actions_and_the_probe(board: dict[str, Any]) -> None:
    read = {m for q in panel_queries(board) for m in metrics_of(q.expr)}
    for metric in (
        "connbudget_connections",
        "connbudget_budget_connections",
        "connbudget_leak_rate_connections_per_second",
        "connbudget_actions_total",
        "connbudget_probe_duration_seconds_bucket",
        "connbudget_probe_errors_total",
    ):
        assert metric in read, f"no panel reads {metric}"


def test_every_variable_a_query_uses_is_defined_and_filters_every_budget_query(
    board: dict[str, Any],
) -> None:
    exported = exported_samples()
    defined = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "budget"} <= defined
    for q in panel_queries(board):
        unknown = variables_of(q.expr) - defined - GRAFANA_BUILTINS
        assert not unknown, f"{q.panel}: undefined variables {unknown}"
        # A query of a budget's series shows the chosen budgets only (operator-wide ones, such
        # as the monitoring connections, have no budget to choose).
        if any(exported[m] >= BUDGET_LABELS for m in metrics_of(q.expr)):
            assert {"namespace", "budget"} <= variables_of(q.expr), f"{q.panel} is not filtered"
    for panel in dashboard_panels(board):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_panels_have_unique_ids_and_do_not_overlap(board: dict[str, Any]) -> None:
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= GRID_COLUMNS, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    assert board["uid"]
    assert board["title"]


def test_the_dashboard_configmap_is_off_by_default(helm: Path) -> None:
    objs = helm_template(helm)
    assert not [o for o in objs if o["kind"] == "ConfigMap"]


def test_the_dashboard_configmap_carries_the_json_and_the_sidecars_label(helm: Path) -> None:
    (cm,) = helm_template(helm, "dashboard.enabled=true", show_only="templates/dashboard.yaml")
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["app.kubernetes.io/name"] == "connbudget"
    assert "annotations" not in cm["metadata"]
    assert json.loads(cm["data"]["connbudget.json"]) == json.loads(DASHBOARD.read_text())


def test_the_dashboard_label_namespace_and_annotations_are_configurable(helm: Path) -> None:
    (cm,) = helm_template(
        helm,
        "dashboard.enabled=true",
        "dashboard.label=my_dashboards",
        "dashboard.labelValue=connbudget",
        "dashboard.namespace=monitoring",
        "dashboard.annotations.grafana_folder=Databases",
        show_only="templates/dashboard.yaml",
    )
    labels = cm["metadata"]["labels"]
    assert labels["my_dashboards"] == "connbudget"
    assert "grafana_dashboard" not in labels
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Databases"}


@pytest.mark.parametrize(
    "setting",
    [
        pytest.param("dashboard.enabled=yes", id="enabled-not-a-boolean"),
        pytest.param("dashboard.lable=x", id="a-misspelt-key"),
        pytest.param("dashboard.label=", id="an-empty-label"),
    ],
)
def test_the_values_schema_refuses_a_wrong_dashboard_setting(helm: Path, setting: str) -> None:
    res = subprocess.run(
        [str(helm), "template", "x", str(CHART), "--kube-version", KUBE_VERSION, "--set", setting],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode != 0
    assert "dashboard" in res.stderr
