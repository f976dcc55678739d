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
