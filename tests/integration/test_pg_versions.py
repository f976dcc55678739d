"""The probe, the termination and the monitoring role on every supported PostgreSQL major.

Each test runs once per major (the ``pg`` fixture: 15, 16, 17 and 18). The probe's own integration
tests (``test_probe``, ``test_terminate_predicates``) are run again here against each major, as
they are: they read only the server's DSNs and where clients connect from. The tests written here
cover what differs between majors: the reserved slots (``reserved_connections`` and the
``pg_use_reserved_connections`` role exist from 16), every statement of ``probe.queries`` as the
monitoring role, and that role's least privileges.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

from connbudget.model.observations import ServerSample
from connbudget.probe import queries
from connbudget.probe.postgres import Monitor
from integration import test_probe, test_terminate_predicates
from integration.conftest import VersionServer
from sandbox.core import Sandbox
from sandbox.postgres import MONITOR_ROLE

APP = "pg-versions"

# The sandbox's probe tests that read only ``sandbox.db`` and ``sandbox.network.host_ip``.
REUSED: list[Callable[[Sandbox], None]] = [
    test_terminate_predicates.test_an_idle_in_transaction_backend_is_protected_by_the_state_predicate,
    test_terminate_predicates.test_an_active_backend_is_protected_by_the_state_predicate,
    test_terminate_predicates.test_a_backend_used_again_since_the_probe_is_protected_by_the_state_change_predicate,
    test_terminate_predicates.test_a_reused_pid_is_protected_by_the_backend_start_predicate,
    test_terminate_predicates.test_a_backend_used_again_is_protected_beside_a_long_idle_one_in_the_same_batch,
    test_terminate_predicates.test_a_superusers_backend_is_left_alone_and_the_rest_of_the_batch_terminated,
    test_probe.test_terminate_ends_only_backends_still_idle_and_unchanged,
    test_probe.test_backends_a_role_without_pg_signal_backend_may_not_signal_are_left_alone,
    test_probe.test_budgets_sharing_a_database_share_one_connection,
    test_probe.test_the_monitor_keeps_seeing_when_the_server_is_full,
    test_probe.test_wrong_password_is_reported_without_the_password,
    test_probe.test_pgbouncer_clients_and_server_connections_are_seen_per_pooler_pod,
]


@pytest.mark.parametrize("check", REUSED, ids=lambda f: f.__name__.removeprefix("test_"))
def test_the_probe_tests_pass_on_this_major(
    pg: VersionServer, check: Callable[[Sandbox], None]
) -> None:
    check(pg.as_sandbox())


@contextlib.contextmanager
def connections(dsn: str, n: int) -> Iterator[list[psycopg.Connection[Any]]]:
    conns = [psycopg.connect(dsn, autocommit=True, application_name=APP) for _ in range(n)]
    try:
        yield conns
    finally:
        for c in conns:
            c.close()


def sample(dsn: str) -> ServerSample:
    async def main() -> ServerSample:
        m = Monitor(dsn)
        try:
            return await m.sample()
        finally:
            await m.close()

    return asyncio.run(main())


def test_the_server_is_the_major_under_test(pg: VersionServer) -> None:
    with psycopg.connect(pg.db.superuser_dsn, autocommit=True) as su:
        row = su.execute("SELECT current_setting('server_version_num')::int").fetchone()
    assert row is not None
    assert row[0] // 10000 == pg.major, pg.version


def test_every_probe_statement_runs_as_the_monitoring_role(pg: VersionServer) -> None:
    with psycopg.connect(pg.db.monitor_dsn, autocommit=True) as m:
        for since in (None, dt.datetime(2001, 9, 9, tzinfo=dt.UTC)):
            row = m.execute(queries.BACKEND_SAMPLE, {"since": since}).fetchone()
            assert row is not None
            assert len(row) == 8
        assert m.execute(queries.WARM_UP).fetchone() is not None
        assert m.execute(queries.COUNT_FLOOR).fetchone() is not None
        nothing = m.execute(queries.TERMINATE_IDLE, {"pids": [], "starts": [], "changes": []})
        assert nothing.fetchall() == []
        none = m.execute(queries.STATEMENTS, {"pids": [], "starts": []}).fetchone()
        assert none == ([],)


def test_the_sample_counts_every_state_and_the_reserved_slots(pg: VersionServer) -> None:
    db = pg.db
    with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
        has_reserved = su.execute(
            "SELECT count(*) FROM pg_settings WHERE name = 'reserved_connections'"
        ).fetchone()
    assert has_reserved == ((1,) if pg.major >= 16 else (0,))
    with connections(db.app_dsn, 4) as conns:
        conns[0].execute("BEGIN")
        conns[0].execute("SELECT 1")  # idle in transaction
        busy = threading.Thread(target=lambda: conns[1].execute("SELECT pg_sleep(1.5)"))
        busy.start()
        try:
            for _ in range(50):
                s = sample(db.monitor_dsn)
                if "active" in {g.state for g in s.groups if g.application_name == APP}:
                    break
        finally:
            busy.join(timeout=10)
    mine = {g.state: g.count for g in s.groups if g.application_name == APP}
    assert mine == {"idle": 2, "idle in transaction": 1, "active": 1}
    assert s.max_connections == db.max_connections
    assert s.reserved == pg.reserved  # 3, and 5 from 16 (superuser_reserved + reserved_connections)
    assert s.database == "app"
    idle = next(g for g in s.groups if g.application_name == APP and g.state == "idle")
    assert len(idle.idle) == 2
    assert [i for _, i, _ in idle.idle] == sorted((i for _, i, _ in idle.idle), reverse=True)
    assert {g.client_addr for g in s.groups if g.application_name == APP} == {"127.0.0.1"}
    assert {g.user for g in s.groups if g.application_name == APP} == {"app"}
    assert not [g for g in s.groups if g.application_name == "connbudget-probe"]


def test_the_last_statements_of_asked_backends_are_read_as_the_monitoring_role(
    pg: VersionServer,
) -> None:
    # What a leaking workload's abandoned connections last ran (policy.culprits), with the
    # query_id PostgreSQL computes when told to (compute_query_id; off by default without
    # pg_stat_statements).
    db = pg.db
    statement = "SELECT count(*) FROM pg_class WHERE relname <> 'planted-S3cret-literal'"
    with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
        su.execute("ALTER ROLE app SET compute_query_id = on")  # set only by a superuser
        try:
            first = psycopg.connect(db.app_dsn, autocommit=True, application_name=APP)
        finally:
            su.execute("ALTER ROLE app RESET compute_query_id")
    first_pid = first.info.backend_pid
    with first, connections(db.app_dsn, 2) as others:
        conns = [first, *others]
        for c in conns:
            c.execute(statement)
        s = sample(db.monitor_dsn)
        idle = next(g for g in s.groups if g.application_name == APP and g.state == "idle")
        asked = [(pid, start) for pid, _, start in idle.backends]
        gone = (999_999, 0.0)  # no such backend: left out, not an error

        async def main() -> list[Any]:
            m = Monitor(db.monitor_dsn)
            try:
                return await m.statements([*asked, gone])
            finally:
                await m.close()

        found = asyncio.run(main())
    assert sorted((r.pid, r.backend_start) for r in found) == sorted(asked)
    assert {r.query for r in found} == {statement}
    with_id = [r for r in found if r.pid == first_pid]
    assert with_id[0].query_id is not None
    assert len([r for r in found if r.query_id is None]) == 2


def test_a_role_without_pg_read_all_stats_still_counts_and_says_what_it_cannot_see(
    pg: VersionServer,
) -> None:
    # Without pg_read_all_stats, other roles' backends show no backend_type, state, address or
    # statement. Before, the probe's filter on backend_type left them out: a budget of 0.
    db = pg.db
    weak = psycopg.conninfo.make_conninfo(db.monitor_dsn, user="weak_probe", password="weak-pw")
    with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
        su.execute("DROP ROLE IF EXISTS weak_probe")
        su.execute("CREATE ROLE weak_probe LOGIN PASSWORD 'weak-pw'")
        try:
            with connections(db.app_dsn, 3):
                blind, seeing = sample(weak), sample(db.monitor_dsn)
        finally:
            su.execute("DROP ROLE weak_probe")
    mine = [g for g in blind.groups if g.application_name == APP]
    assert [(g.state, g.count, g.client_addr, g.database, g.user) for g in mine] == [
        (None, 3, None, "app", "app")
    ]
    assert blind.hidden >= 3
    assert seeing.hidden == 0
    assert sum(g.count for g in seeing.groups if g.application_name == APP) == 3


def test_the_monitoring_role_has_only_what_the_probe_needs(pg: VersionServer) -> None:
    db = pg.db
    with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
        flags = su.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname = %s",
            (MONITOR_ROLE,),
        ).fetchone()
        granted = {
            r
            for (r,) in su.execute(
                "SELECT g.rolname FROM pg_auth_members m"
                " JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member"
                " WHERE u.rolname = %s",
                (MONITOR_ROLE,),
            )
        }
        su_pid = su.info.backend_pid
        with connections(db.app_dsn, 1) as (app,), psycopg.connect(db.monitor_dsn) as m:
            m.autocommit = True
            app.execute("CREATE TABLE IF NOT EXISTS app_secret (x int)")
            app.execute("SELECT 'the app query text' AS marker")
            # pg_read_all_stats (in pg_monitor): every backend's query is visible, not hidden.
            seen = m.execute(
                "SELECT query FROM pg_stat_activity WHERE pid = %s", (app.info.backend_pid,)
            ).fetchone()
            assert seen == ("SELECT 'the app query text' AS marker",)
            # ... and nothing of the app's data, nor a place to write.
            with pytest.raises(errors.InsufficientPrivilege):
                m.execute("SELECT * FROM app_secret")
            with pytest.raises(errors.InsufficientPrivilege):
                m.execute("CREATE TABLE monitor_owned (x int)")
            # pg_signal_backend never reaches a superuser's backend ...
            with pytest.raises(errors.InsufficientPrivilege):
                m.execute("SELECT pg_terminate_backend(%s)", (su_pid,))
            # ... which the termination statement leaves alone, and says so (not an error).
            row = m.execute(
                "SELECT extract(epoch FROM backend_start)::float8,"
                " date_part('epoch', state_change) FROM pg_stat_activity WHERE pid = %s",
                (su_pid,),
            ).fetchone()
            assert row is not None
            left = m.execute(
                queries.TERMINATE_IDLE, {"pids": [su_pid], "starts": [row[0]], "changes": [row[1]]}
            ).fetchall()
            assert left == [(su_pid, False, False)]
            app.execute("DROP TABLE app_secret")
        assert su.execute("SELECT 1").fetchone() == (1,)
    assert flags == (False, False, False, False, False)
    assert granted == {"pg_monitor", "pg_signal_backend"}


def test_reserved_slots_admit_the_monitor_only_with_pg_use_reserved_connections(
    pg: VersionServer,
) -> None:
    db = pg.db
    with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
        role = su.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'pg_use_reserved_connections'"
        ).fetchone()
        assert role == ((1,) if pg.major >= 16 else (0,))
        with contextlib.ExitStack() as stack:
            # Fill the server until an ordinary role is refused: only reserved slots remain.
            refused: psycopg.OperationalError | None = None
            for _ in range(db.max_connections):
                try:
                    stack.enter_context(psycopg.connect(db.app_dsn, connect_timeout=5))
                except psycopg.OperationalError as e:
                    refused = e
                    break
            assert refused is not None
            assert "reserved" in str(refused), refused
            with pytest.raises(psycopg.OperationalError, match="reserved"):
                psycopg.connect(db.monitor_dsn, connect_timeout=5).close()
            if pg.major < 16:
                return  # only superusers may use reserved slots before 16
            su.execute(f"GRANT pg_use_reserved_connections TO {MONITOR_ROLE}")
            try:
                with psycopg.connect(db.monitor_dsn, connect_timeout=5) as m:
                    assert m.execute("SELECT 1").fetchone() == (1,)
            finally:
                su.execute(f"REVOKE pg_use_reserved_connections FROM {MONITOR_ROLE}")
