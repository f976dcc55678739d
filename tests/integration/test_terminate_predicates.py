"""Each predicate of the termination statement, alone, protects a backend (real PostgreSQL).

``queries.TERMINATE_IDLE`` re-checks in the SQL that acts: the same backend (pid and
``backend_start``), still ``idle``, and not used since the probe (its ``state_change`` no later
than the probe saw). Each test below offers a backend that passes every predicate but one, beside
a control backend that passes them all: the control is terminated (the call works), the other is
not (that predicate held). Removing any one predicate from the statement makes its test fail. The
last tests offer batches the statement once got wrong as a whole: a backend used again beside one
long idle (each backend is held to its own ``state_change``, not to the batch's smallest idle
age), and a superuser's backend, which the monitoring role may not signal, beside an ordinary one
(it is left alone and said, and the rest of the batch is terminated).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from connbudget.model.actions import IdleBackend, Termination
from connbudget.probe.postgres import Monitor
from sandbox.core import Sandbox
from sandbox.postgres import APP_DB

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


def offer(dsn: str, conn: psycopg.Connection[Any]) -> IdleBackend:
    """The backend of ``conn`` as a probe through ``dsn`` sees it now (its own connection would
    see itself active)."""
    pid, started = identity(conn)
    with psycopg.connect(dsn, autocommit=True) as probe:
        row = probe.execute(
            "SELECT date_part('epoch', state_change), date_part('epoch', now() - state_change)"
            " FROM pg_stat_activity WHERE pid = %s",
            (pid,),
        ).fetchone()
    assert row is not None
    changed, idle = float(row[0]), float(row[1])
    return IdleBackend(
        pid=pid, pod="x", idle_seconds=idle, backend_start=started, state_change=changed
    )


def terminate(dsn: str, targets: list[IdleBackend]) -> Termination:
    async def main() -> Termination:
        m = Monitor(dsn)
        try:
            return await m.terminate(targets)
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
        busy.execute("BEGIN")
        busy.execute("SELECT 1")  # idle in transaction: terminating it would roll it back
        # Offered as it is now: unchanged since, by state_change, only its state protects it.
        targets = [offer(db.monitor_dsn, busy), offer(db.monitor_dsn, control)]
        time.sleep(0.3)
        assert state_of(db.monitor_dsn, targets[0].pid) == "idle in transaction"
        done = terminate(db.monitor_dsn, targets)
        assert done == Termination(terminated=(targets[1].pid,))
        assert busy.execute("SELECT 2").fetchone() == (2,)
        busy.execute("COMMIT")


def test_an_active_backend_is_protected_by_the_state_predicate(sandbox: Sandbox) -> None:
    db = sandbox.db
    with backends(db.app_dsn, 2) as (busy, control):
        pid = busy.info.backend_pid
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
                if state_of(db.monitor_dsn, pid) == "active":
                    break
                time.sleep(0.05)
            # Offered as it is now (active, unchanged since by state_change), beside the control.
            with psycopg.connect(db.monitor_dsn, autocommit=True) as probe:
                row = probe.execute(
                    "SELECT date_part('epoch', backend_start), date_part('epoch', state_change)"
                    " FROM pg_stat_activity WHERE pid = %s",
                    (pid,),
                ).fetchone()
            assert row is not None
            targets = [
                IdleBackend(
                    pid=pid, pod="x", idle_seconds=99, backend_start=row[0], state_change=row[1]
                ),
                offer(db.monitor_dsn, control),
            ]
            time.sleep(0.3)
            assert state_of(db.monitor_dsn, pid) == "active"
            done = terminate(db.monitor_dsn, targets)
        finally:
            worker.join(timeout=10)
        assert done == Termination(terminated=(targets[1].pid,))
        assert len(outcome) == 1
        assert not isinstance(outcome[0], BaseException), outcome  # the query ran to its end


def test_a_backend_used_again_since_the_probe_is_protected_by_the_state_change_predicate(
    sandbox: Sandbox,
) -> None:
    db = sandbox.db
    with backends(db.app_dsn, 2) as (reused, control):
        time.sleep(1.5)  # both idle long enough: the probe would pick both
        targets = [offer(db.monitor_dsn, reused), offer(db.monitor_dsn, control)]
        reused.execute("SELECT 1")  # ... then the app takes this one back: idle again, but anew
        time.sleep(1.5)  # and idle again for as long as when it was offered
        assert state_of(db.monitor_dsn, targets[0].pid) == "idle"
        done = terminate(db.monitor_dsn, targets)
        assert done == Termination(terminated=(targets[1].pid,))
        assert reused.execute("SELECT 2").fetchone() == (2,)


def test_a_reused_pid_is_protected_by_the_backend_start_predicate(sandbox: Sandbox) -> None:
    db = sandbox.db
    with backends(db.app_dsn, 2) as (newcomer, control):
        # The probe saw an earlier backend with this pid, which has gone since: a new backend
        # reusing the pid is idle, unchanged since, and still not the one that was chosen.
        seen = offer(db.monitor_dsn, newcomer)
        targets = [
            dataclasses.replace(seen, backend_start=seen.backend_start - 5.0),
            offer(db.monitor_dsn, control),
        ]
        time.sleep(0.3)
        done = terminate(db.monitor_dsn, targets)
        assert done == Termination(terminated=(targets[1].pid,))
        assert newcomer.execute("SELECT 2").fetchone() == (2,)


def test_a_backend_used_again_is_protected_beside_a_long_idle_one_in_the_same_batch(
    sandbox: Sandbox,
) -> None:
    # Found in review: the statement was given the batch's smallest idle age at the probe (less
    # half a second), so a backend used again after the probe and idle again for that long was
    # terminated whenever a young backend shared its batch. Here the young one is itself.
    db = sandbox.db
    with backends(db.app_dsn, 2) as (long_idle, reused):
        time.sleep(2.0)
        reused.execute("SELECT 1")  # young at the probe
        time.sleep(0.3)

        async def main() -> Termination:
            m = Monitor(db.monitor_dsn)
            try:
                s = await m.sample()
                g = next(g for g in s.groups if g.application_name == APP and g.state == "idle")
                # As the plan offers them: state_change from the sample's time and idle age.
                targets = [
                    IdleBackend(
                        pid=p,
                        pod="x",
                        idle_seconds=i,
                        backend_start=t,
                        state_change=s.sampled_at - i,
                    )
                    for p, i, t in g.idle
                ]
                assert len(targets) == 2
                reused.execute("SELECT 2")  # used again after the probe ...
                await asyncio.sleep(1.5)  # ... and idle again, longer than it was at the probe
                return await m.terminate(targets)
            finally:
                await m.close()

        done = asyncio.run(main())
        assert done == Termination(terminated=(long_idle.info.backend_pid,))
        assert reused.execute("SELECT 3").fetchone() == (3,)


def test_a_superusers_backend_is_left_alone_and_the_rest_of_the_batch_terminated(
    sandbox: Sandbox,
) -> None:
    # pg_terminate_backend raises an ERROR for a backend the role may not signal (a superuser's,
    # for the non-superuser monitoring role), which ended the whole statement: nothing was
    # terminated, every pass.
    db = sandbox.db
    su_dsn = db.superuser_dsn.replace("/postgres?", f"/{APP_DB}?")
    with backends(db.app_dsn, 1) as (ordinary,), backends(su_dsn, 1) as (superuser,):
        targets = [offer(db.monitor_dsn, ordinary), offer(db.monitor_dsn, superuser)]
        time.sleep(0.3)
        done = terminate(db.monitor_dsn, targets)
        assert done == Termination(terminated=(targets[0].pid,), not_permitted=(targets[1].pid,))
        assert superuser.execute("SELECT 2").fetchone() == (2,)
