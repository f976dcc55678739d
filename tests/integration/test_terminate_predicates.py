"""Each predicate of the termination statement, alone, protects a backend (real PostgreSQL).

``queries.TERMINATE_IDLE`` re-checks in the SQL that acts: the same backend (pid and
``backend_start``), still ``idle``, and idle for at least ``min_idle_seconds``. Each test below
offers a backend that passes every predicate but one, beside a control backend that passes them
all: the control is terminated (the call works), the other is not (that predicate held). Removing
any one predicate from the statement makes its test fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from connbudget.model.actions import IdleBackend
from connbudget.probe.postgres import Monitor
from sandbox.core import Sandbox

pytestmark = pytest.mark.sandbox

APP = "terminate-predicates"


@contextlib.contextmanager
def backends(dsn: str, n: int) -> Iterator[list[psycopg.Connection[Any]]]:
    conns = [psycopg.connect(dsn, autocommit=True, application_name=APP) for _ in range(n)]
    try:
        yield conns
    finally:
        for c in conns:
            c.close()


def identity(conn: psycopg.Connection[Any]) -> tuple[int, float]:
    """The backend's pid and ``backend_start`` (epoch seconds), as the probe reports them."""
    row = conn.execute(
        "SELECT pid, extract(epoch FROM backend_start)::float8 FROM pg_stat_activity"
        " WHERE pid = pg_backend_pid()"
    ).fetchone()
    assert row is not None
    return int(row[0]), float(row[1])


def offer(conn: psycopg.Connection[Any]) -> IdleBackend:
    pid, started = identity(conn)
    return IdleBackend(pid=pid, pod="x", idle_seconds=99, backend_start=started)


def terminate(dsn: str, targets: list[IdleBackend], *, min_idle_seconds: float) -> list[int]:
    async def main() -> list[int]:
        m = Monitor(dsn)
        try:
            return await m.terminate(targets, min_idle_seconds=min_idle_seconds)
        finally:
            await m.close()

    return asyncio.run(main())


def state_of(dsn: str, pid: int) -> str | None:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return None if row is None else str(row[0])


def test_an_idle_in_transaction_backend_is_protected_by_the_state_predicate(
    sandbox: Sandbox,
) -> None:
    db = sandbox.db
    with backends(db.app_dsn, 2) as (busy, control):
        targets = [offer(busy), offer(control)]
        busy.execute("BEGIN")
        busy.execute("SELECT 1")  # idle in transaction: terminating it would roll it back
        time.sleep(0.3)  # older than the minimum idle age below, by state_change
        assert state_of(db.monitor_dsn, targets[0].pid) == "idle in transaction"
        done = terminate(db.monitor_dsn, targets, min_idle_seconds=0.1)
        assert done == [targets[1].pid]
        assert busy.execute("SELECT 2").fetchone() == (2,)
        busy.execute("COMMIT")


def test_an_active_backend_is_protected_by_the_state_predicate(sandbox: Sandbox) -> None:
    db = sandbox.db
    with backends(db.app_dsn, 2) as (busy, control):
        targets = [offer(busy), offer(control)]
        outcome: list[object] = []

        def run_query() -> None:
            try:
                outcome.append(busy.execute("SELECT pg_sleep(3)").fetchone())
            except psycopg.Error as e:
                outcome.append(e)

        worker = threading.Thread(target=run_query)
        worker.start()
        try:
            for _ in range(50):
                if state_of(db.monitor_dsn, targets[0].pid) == "active":
                    break
                time.sleep(0.05)
            time.sleep(0.3)  # active for longer than the minimum idle age below
            assert state_of(db.monitor_dsn, targets[0].pid) == "active"
            done = terminate(db.monitor_dsn, targets, min_idle_seconds=0.1)
        finally:
            worker.join(timeout=10)
        assert done == [targets[1].pid]
        assert len(outcome) == 1
        assert not isinstance(outcome[0], BaseException), outcome  # the query ran to its end


def test_a_backend_used_again_since_the_probe_is_protected_by_the_state_change_predicate(
    sandbox: Sandbox,
) -> None:
    db = sandbox.db
    with backends(db.app_dsn, 2) as (reused, control):
        targets = [offer(reused), offer(control)]
        time.sleep(1.5)  # both idle long enough: the probe would pick both
        reused.execute("SELECT 1")  # ... then the app takes this one back: idle again, but anew
        assert state_of(db.monitor_dsn, targets[0].pid) == "idle"
        done = terminate(db.monitor_dsn, targets, min_idle_seconds=1.0)
        assert done == [targets[1].pid]
        assert reused.execute("SELECT 2").fetchone() == (2,)


def test_a_reused_pid_is_protected_by_the_backend_start_predicate(sandbox: Sandbox) -> None:
    db = sandbox.db
    with backends(db.app_dsn, 2) as (newcomer, control):
        pid, started = identity(newcomer)
        # The probe saw an earlier backend with this pid, which has gone since: a new backend
        # reusing the pid is idle, old enough, and still not the one that was chosen.
        targets = [
            IdleBackend(pid=pid, pod="x", idle_seconds=99, backend_start=started - 5.0),
            offer(control),
        ]
        time.sleep(0.3)
        done = terminate(db.monitor_dsn, targets, min_idle_seconds=0.1)
        assert done == [targets[1].pid]
        assert newcomer.execute("SELECT 2").fetchone() == (2,)
