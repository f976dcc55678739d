"""Helpers shared by the reliability and security tests (faults, bad input, secrets, TLS)."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from e2e.conftest import Budgets, Operator, all_text
from sandbox.fixtures import Workloads

FAST = {"pollSeconds": 1}  # every test polls each second to stay short


def budget_spec(app: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "database": {"secretRef": {"name": "pg-monitor"}},
        "budget": {"maxConnections": 20},
        "selector": {"matchLabels": {"app": app}},
        **FAST,
    }
    spec.update(overrides)
    return spec


def pod_names(workloads: Workloads, namespace: str, selector: str) -> set[str]:
    return {p.metadata.name for p in workloads.pods(namespace, selector)}


def backends(dsn: str, prefix: str) -> dict[str, int]:
    """application_name → client backends, for apps whose name starts with ``prefix``."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND application_name LIKE %s GROUP BY 1",
            (prefix + "%",),
        ).fetchall()
    return {a: int(n) for a, n in rows}


def ready(budgets: Budgets, name: str) -> str | None:
    """``status:reason`` of the Ready condition (None before the first status)."""
    c = budgets.condition(name, "Ready")
    return f"{c['status']}:{c['reason']}" if c else None


def actions(op: Operator) -> list[dict[str, Any]]:
    """The operator's ``action`` log records (JSON logs), in order."""
    out = []
    for line in op.logs().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("message") == "action":
            out.append(rec)
    return out


def assert_no_secret(budgets: Budgets, names: list[str], op: Operator, secrets: list[str]) -> None:
    """No planted secret in logs, Events, any budget's status or the metrics."""
    text = "\n".join(all_text(budgets, n, op) for n in names)
    for secret in secrets:
        assert secret not in text, "a secret leaked into the operator's output"
