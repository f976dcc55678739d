"""A null in the spec counts as absent, as the API server prunes it (found by test_bad_input)."""

from __future__ import annotations

from typing import Any

import pytest

from connbudget.cli import check_manifest, crd_schema
from connbudget.model.spec import RestartMethod, Scope, SpecError, parse_spec

BASE: dict[str, Any] = {
    "database": {"secretRef": {"name": "pg"}},
    "budget": {"maxConnections": 20},
    "selector": {"matchLabels": {"app": "web"}},
}


def test_a_null_optional_field_takes_its_default() -> None:
    spec = parse_spec(
        {
            **BASE,
            "budget": {"maxConnections": 20, "scope": None, "warningPercent": None},
            "remediation": {"dryRun": None, "restartPods": {"method": None}},
            "pollSeconds": None,
        }
    )
    assert spec.budget.scope is Scope.DATABASE
    assert spec.budget.warning_percent == 80
    assert spec.remediation.dry_run is False
    assert spec.remediation.restart_pods.method is RestartMethod.EVICT
    assert spec.poll_seconds == 5


def test_a_null_required_field_is_missing_not_a_crash() -> None:
    with pytest.raises(SpecError, match="required"):
        parse_spec({**BASE, "database": {"secretRef": {"name": None}}})
    doc = {
        "apiVersion": "connbudget.io/v1alpha1",
        "kind": "ConnectionBudget",
        "metadata": {"name": "x"},
        "spec": {**BASE, "budget": None},
    }
    assert any("budget: required" in p for p in check_manifest(doc, crd_schema()))


def test_check_accepts_nulls_where_the_api_server_prunes_them() -> None:
    doc = {
        "apiVersion": "connbudget.io/v1alpha1",
        "kind": "ConnectionBudget",
        "metadata": {"name": "x"},
        "spec": {**BASE, "budget": {"maxConnections": 20, "scope": None}, "pooler": None},
    }
    assert check_manifest(doc, crd_schema()) == []
