"""The probe against the sandbox's real PostgreSQL 15 and PgBouncer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from connbudget.model.actions import IdleBackend, Termination
from connbudget.model.observations import ServerSample
from connbudget.probe.errors import ProbeError, ProbeFailure
from connbudget.probe.pgbouncer import sample_poolers
from connbudget.probe.postgres import Monitor, MonitorPool
from sandbox.core import Sandbox

pytestmark = pytest.mark.sandbox


@contextlib.contextmanager
def connections(dsn: str, n: int, app: str) -> Iterator[list[psycopg.Connection[Any]]]:
    conns = [psycopg.connect(dsn, autocommit=True, application_name=app) for _ in range(n)]
    try:
        yield conns
    finally:
        for c in conns:
            c.close()


def groups_of(s: ServerSample, app: str) -> dict[str | None, int]:
    return {g.state: g.count for g in s.groups if g.application_name == app}


def test_sample_groups_client_backends_and_leaves_the_probe_out(sandbox: Sandbox) -> None:
    db = sandbox.db

    async def main() -> ServerSample:
        m = Monitor(db.monitor_dsn)
        try:
            return await m.sample()
        finally:
            await m.close()

    with connections(db.app_dsn, 4, "probe-test-a") as conns:
        conns[0].execute("BEGIN")
        conns[0].execute("SELECT 1")  # idle in transaction
        s = asyncio.run(main())
    assert s.max_connections == db.max_connections
    assert s.reserved == 3
    assert s.database == "app"
    assert groups_of(s, "probe-test-a") == {"idle": 3, "idle in transaction": 1}
    idle = next(g for g in s.groups if g.application_name == "probe-test-a" and g.state == "idle")
    assert len(idle.idle) == 3
    assert [i for _, i, _ in idle.idle] == sorted((i for _, i, _ in idle.idle), reverse=True)
    assert idle.client_addr == sandbox.network.host_ip
    assert not [g for g in s.groups if g.application_name == "connbudget-probe"]


def test_terminate_ends_only_backends_still_idle_and_unchanged(sandbox: Sandbox) -> None:
    db = sandbox.db

    async def main(busy_pid: int) -> tuple[Termination, ServerSample]:
        m = Monitor(db.monitor_dsn)
        try:
            s = await m.sample()
            g = next(
                g for g in s.groups if g.application_name == "probe-test-t" and g.state == "idle"
            )
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
            # The busy backend is offered too, as if it had been idle at the probe: it must stay.
            busy_start = (
                next(t for p, _, t in g.idle if p == busy_pid)
                if any(p == busy_pid for p, _, _ in g.idle)
                else 0.0
            )
            targets.append(
                IdleBackend(
                    pid=busy_pid,
                    pod="x",
                    idle_seconds=99,
                    backend_start=busy_start,
                    state_change=s.sampled_at - 99,
                )
            )
            done = await m.terminate(targets)
            # pg_terminate_backend signals; the backends leave pg_stat_activity a moment later.
            for _ in range(50):
                after = await m.sample()
                if "idle" not in groups_of(after, "probe-test-t"):
                    break
                await asyncio.sleep(0.1)
            return done, after
        finally:
            await m.close()

    with connections(db.app_dsn, 3, "probe-test-t") as conns:
        busy = conns[0]
        busy_pid = busy.info.backend_pid
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        done, after = asyncio.run(main(busy_pid))
        assert sorted(done.terminated) == sorted(c.info.backend_pid for c in conns[1:])
        assert done.not_permitted == ()
        assert groups_of(after, "probe-test-t") == {"idle in transaction": 1}
        assert busy.execute("SELECT 1").fetchone() == (1,)


def test_wrong_password_is_reported_without_the_password(sandbox: Sandbox) -> None:
    db = sandbox.db
    bad = db.dsn("connbudget_monitor", "not-the-Passw0rd", db.pg_port, "app")

    async def main() -> ProbeError:
        m = Monitor(bad)
        with pytest.raises(ProbeError) as err:
            await m.sample()
        # A second attempt within the backoff does not hammer the server.
        with pytest.raises(ProbeError, match="retrying with backoff") as again:
            await m.sample()
        # ... and says the same as the attempt, so the problem is announced once, not per poll.
        assert str(again.value) == str(err.value)
        return err.value

    err = asyncio.run(main())
    assert err.failure is ProbeFailure.AUTHENTICATION_FAILED
    assert "not-the-Passw0rd" not in str(err)


@pytest.mark.parametrize(
    "dsn",
    ["host=localhost password=s3cret-Value dbname", "postgresql://u:s3cret-Value@h:notaport/db"],
)
def test_a_malformed_dsn_is_reported_without_its_content(dsn: str) -> None:
    async def main() -> ProbeError:
        with pytest.raises(ProbeError) as err:
            await Monitor(dsn).sample()
        return err.value

    err = asyncio.run(main())
    assert err.failure in (ProbeFailure.DSN_INVALID, ProbeFailure.DATABASE_UNREACHABLE)
    assert "s3cret-Value" not in str(err)


def test_backends_a_role_without_pg_signal_backend_may_not_signal_are_left_alone(
    sandbox: Sandbox,
) -> None:
    # pg_terminate_backend raises an ERROR for another role's backend without pg_signal_backend:
    # the statement leaves it alone and says so, and the cycle reports the termination refused.
    db = sandbox.db
    with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
        su.execute("DROP ROLE IF EXISTS watcher_only")
        su.execute("CREATE ROLE watcher_only LOGIN PASSWORD 'w-pass' IN ROLE pg_monitor")
    dsn = db.dsn("watcher_only", "w-pass", db.pg_port, "app")

    async def main() -> tuple[int, Termination]:
        m = Monitor(dsn)
        try:
            s = await m.sample()
            g = next(g for g in s.groups if g.application_name == "probe-test-p" and g.idle)
            p, i, t = g.idle[0]
            chosen = IdleBackend(
                pid=p, pod="x", idle_seconds=i, backend_start=t, state_change=s.sampled_at - i
            )
            return p, await m.terminate([chosen])
        finally:
            await m.close()

    with connections(db.app_dsn, 1, "probe-test-p") as (conn,):
        pid, done = asyncio.run(main())
        assert done == Termination(not_permitted=(pid,))
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_budgets_sharing_a_database_share_one_connection(sandbox: Sandbox) -> None:
    db = sandbox.db

    async def main() -> int:
        pool = MonitorPool()
        try:
            for i in range(5):
                await (await pool.bind(f"ns/b{i}", db.monitor_dsn)).sample()
            s = await (await pool.bind("ns/b0", db.monitor_dsn)).sample()
            assert pool.open_connections == 1
            return sum(g.count for g in s.groups if g.application_name == "connbudget-probe")
        finally:
            await pool.close()

    # The sample leaves out its own backend: no other probe connection exists.
    assert asyncio.run(main()) == 0


def test_the_monitor_keeps_seeing_when_the_server_is_full(sandbox: Sandbox) -> None:
    db = sandbox.db

    async def main() -> None:
        m = Monitor(db.monitor_dsn)
        try:
            before = await m.sample()
            free = db.max_connections - before.reserved - before.total - 1  # the monitor's own
            with connections(db.app_dsn, free, "probe-test-full"):
                with pytest.raises(psycopg.OperationalError, match=r"reserved|too many"):
                    psycopg.connect(db.app_dsn, connect_timeout=5).close()
                full = await m.sample()
                assert groups_of(full, "probe-test-full") == {"idle": free}
        finally:
            await m.close()

    asyncio.run(main())


def test_pgbouncer_clients_and_server_connections_are_seen_per_pooler_pod(sandbox: Sandbox) -> None:
    db = sandbox.db
    with connections(db.app_pooler_dsn, 3, "pooled-test") as conns:
        for c in conns:  # in session mode, PgBouncer takes a server connection at the first query
            c.execute("SELECT 1")
        s = asyncio.run(sample_poolers(db.bouncer_admin_dsn, [db.host], replicas=1))
    assert s.errors == ()
    mine = [c for c in s.clients if c.application_name == "pooled-test"]
    assert len(mine) == 3
    assert {c.addr for c in mine} == {sandbox.network.host_ip}
    assert s.server_connections >= 3
    assert s.clients_waiting == 0


def test_an_unreachable_pooler_pod_is_an_error_not_a_crash(sandbox: Sandbox) -> None:
    db = sandbox.db
    s = asyncio.run(sample_poolers(db.bouncer_admin_dsn, ["127.0.0.2"], replicas=1))
    assert len(s.errors) == 1
    assert db.bouncer_admin_password not in s.errors[0]
    assert s.failure is None  # waiting may cure it


def test_a_wrong_admin_password_is_a_failure_for_the_user(sandbox: Sandbox) -> None:
    db = sandbox.db
    wrong = psycopg.conninfo.make_conninfo(db.bouncer_admin_dsn, password="not-the-password")
    s = asyncio.run(sample_poolers(wrong, [db.host], replicas=1))
    assert len(s.errors) == 1
    assert s.failure == "AuthenticationFailed"
    assert "not-the-password" not in s.errors[0]
