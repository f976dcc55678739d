"""Hostile data from the database: names that are quotes, SQL, control characters, bytes that are
not UTF-8, and names at PostgreSQL's maximum length. The probe must see them, terminate them and
report them without breaking and without running any of them.

Role and database names are shared by the whole cluster; one made from a ``SQL_ASCII`` database
may hold any bytes. Sessions are opened with ``psql`` from raw bytes in its environment, so nothing
on the client side cleans the names first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from connbudget.model.actions import IdleBackend, Termination
from connbudget.model.observations import BackendGroup, ServerSample
from connbudget.probe.postgres import Monitor
from sandbox.core import Sandbox

pytestmark = pytest.mark.sandbox

NAMEDATALEN = 64  # PostgreSQL's identifier buffer; names keep at most 63 bytes
RAW_DB = "connbudget_raw"  # a SQL_ASCII database, to make names of arbitrary bytes
SESSION_START_TIMEOUT = 20.0  # seconds for every psql session to show up in pg_stat_activity
CANARY = "connbudget_canary"  # a table that any injected DROP TABLE would remove

# (role, database, application_name): every one a hostile byte string.
HOSTILE: list[tuple[bytes, bytes, bytes]] = [
    (b"q'uote\"dbl", b"d'b\"; DROP TABLE connbudget_canary; --", b"a'b\"c\\d"),
    (
        f"x'); DROP TABLE {CANARY}; --".encode(),
        b"db-ctl\x01\x1b[31m\n\t",
        f"'); SELECT pg_terminate_backend(pg_backend_pid()); DROP TABLE {CANARY}; --".encode(),
    ),
    (b"ctl\x01\x1b[2J\r\n\ttab", "émoji😀".encode(), b"ctl\x01\x07\x1b[31m\n"),
    ("unicodé😀".encode(), b"r" * 63, "ünïcode😀 and more".encode()),
    (b"bad\xff\xfe\xc3(", b"db\xff\xc3", b"app\xff\xfe\x80"),
    (b"m" * 63, b"d%s%n%x{}", b"L" * 300),
]


def quote_ident(name: bytes) -> bytes:
    """A quoted identifier of raw bytes (psycopg's sql.Identifier takes text only)."""
    return b'"' + name.replace(b'"', b'""') + b'"'


@dataclass
class Session:
    role: bytes
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def hostile_sessions(sandbox: Sandbox) -> Iterator[list[Session]]:
    """An idle psql session per hostile (role, database, application_name)."""
    db = sandbox.db
    with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
        su.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(RAW_DB))
        )
        su.execute(
            sql.SQL(
                "CREATE DATABASE {} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' "
                "TEMPLATE template0"
            ).format(sql.Identifier(RAW_DB))
        )
        su.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (x int)").format(sql.Identifier(CANARY)))
    raw_dsn = db.superuser_dsn.replace("/postgres?", f"/{RAW_DB}?")
    raw = psycopg.connect(raw_dsn, autocommit=True)
    raw.execute("SET client_encoding TO 'SQL_ASCII'")
    cur = raw.cursor()

    def drop_all() -> None:
        for role, database, _ in HOSTILE:
            cur.execute(b"DROP DATABASE IF EXISTS " + quote_ident(database) + b" WITH (FORCE)")
            cur.execute(b"DROP ROLE IF EXISTS " + quote_ident(role))

    sessions: list[Session] = []
    try:
        drop_all()
        for role, database, _ in HOSTILE:
            cur.execute(b"CREATE ROLE " + quote_ident(role) + b" LOGIN")
            cur.execute(b"CREATE DATABASE " + quote_ident(database))
        for role, database, app in HOSTILE:
            env = {
                **os.environb,
                b"PGHOST": db.socket_dir.encode(),
                b"PGPORT": str(db.pg_port).encode(),
                b"PGUSER": role,
                b"PGDATABASE": database,
                b"PGAPPNAME": app,
            }
            # psql connects, then waits for input: an idle backend, like a leaked connection.
            proc = subprocess.Popen(
                ["psql", "-X", "-q"],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            sessions.append(Session(role=role, proc=proc))
        deadline = time.monotonic() + SESSION_START_TIMEOUT
        while time.monotonic() < deadline:
            n = raw.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename::text IN (SELECT "
                "rolname::text FROM pg_roles WHERE rolcanlogin AND rolname::text <> ALL(%s))",
                (["postgres", "connbudget_monitor", "app", "pgbouncer_admin"],),
            ).fetchone()
            if n and n[0] >= len(HOSTILE):
                break
            time.sleep(0.1)
        yield sessions
    finally:
        for s in sessions:
            if s.proc.poll() is None:
                s.proc.kill()
            s.proc.wait(timeout=10)
        drop_all()
        raw.close()
        with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
            su.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(RAW_DB))
            )


def hostile_groups(sample: ServerSample) -> list[BackendGroup]:
    mine = {"postgres", "connbudget_monitor", "app", "pgbouncer_admin", None}
    return [g for g in sample.groups if g.user not in mine]


def sample_once(dsn: str) -> ServerSample:
    async def main() -> ServerSample:
        m = Monitor(dsn)
        try:
            return await m.sample()
        finally:
            await m.close()

    return asyncio.run(main())


def canary_exists(sandbox: Sandbox) -> bool:
    with psycopg.connect(sandbox.db.superuser_dsn, autocommit=True) as su:
        row = su.execute("SELECT to_regclass(%s) IS NOT NULL", (CANARY,)).fetchone()
    return bool(row and row[0])


def test_the_probe_sees_hostile_names_as_text_and_runs_none_of_them(
    sandbox: Sandbox, hostile_sessions: list[Session]
) -> None:
    assert all(s.proc.poll() is None for s in hostile_sessions), [
        s.proc.stderr.read() if s.proc.stderr else b"" for s in hostile_sessions
    ]
    sample = sample_once(sandbox.db.monitor_dsn)
    groups = hostile_groups(sample)
    assert sum(g.count for g in groups) == len(HOSTILE)
    users = {g.user for g in groups}
    # Valid UTF-8 arrives as it is, control characters included; other bytes as \xNN escapes.
    assert "q'uote\"dbl" in users
    assert "ctl\x01\x1b[2J\r\n\ttab" in users
    assert "unicodé😀" in users
    assert "m" * 63 in users
    assert "bad\\xff\\xfe\\xc3(" in users
    databases = {g.database for g in groups}
    assert "db\\xff\\xc3" in databases
    assert "émoji😀" in databases
    for g in groups:
        # PostgreSQL keeps application_name printable ASCII, at most 63 bytes.
        assert len(g.application_name.encode()) < NAMEDATALEN
        assert g.application_name.isascii()
        assert g.state == "idle"
        assert len(g.idle) == g.count
    assert canary_exists(sandbox)
    # Everything the probe returns can be written to status and logs.
    json.dumps([g.__dict__ for g in groups], ensure_ascii=False)


def test_the_probe_command_prints_hostile_names_as_valid_json(
    sandbox: Sandbox, hostile_sessions: list[Session]
) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "connbudget", "probe", sandbox.db.monitor_dsn, "--json"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.decode("utf-8"))
    users = {g["user"] for g in report["groups"]}
    assert "bad\\xff\\xfe\\xc3(" in users
    table = subprocess.run(
        [sys.executable, "-m", "connbudget", "probe", sandbox.db.monitor_dsn],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert table.returncode == 0, table.stderr
    assert sandbox.db.monitor_password.encode() not in res.stdout + res.stderr + table.stdout


def test_hostile_backends_are_terminated_by_pid_and_nothing_else_happens(
    sandbox: Sandbox, hostile_sessions: list[Session]
) -> None:
    sample = sample_once(sandbox.db.monitor_dsn)
    targets = [
        IdleBackend(
            pid=pid,
            pod="hostile",
            idle_seconds=idle,
            backend_start=start,
            state_change=sample.sampled_at - idle,
        )
        for g in hostile_groups(sample)
        for pid, idle, start in g.idle
    ]
    assert len(targets) == len(HOSTILE)

    async def main() -> Termination:
        m = Monitor(sandbox.db.monitor_dsn)
        try:
            return await m.terminate(targets)
        finally:
            await m.close()

    done = asyncio.run(main())
    assert sorted(done.terminated) == sorted(t.pid for t in targets)
    assert done.not_permitted == ()
    for s in hostile_sessions:
        with contextlib.suppress(OSError):
            s.proc.communicate(b"SELECT 1;\n", timeout=10)  # psql notices the lost connection
    after = sample_once(sandbox.db.monitor_dsn)
    assert not hostile_groups(after)
    assert canary_exists(sandbox)
    with psycopg.connect(sandbox.db.superuser_dsn, autocommit=True) as su:
        roles = su.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'connbudget_monitor'")
        assert roles.fetchone() == (1,)
