"""Where a leak is, on the sandbox: two real leaks, each named by its workload, rate, statement and
route in status, its Event, the metrics, ``connbudget probe`` and ``connbudget leaks``.

- ``web``: Django 5.0.1 under uvicorn leaking as in ticket #35059, its queries tagged by
  sqlcommenter (route, controller, framework);
- ``jobs``: a psycopg app that opens a connection per request and keeps it, its last statement
  untagged and carrying a planted password-like literal that must appear in no output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest

from e2e.conftest import ROOT, Budgets, Operator, all_text, wait_until
from sandbox.apps.deploy import SQLCOMMENTER, deploy_app, leak_settings, rate_settings
from sandbox.apps.planted import PLANTED_SECRET
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads

pytestmark = pytest.mark.sandbox

SPEC = {
    "database": {"secretRef": {"name": "pg-monitor"}},
    "budget": {"maxConnections": 80},
    "selector": {"matchLabels": {"tier": "shop"}},
}
SHOP = {"tier": "shop"}
WEB_RATE = 3.0  # connections leaked per second
JOBS_RATE = 1.5
JOBS_STATEMENT = "SELECT count(*) FROM pg_catalog.pg_class WHERE relname = ?"


def owner(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    by_owner = (status.get("usage") or {}).get("byOwner") or []
    return next((o for o in by_owner if o["owner"] == f"Deployment/{name}"), None)


def located(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    o = owner(status, name)
    return o if o and o.get("class") == "Leaking" and o.get("leaks") else None


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(ROOT / "operator"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "connbudget.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": path, **env},
        check=False,
    )


def test_two_leaks_are_named_by_workload_statement_and_route_and_no_literal_leaves(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
) -> None:
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    budgets.create("shop", SPEC)
    wait_until(lambda: budgets.status("shop").get("usage"), 60, "the first probe")
    deploy_app(
        workloads,
        namespace,
        "web",
        kind="leak",
        driver_env=leak_settings(WEB_RATE, 120),
        app_env=SQLCOMMENTER,
        labels=SHOP,
        wait=False,
    )
    deploy_app(
        workloads,
        namespace,
        "jobs",
        kind="psycopg-leak",
        driver_env=rate_settings(JOBS_RATE, 120),
        labels=SHOP,
        wait=False,
    )

    # Status: each leaking workload, its rate and where it leaks.
    def both() -> tuple[dict[str, Any], dict[str, Any]] | None:
        st = budgets.status("shop")
        web, jobs = located(st, "web"), located(st, "jobs")
        return (web, jobs) if web and jobs else None

    web, jobs = wait_until(both, 120, "both leaks located in status")
    print(json.dumps({"web": web, "jobs": jobs}, indent=1))
    (web_leak,) = web["leaks"]
    assert web_leak["statement"].startswith('SELECT COUNT(*) AS "__count" FROM "auth_user"')
    assert web_leak["tags"]["framework"] == "django:5.0.1"
    assert web_leak["tags"]["route"]
    assert web_leak["share"] == 1.0
    assert re.fullmatch(r"web-[0-9a-z]+", web_leak["revision"])
    assert "ticket #35059" in web["hint"]
    (jobs_leak,) = jobs["leaks"]
    assert jobs_leak["statement"] == JOBS_STATEMENT
    assert jobs_leak["tags"] == {}
    assert jobs_leak["fingerprint"] != web_leak["fingerprint"]
    assert re.fullmatch(r"jobs-[0-9a-z]+", jobs_leak["revision"])
    ready = budgets.condition("shop", "StatementsVisible")
    assert ready is not None
    assert ready["status"] == "True"

    # Events: one LeakDetected per workload, naming its statement.
    def leak_events() -> dict[str, str] | None:
        said = {e.message.split(" ", 1)[0]: e.message for e in budgets.events("LeakDetected")}
        return said if {"Deployment/web", "Deployment/jobs"} <= set(said) else None

    said = wait_until(leak_events, 30, "a LeakDetected Event per workload")
    print("\n".join(said.values()))
    assert 'after `SELECT COUNT(*) AS "__count" FROM "auth_user"' in said["Deployment/web"]
    assert "framework=django:5.0.1" in said["Deployment/web"]
    assert f"after `{JOBS_STATEMENT}`" in said["Deployment/jobs"]

    # Metrics: the rate per owner and fingerprint, never the statement.
    metrics = operator.metrics()
    for o, leak in (("web", web_leak), ("jobs", jobs_leak)):
        line = next(
            (
                ln
                for ln in metrics.splitlines()
                if ln.startswith("connbudget_leak_fingerprint_rate_connections_per_second{")
                and f'owner="Deployment/{o}"' in ln
                and f'fingerprint="{leak["fingerprint"]}"' in ln
            ),
            None,
        )
        assert line is not None, o
        assert float(line.rsplit(" ", 1)[1]) > 0
    assert "auth_user" not in metrics

    # connbudget leaks: the same, from the budgets' status.
    listed = cli("leaks", "-n", namespace, "--json", KUBECONFIG=str(sandbox.kubeconfig))
    assert listed.returncode == 0, listed.stderr
    rows = {r["owner"]: r for r in json.loads(listed.stdout)}
    assert rows["Deployment/web"]["leaks"][0]["fingerprint"] == web_leak["fingerprint"]
    assert rows["Deployment/jobs"]["leaks"][0]["statement"] == JOBS_STATEMENT
    classes: list[str | None] = []

    def table_of_both() -> subprocess.CompletedProcess[str] | None:
        # Listed while Leaking: a poll may see a leak's connections all terminated and none new.
        res = cli("leaks", "-n", namespace, KUBECONFIG=str(sandbox.kubeconfig))
        assert res.returncode == 0, res.stderr
        if "Deployment/web" in res.stdout and "Deployment/jobs" in res.stdout:
            return res
        classes.append((owner(budgets.status("shop"), "jobs") or {}).get("class"))
        return None

    table = wait_until(table_of_both, 20, "both leaks in connbudget leaks' table")
    print(table.stdout, f"(jobs' class when missing: {classes})")

    # connbudget probe: who holds connections and what they last ran, without a cluster.
    probe = cli("probe", "--json", CONNBUDGET_DSN=sandbox.db.monitor_dsn)
    assert probe.returncode == 0, probe.stderr
    shown = [s["statement"] for g in json.loads(probe.stdout)["groups"] for s in g["statements"]]
    assert JOBS_STATEMENT in shown
    assert any(s.startswith('SELECT COUNT(*) AS "__count" FROM "auth_user"') for s in shown)
    probe_table = cli("probe", CONNBUDGET_DSN=sandbox.db.monitor_dsn)
    assert probe_table.returncode == 0, probe_table.stderr
    print(probe_table.stdout)

    # The planted literal reached the database, and no output.
    outputs = [
        all_text(budgets, "shop", operator),
        listed.stdout + listed.stderr,
        table.stdout + table.stderr,
        probe.stdout + probe.stderr,
        probe_table.stdout + probe_table.stderr,
    ]
    assert all(PLANTED_SECRET not in text for text in outputs)
