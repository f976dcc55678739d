"""Parsing ConnectionBudget specs: defaults, and every problem named with its field path."""

from __future__ import annotations

from typing import Any

import pytest

from connbudget.cli import crd_schema
from connbudget.model.spec import (
    SECRET_KEY_MAX_LENGTH,
    SECRET_KEY_PATTERN,
    SECRET_NAME_MAX_LENGTH,
    SECRET_NAME_PATTERN,
    AdmissionMode,
    AttributionMode,
    LabelRequirement,
    LabelSelector,
    RestartMethod,
    Scope,
    SpecError,
    Step,
    is_paused,
    parse_spec,
)

MINIMAL: dict[str, Any] = {
    "database": {"secretRef": {"name": "pg"}},
    "budget": {"maxConnections": 80},
    "selector": {"matchLabels": {"app": "web"}},
}


def test_minimal_spec_gets_the_documented_defaults() -> None:
    s = parse_spec(MINIMAL)
    assert s.database_secret.key == "dsn"
    assert s.budget.scope is Scope.DATABASE
    assert s.budget.warning_percent == 80
    assert s.attribution is AttributionMode.AUTO
    assert s.leak_idle_seconds == 300
    assert s.remediation.breach_seconds == 15
    assert s.remediation.cooldown_seconds == 60
    assert s.remediation.steps == (Step.TERMINATE_IDLE, Step.RESTART_PODS, Step.SCALE_POOLER)
    assert s.remediation.restart_pods.method is RestartMethod.EVICT
    assert s.remediation.restart_pods.max_pods_per_cycle == 1
    assert s.remediation.restart_pods.min_pod_age_seconds == 120
    assert s.remediation.terminate_idle.min_idle_seconds == 3
    assert s.remediation.terminate_idle.max_per_cycle == 100
    assert s.poll_seconds == 5
    assert s.pooler is None
    assert s.admission is AdmissionMode.WARN


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        pytest.param(
            {"budget": {}}, "exactly one of maxConnections and maxPercent", id="no-budget"
        ),
        pytest.param(
            {"budget": {"maxConnections": 5, "maxPercent": 5}}, "exactly one", id="both-budgets"
        ),
        pytest.param(
            {"budget": {"maxConnections": 0}}, "maxConnections must be between", id="zero"
        ),
        pytest.param({"budget": {"maxPercent": 101}}, "maxPercent must be between", id="pct"),
        pytest.param({"budget": {"maxConnections": "80"}}, "must be an integer", id="string"),
        pytest.param({"budget": {"maxConnections": True}}, "must be an integer", id="bool"),
        pytest.param(
            {"budget": {"maxConnections": 5, "scope": "Cluster"}},
            "scope must be one of",
            id="scope",
        ),
        pytest.param({"selector": {}}, "must not be empty", id="empty-selector"),
        pytest.param({"selector": None}, "spec.selector is required", id="no-selector"),
        pytest.param(
            {"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
            "In and NotIn need values",
            id="in-without-values",
        ),
        pytest.param(
            {"selector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
            "operator must be",
            id="bad-operator",
        ),
        pytest.param({"database": {}}, "secretRef is required", id="no-secret"),
        pytest.param(
            {"database": {"secretRef": {"name": ""}}},
            "name must be a non-empty",
            id="empty-secret-name",
        ),
        pytest.param(
            {"remediation": {"steps": []}}, "steps must be a non-empty list", id="no-steps"
        ),
        pytest.param(
            {"remediation": {"steps": ["Reboot"]}}, "steps[0] must be one of", id="unknown-step"
        ),
        pytest.param(
            {"remediation": {"steps": ["RestartPods", "RestartPods"]}},
            "listed twice",
            id="dup-step",
        ),
        pytest.param(
            {"remediation": {"restartPods": {"method": "Kill"}}},
            "method must be one of",
            id="method",
        ),
        pytest.param(
            {"remediation": {"restartPods": {"maxPodsPerCycle": 0}}},
            "maxPodsPerCycle must be between",
            id="zero-pods",
        ),
        pytest.param(
            {"remediation": {"terminateIdle": {"minIdleSeconds": 400}}},
            "must not exceed spec.leakDetection.idleSeconds",
            id="min-idle",
        ),
        pytest.param(
            {"remediation": {"dryRun": "yes"}}, "dryRun must be true or false", id="dry-run"
        ),
        pytest.param({"pollSeconds": 0}, "pollSeconds must be between", id="poll"),
        pytest.param(
            {
                "pooler": {
                    "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgb"},
                    "minReplicas": 5,
                    "maxReplicas": 2,
                }
            },
            "minReplicas must not exceed",
            id="pooler-bounds",
        ),
        pytest.param({"pooler": {"minReplicas": 1}}, "targetRef is required", id="pooler-target"),
        pytest.param({"attribution": {"mode": "Magic"}}, "mode must be one of", id="mode"),
        pytest.param(
            {"admission": {"mode": "Block"}},
            "spec.admission.mode must be one of Off, Warn, Deny, not 'Block'",
            id="admission-mode",
        ),
    ],
)
def test_invalid_specs_are_refused_with_the_field_named(
    change: dict[str, Any], problem: str
) -> None:
    raw = {**MINIMAL, **change}
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert any(problem in p for p in err.value.problems), err.value.problems


POOLER_TARGET = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgb"}


def _with_refs(database: dict[str, Any], admin: dict[str, Any] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {**MINIMAL, "database": {"secretRef": database}}
    if admin is not None:
        raw["pooler"] = {"targetRef": POOLER_TARGET, "adminSecretRef": admin}
    return raw


@pytest.mark.parametrize(
    "name",
    ["Bad_Name!", "Pg-Monitor", "-pg", "pg-", "pg..monitor", "pg monitor", "pg/monitor", "a" * 254],
)
def test_a_secret_name_must_be_a_dns_subdomain_as_the_api_server_says(name: str) -> None:
    for raw, field in (
        (_with_refs({"name": name}), "spec.database.secretRef.name"),
        (_with_refs({"name": "pg"}, {"name": name}), "spec.pooler.adminSecretRef.name"),
    ):
        with pytest.raises(SpecError) as err:
            parse_spec(raw)
        assert any(p.startswith(field) and "DNS" in p for p in err.value.problems), (
            err.value.problems
        )


@pytest.mark.parametrize("key", ["bad key", "ca/crt", "dsn!", "k" * 254])
@pytest.mark.parametrize("field", ["key", "caKey"])
def test_a_secret_key_must_be_a_valid_secret_data_key(field: str, key: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(_with_refs({"name": "pg", field: key}))
    assert any(p.startswith(f"spec.database.secretRef.{field}") for p in err.value.problems), (
        err.value.problems
    )
    if field == "key":
        with pytest.raises(SpecError) as err:
            parse_spec(_with_refs({"name": "pg"}, {"name": "pgb", "key": key}))
        assert any(p.startswith("spec.pooler.adminSecretRef.key") for p in err.value.problems)


def test_valid_secret_names_and_keys_are_accepted() -> None:
    s = parse_spec(
        _with_refs(
            {"name": "pg-monitor.prod-1", "key": "DSN_url-1.txt", "caKey": "ca.crt"},
            {"name": "0pgbouncer", "key": "-admin"},
        )
    )
    assert (s.database_secret.name, s.database_secret.key) == ("pg-monitor.prod-1", "DSN_url-1.txt")
    assert s.database_secret.ca_key == "ca.crt"
    assert s.pooler is not None
    assert s.pooler.admin_secret_ref is not None
    assert s.pooler.admin_secret_ref.name == "0pgbouncer"
    assert parse_spec(_with_refs({"name": "a" * 253})).database_secret.name == "a" * 253


def test_the_crd_validates_secret_names_and_keys_with_the_same_patterns() -> None:
    props = crd_schema()["properties"]["spec"]["properties"]
    for ref in (
        props["database"]["properties"]["secretRef"],
        props["pooler"]["properties"]["adminSecretRef"],
    ):
        fields = ref["properties"]
        assert fields["name"]["pattern"] == f"^{SECRET_NAME_PATTERN}$"
        assert fields["name"]["maxLength"] == SECRET_NAME_MAX_LENGTH
        for key in ("key", "caKey"):
            if key in fields:
                assert fields[key]["pattern"] == f"^{SECRET_KEY_PATTERN}$"
                assert fields[key]["maxLength"] == SECRET_KEY_MAX_LENGTH


@pytest.mark.parametrize("mode", list(AdmissionMode))
def test_the_admission_mode_is_parsed(mode: AdmissionMode) -> None:
    assert parse_spec({**MINIMAL, "admission": {"mode": mode.value}}).admission is mode


def test_the_crd_offers_the_admission_modes_the_spec_parses() -> None:
    admission = crd_schema()["properties"]["spec"]["properties"]["admission"]
    mode = admission["properties"]["mode"]
    assert mode["enum"] == [m.value for m in AdmissionMode]
    assert mode["default"] == AdmissionMode.WARN.value


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"budget": {}, "selector": {}, "pollSeconds": -1})
    assert len(err.value.problems) >= 4


def test_percent_budget_resolves_against_usable_slots() -> None:
    s = parse_spec({**MINIMAL, "budget": {"maxPercent": 80}})
    assert s.budget.resolve(server_max_connections=100, reserved=3) == 77
    assert s.budget.resolve(server_max_connections=2, reserved=3) == 1


def test_selector_matching_and_query_rendering() -> None:
    sel = LabelSelector(
        match_labels={"app": "web"},
        match_expressions=(
            LabelRequirement(key="tier", operator="In", values=("a", "b")),
            LabelRequirement(key="canary", operator="DoesNotExist"),
            LabelRequirement(key="team", operator="Exists"),
            LabelRequirement(key="zone", operator="NotIn", values=("x",)),
        ),
    )
    assert sel.matches({"app": "web", "tier": "a", "team": "t"})
    assert not sel.matches({"app": "web", "tier": "c", "team": "t"})
    assert not sel.matches({"app": "web", "tier": "a", "team": "t", "canary": "1"})
    assert not sel.matches({"app": "web", "tier": "a"})
    assert not sel.matches({"app": "web", "tier": "a", "team": "t", "zone": "x"})
    assert not sel.matches({"tier": "a", "team": "t"})
    assert sel.to_query() == "app=web,tier in (a,b),!canary,team,zone notin (x)"


@pytest.mark.parametrize(
    ("annotations", "paused"),
    [
        (None, False),
        ({}, False),
        ({"connbudget.io/paused": "true"}, True),
        ({"connbudget.io/paused": "True "}, True),
        ({"connbudget.io/paused": "false"}, False),
        ({"connbudget.io/paused": "yes"}, False),
    ],
)
def test_pause_annotation(annotations: dict[str, str] | None, paused: bool) -> None:
    assert is_paused(annotations) is paused
