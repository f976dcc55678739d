"""The per-poll sample against every PostgreSQL major: the monitor groups the backends itself and
asks the detail of only what changed, and what it hands on is what the server's own grouping
(``SERVER_GROUPS``, the query each poll ran before) says of the same backends."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from connbudget.model.observations import PROBE_APPLICATION_NAME, ServerSample
from connbudget.probe import backends, queries
from connbudget.probe.postgres import Monitor
from integration.conftest import VersionServer

# The backends grouped by the server: the query each poll ran before ``queries.BACKEND_SAMPLE``
# (the operator no longer runs it), kept here as the reference the monitor's own grouping is
# checked against.
SERVER_GROUPS = """
SELECT h.now_s, h.db, h.max_conn, h.reserved,
       (SELECT datname FROM pg_database WHERE oid = g.datid),
       (SELECT rolname FROM pg_roles WHERE oid = g.usesysid),
       g.app, host(g.client_addr), g.state, g.n, g.hidden, g.max_idle, g.oldest,
       g.pids, g.detail_pids, g.detail_changed, g.detail_started
FROM (
    SELECT date_part('epoch', now()) AS now_s,
           current_database() AS db,
           current_setting('max_connections')::int AS max_conn,
           current_setting('superuser_reserved_connections')::int
               + coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved
) h LEFT JOIN (
    SELECT datid, usesysid, coalesce(application_name, '') AS app, client_addr, state,
           count(*)::int AS n,
           count(*) FILTER (WHERE backend_type IS NULL)::int AS hidden,
           coalesce(date_part('epoch', now() - min(state_change) FILTER (WHERE state = 'idle')), 0)
               AS max_idle,
           coalesce(date_part('epoch', min(backend_start)), date_part('epoch', now())) AS oldest,
           array_agg(pid) AS pids,
           array_agg(pid) FILTER (WHERE detail) AS detail_pids,
           array_agg(coalesce(date_part('epoch', coalesce(state_change, backend_start)),
                              date_part('epoch', now()))) FILTER (WHERE detail) AS detail_changed,
           array_agg(coalesce(date_part('epoch', backend_start), date_part('epoch', now())))
               FILTER (WHERE detail) AS detail_started
    FROM (
        SELECT *,
               (%(since)s::timestamptz IS NULL OR backend_type IS NULL
                OR state_change > %(since)s::timestamptz
                OR backend_start > %(since)s::timestamptz) AS detail
        FROM pg_stat_get_activity(NULL)
        WHERE (backend_type = 'client backend' OR (backend_type IS NULL AND usesysid IS NOT NULL))
          AND pid <> pg_backend_pid()
    ) a
    GROUP BY datid, usesysid, coalesce(application_name, ''), client_addr, state
) g ON true
"""

CLIENTS = 8  # the matrix's servers have 20 slots
ROUNDS = 4


def test_epochs_and_idle_ages_are_the_servers_to_the_microsecond(pg: VersionServer) -> None:
    """``micros`` recovers a timestamp's microseconds from its float8 epoch, and
    ``interval_epoch`` is ``date_part('epoch', a - b)``, for ages from microseconds to years."""
    rng = random.Random(pg.major)
    ages = [0.0, 1e-6, 0.5, 86_399.999_999, 86_400.0, 86_400.000_001, 3e7, -0.25, -90_000.5]
    ages += [rng.uniform(-1e5, 1e8) for _ in range(300)]
    with psycopg.connect(pg.db.monitor_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT date_part('epoch', now()), date_part('epoch', t),"
            " (extract(epoch FROM now()) * 1000000)::int8,"
            " (extract(epoch FROM t) * 1000000)::int8, date_part('epoch', now() - t)"
            " FROM unnest(%s::float8[]) AS a(age), LATERAL (SELECT now() - make_interval("
            "secs => a.age) AS t) x",
            (ages,),
        ).fetchall()
    for now_s, t_s, now_us, t_us, age in rows:
        assert backends.micros(now_s) == now_us
        assert backends.micros(t_s) == t_us
        assert backends.interval_epoch(now_us - t_us) == age


@contextlib.contextmanager
def clients(dsn: str, n: int) -> Iterator[list[psycopg.Connection[Any]]]:
    conns = [
        psycopg.connect(dsn, autocommit=True, application_name=f"sample-{i}") for i in range(n)
    ]
    try:
        yield conns
    finally:
        for c in conns:
            c.close()


def server_groups(dsn: str) -> tuple[float, dict[tuple[Any, ...], tuple[Any, ...]]]:
    """The server's grouping of the client backends (the query each poll ran before), every
    backend in detail: group -> (count, hidden, longest idle, oldest start, pid -> times)."""
    with psycopg.connect(dsn, autocommit=True, application_name=PROBE_APPLICATION_NAME) as c:
        rows = c.execute(SERVER_GROUPS, {"since": None}).fetchall()
    out = {}
    for r in rows:
        if r[9] is None:
            continue
        datname, user, app, addr, state, n, hidden, max_idle, oldest = r[4:13]
        pids, _, changed, started = r[13:17]
        times = dict(zip(pids, zip(changed, started, strict=True), strict=True))
        out[(datname, user, app, addr, state)] = (n, hidden, max_idle, oldest, times)
    return float(rows[0][0]), out


def compare(sample: ServerSample, now: float, server: dict[tuple[Any, ...], Any]) -> None:
    """The monitor's sample and the server's grouping, taken one after the other of a server at
    rest: the same groups, members, starts, and the same moments (the two ``now`` differ)."""
    mine = {
        (g.database, g.user, g.application_name, g.client_addr, g.state): g
        for g in sample.groups
        if g.application_name != PROBE_APPLICATION_NAME
    }
    theirs = {k: v for k, v in server.items() if k[2] != PROBE_APPLICATION_NAME}
    assert set(mine) == set(theirs)
    for key, g in mine.items():
        n, _, max_idle, oldest, times = theirs[key]
        assert g.count == n == len(g.backends)
        assert {pid for pid, _, _ in g.backends} == set(times)
        assert g.oldest_backend_start == oldest
        for pid, in_state, start in g.backends:
            changed, started = times[pid]
            assert start == started
            assert sample.sampled_at - in_state == pytest.approx(changed, abs=2e-6)
        in_states = [s for _, s, _ in g.backends]
        assert in_states == sorted(in_states, reverse=True)
        if g.state == "idle":
            assert sample.sampled_at - g.max_idle_seconds == pytest.approx(now - max_idle, abs=2e-6)
        else:
            assert g.max_idle_seconds == max_idle == 0.0
    assert sample.hidden == sum(v[1] for v in theirs.values())


def test_the_monitors_groups_are_the_servers_poll_after_poll(pg: VersionServer) -> None:
    """Backends end, open, change application and state between polls (some keep their count
    with other members); each sample, asking only what changed, equals the server's grouping."""
    db = pg.db
    rng = random.Random(pg.major * 7919)

    async def poll(m: Monitor) -> ServerSample:
        return await m.sample()

    loop = asyncio.new_event_loop()
    m = Monitor(db.monitor_dsn)
    asked: list[tuple[bool, int, int]] = []  # per query: every detail, pids, backends in detail
    run_locked = m._run_locked

    async def spy(query: Any, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        rows = await run_locked(query, params)
        if query is queries.BACKEND_SAMPLE:
            pids, detail = rows[0][4] or [], rows[0][5] or []
            asked.append(((params or {}).get("since") is None, len(pids), len(detail)))
        return rows

    m._run_locked = spy  # type: ignore[method-assign]
    try:
        with clients(db.app_dsn, CLIENTS) as conns:
            loop.run_until_complete(poll(m))  # every detail
            for _ in range(ROUNDS):
                for i, c in enumerate(conns):
                    choices = ["keep", "keep", "keep", "app", "begin", "end", "query"]
                    what = "keep" if i == 0 else rng.choice(choices)  # one is always left alone
                    if what == "keep":
                        continue
                    if c.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        c.execute("COMMIT")
                    if what == "app":
                        c.execute(
                            "SELECT set_config('application_name', %s, false)",
                            (f"sample-{rng.randrange(3)}",),
                        )
                    elif what == "begin":
                        c.execute("BEGIN")
                        c.execute("SELECT 1")
                    elif what == "query":
                        c.execute("SELECT 1")
                    elif what == "end":  # and another opens
                        c.close()
                        conns[i] = psycopg.connect(
                            db.app_dsn, autocommit=True, application_name=f"sample-{i % 3}"
                        )
                # Each change is older than the margin at the poll: the backends left alone at the
                # next round come without detail.
                time.sleep(backends.DETAIL_MARGIN_SECONDS + 0.2)
                sample = loop.run_until_complete(poll(m))
                now, server = server_groups(db.monitor_dsn)
                compare(sample, now, server)
        # After the first, no poll asked every detail again, and each left out what stayed alone
        # (but the first after it: every backend had opened within the margin).
        assert [every for every, _, _ in asked] == [True] + [False] * ROUNDS
        assert all(n > d for _, n, d in asked[2:]), asked
    finally:
        loop.run_until_complete(m.close())
        loop.close()


def test_a_role_renamed_under_its_backends_is_named_anew(pg: VersionServer) -> None:
    db = pg.db
    with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
        su.execute("DROP ROLE IF EXISTS sample_old, sample_new")
        su.execute("CREATE ROLE sample_old LOGIN PASSWORD 'sample-pw'")
        dsn = psycopg.conninfo.make_conninfo(db.app_dsn, user="sample_old", password="sample-pw")
        loop = asyncio.new_event_loop()
        m = Monitor(db.monitor_dsn)
        try:
            with psycopg.connect(dsn, autocommit=True, application_name="renamed"):
                before = loop.run_until_complete(m.sample())
                su.execute("ALTER ROLE sample_old RENAME TO sample_new")
                after = loop.run_until_complete(m.sample())
        finally:
            loop.run_until_complete(m.close())
            loop.close()
            su.execute("DROP ROLE IF EXISTS sample_old, sample_new")
    assert [g.user for g in before.groups if g.application_name == "renamed"] == ["sample_old"]
    assert [g.user for g in after.groups if g.application_name == "renamed"] == ["sample_new"]
