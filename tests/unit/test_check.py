"""``connbudget check``: offline validation against the CRD and the operator's rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from connbudget import cli

VALID: dict[str, Any] = {
    "apiVersion": "connbudget.io/v1alpha1",
    "kind": "ConnectionBudget",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "database": {"secretRef": {"name": "pg"}},
        "budget": {"maxConnections": 80},
        "selector": {"matchLabels": {"app": "web"}},
    },
}


def check(tmp_path: Path, *docs: dict[str, Any]) -> tuple[int, str]:
    path = tmp_path / "m.yaml"
    path.write_text("\n---\n".join(json.dumps(d) for d in docs))
    return cli.main(["check", str(path)]), str(path)


def test_a_valid_manifest_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    code, _ = check(tmp_path, VALID, other)
    assert code == 0
    assert "web: ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("spec_change", "message"),
    [
        pytest.param(
            {"budget": {"maxConnections": 80, "maxPercent": 10}}, "exactly one", id="both"
        ),
        pytest.param({"budget": {"maxConnections": "80"}}, "must be of type integer", id="type"),
        pytest.param(
            {"budget": {"maxConnections": 80, "burst": 5}},
            "budget.burst: unknown field",
            id="unknown-field",
        ),
        pytest.param({"selector": {}}, "must not be empty", id="selector"),
        pytest.param({"pollSeconds": 0}, "spec.pollSeconds: must be at least 1", id="poll"),
        pytest.param(
            {"remediation": {"steps": ["TerminateIdle", "TerminateIdle"]}},
            "must not contain duplicates",
            id="dup-steps",
        ),
    ],
)
def test_invalid_manifests_fail_with_the_field_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec_change: dict[str, Any], message: str
) -> None:
    doc = {**VALID, "spec": {**VALID["spec"], **spec_change}}
    code, _ = check(tmp_path, doc)
    assert code == 1
    assert message in capsys.readouterr().err


def test_a_wrong_api_version_and_a_missing_name_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {**VALID, "apiVersion": "connbudget.io/v1", "metadata": {}}
    code, _ = check(tmp_path, doc)
    err = capsys.readouterr().err
    assert code == 1
    assert "apiVersion: must be connbudget.io/v1alpha1" in err
    assert "metadata.name: required" in err


def test_a_file_without_budgets_is_an_error(tmp_path: Path) -> None:
    code, _ = check(tmp_path, {"apiVersion": "v1", "kind": "ConfigMap"})
    assert code == 1


# --- budget admission, offline ------------------------------------------------------------------

SAMPLES = Path(__file__).parents[2] / "manifests" / "samples" / "admission"


def test_the_sample_that_keeps_the_budget_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", str(SAMPLES / "fits.yaml")]) == 0
    out = capsys.readouterr().out
    assert (
        "fits: Deployment shop/web may open 5 pods \N{MULTIPLICATION SIGN} 10 connections"
        " (declared) = 50 (4 replicas + 1 surge); with 40 held by other owners that is 90 of the"
        " budget's 100 (ConnectionBudget shop/db)"
    ) in out
    assert "6 maxReplicas of HorizontalPodAutoscaler shop/worker + 1 surge" in out


def test_the_sample_that_breaks_the_budget_is_denied_with_the_arithmetic(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["check", str(SAMPLES / "breaks.yaml")]) == 1
    err = capsys.readouterr().err
    assert (
        "denied: Deployment checkout/web may open 7 pods \N{MULTIPLICATION SIGN} 10 connections"
        " (declared) = 70 (5 replicas + 2 surge); with 40 held by other owners that is 110 of the"
        " budget's 100 (ConnectionBudget checkout/db): 10 over"
    ) in err
    assert err.count("denied:") == 1


def test_a_directory_is_walked_for_yaml_and_a_template_in_it_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "all.yml").write_text((SAMPLES / "breaks.yaml").read_text())
    (tmp_path / "app" / "chart.yaml").write_text("replicas: {{ .Values.replicas }}\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.yaml").write_text("{{ broken\n")
    assert cli.main(["check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "chart.yaml: skipped: not YAML" in err
    assert ".git" not in err
    assert "denied: Deployment checkout/web" in err


def breaking(mode: str | None, **annotations: str) -> list[dict[str, Any]]:
    budget = {
        **VALID,
        "spec": {**VALID["spec"], **({"admission": {"mode": mode}} if mode else {})},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
        "spec": {
            "replicas": 10,
            "strategy": {"rollingUpdate": {"maxSurge": "10%"}},
            "template": {"metadata": {"labels": {"app": "web"}}},
        },
    }
    return [budget, deployment]


def test_warn_is_the_default_and_fails_only_with_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, path = check(tmp_path, *breaking(None, **{"connbudget.io/connections-per-pod": "8"}))
    err = capsys.readouterr().err
    assert code == 0
    assert "warning: Deployment shop/web may open 11 pods" in err
    assert "= 88 (10 replicas + 1 surge)" in err
    assert "that is 88 of the budget's 80 (ConnectionBudget shop/web): 8 over" in err
    assert cli.main(["check", "--strict", path]) == 1


def test_off_is_not_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = check(tmp_path, *breaking("Off", **{"connbudget.io/connections-per-pod": "8"}))
    captured = capsys.readouterr()
    assert code == 0
    assert "Deployment" not in captured.out + captured.err


def test_a_workload_without_a_declared_figure_is_said_not_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = check(tmp_path, *breaking("Deny"))
    assert code == 0
    assert (
        "Deployment shop/web: not checked: no declared connections per pod (annotation"
        " connbudget.io/connections-per-pod)"
    ) in capsys.readouterr().out


def test_an_invalid_declared_figure_fails_whatever_the_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = check(tmp_path, *breaking("Warn", **{"connbudget.io/connections-per-pod": "ten"}))
    assert code == 1
    assert "must be a positive integer (1 to 262143), not 'ten'" in capsys.readouterr().err


def test_a_percentage_budget_is_not_checked_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    budget, deployment = breaking("Deny", **{"connbudget.io/connections-per-pod": "8"})
    budget["spec"] = {**budget["spec"], "budget": {"maxPercent": 50}}
    code, _ = check(tmp_path, budget, deployment)
    assert code == 0
    assert "percentage of the server's max_connections" in capsys.readouterr().out


def test_workloads_of_another_namespace_or_not_selected_are_not_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    budget, deployment = breaking("Deny", **{"connbudget.io/connections-per-pod": "8"})
    elsewhere = {**deployment, "metadata": {**deployment["metadata"], "namespace": "other"}}
    code, _ = check(tmp_path, budget, elsewhere)
    assert code == 0
    assert "Deployment" not in capsys.readouterr().out
