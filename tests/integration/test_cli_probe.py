"""``connbudget probe``: who holds my connections, against the sandbox's PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest

from sandbox.core import Sandbox

pytestmark = pytest.mark.sandbox


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connbudget", "probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_probe_json_reports_groups_without_counting_itself(sandbox: Sandbox) -> None:
    db = sandbox.db
    conns = [psycopg.connect(db.app_dsn, application_name="cli-probe-test") for _ in range(3)]
    try:
        res = probe(db.monitor_dsn, "--json", "--pgbouncer", db.bouncer_admin_dsn)
        text = probe(db.monitor_dsn)
    finally:
        for c in conns:
            c.close()
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["maxConnections"] == db.max_connections
    assert report["reserved"] == 3
    mine = [g for g in report["groups"] if g["applicationName"] == "cli-probe-test"]
    assert len(mine) == 1
    assert mine[0]["count"] == 3
    assert mine[0]["state"] == "idle"
    assert set(mine[0]) == {
        "applicationName",
        "clientAddr",
        "user",
        "database",
        "state",
        "count",
        "maxIdleSeconds",
    }
    assert report["connections"] == sum(g["count"] for g in report["groups"])
    assert not [g for g in report["groups"] if g["applicationName"] == "connbudget-probe"]
    assert "pgbouncer" in report
    assert text.returncode == 0
    assert "cli-probe-test" in text.stdout
    assert "MAX IDLE" in text.stdout


def test_probe_with_a_wrong_password_fails_without_printing_it(sandbox: Sandbox) -> None:
    db = sandbox.db
    res = probe(db.dsn("connbudget_monitor", "Nope-Secret-42", db.pg_port, "app"))
    assert res.returncode == 1
    assert "AuthenticationFailed" in res.stderr
    assert "Nope-Secret-42" not in res.stderr + res.stdout
