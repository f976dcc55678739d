"""``connbudget probe``: who holds my connections, against the sandbox's PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from integration.conftest import VersionServer
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
        "statements",
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


# A password with a space, in an unquoted DSN: libpq quotes what follows the space when it fails.
PLANTED = ("Planted", "Frag-9xQ")


def test_a_malformed_pgbouncer_dsn_is_named_without_any_fragment(sandbox: Sandbox) -> None:
    db = sandbox.db
    malformed = (
        f"host={db.host} port={db.bouncer_port} user=pgbouncer_admin password=Planted Frag-9xQ"
        " dbname=pgbouncer"
    )
    res = probe(db.monitor_dsn, "--pgbouncer", malformed)
    assert res.returncode == 1, res.stderr
    assert "DsnInvalid" in res.stderr
    assert "Traceback" not in res.stderr
    assert not [f for f in PLANTED if f in res.stdout + res.stderr], res.stderr


def probe_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connbudget", "probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_the_dsns_from_the_environment_or_files_stay_off_the_command_line(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    db = sandbox.db
    base = {k: v for k, v in os.environ.items() if not k.startswith("CONNBUDGET_")}
    from_env = probe_env(
        {
            **base,
            "CONNBUDGET_DSN": db.monitor_dsn,
            "CONNBUDGET_PGBOUNCER_DSN": db.bouncer_admin_dsn,
        },
        "--json",
    )
    (tmp_path / "dsn").write_text(db.monitor_dsn + "\n")
    (tmp_path / "admin").write_text(db.bouncer_admin_dsn + "\n")
    files = ["--dsn-file", str(tmp_path / "dsn"), "--pgbouncer-dsn-file", str(tmp_path / "admin")]
    from_files = probe_env(base, "--json", *files)
    for res in (from_env, from_files):
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["maxConnections"] == db.max_connections
        assert "pgbouncer" in report
        assert db.monitor_password not in res.stdout + res.stderr
    # What ps would show of these two runs: no password.
    assert not [a for a in files if db.monitor_password in a or db.bouncer_admin_password in a]
    wrong = db.dsn("connbudget_monitor", "Nope-File-Secret-7", db.pg_port, "app")
    (tmp_path / "wrong").write_text(wrong)
    res = probe_env(base, "--dsn-file", str(tmp_path / "wrong"))
    assert res.returncode == 1
    assert "AuthenticationFailed" in res.stderr
    assert "Nope-File-Secret-7" not in res.stdout + res.stderr


# A literal the probe must never print: what an application last ran may hold a password.
PLANTED_LITERAL = "planted-S3cret-literal"
TIMES = "\N{MULTIPLICATION SIGN}"


def test_probe_shows_what_idle_connections_last_ran_without_its_literals(
    pg: VersionServer,
) -> None:
    db = pg.db
    conns = [
        psycopg.connect(db.app_dsn, autocommit=True, application_name="cli-statements")
        for _ in range(2)
    ]
    try:
        for c in conns:
            c.execute(f"SELECT '{PLANTED_LITERAL}' AS x, 42")
        res = probe(db.monitor_dsn, "--json")
        text = probe(db.monitor_dsn)
    finally:
        for c in conns:
            c.close()
    assert res.returncode == 0, res.stderr
    assert text.returncode == 0, text.stderr
    report = json.loads(res.stdout)
    (mine,) = [g for g in report["groups"] if g["applicationName"] == "cli-statements"]
    assert mine["state"] == "idle"
    assert [(s["statement"], s["count"]) for s in mine["statements"]] == [("SELECT ? AS x, ?", 2)]
    assert report["statementsVisible"] is True
    assert f"    2{TIMES} SELECT ? AS x, ?" in text.stdout.splitlines()
    assert "42" not in "".join(s["statement"] for g in report["groups"] for s in g["statements"])
    for out in (res, text):
        assert "S3cret" not in out.stdout + out.stderr
