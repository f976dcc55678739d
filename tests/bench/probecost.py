"""Benchmark 3: what the operator's probe costs, against its floor, in the same run.

The probe is the operator's own code: ``connbudget.probe.postgres.Monitor.sample()``, the one query
each budget runs per poll (and its decoding into ``ServerSample``). The floor is
``SELECT count(*) FROM pg_stat_activity`` (the cheapest possible look at the same data) on a
connection opened the same way, against the same server, interleaved with the probe so both see
the same load. Client backends are idle connections of the app role spread over 100 application
names (as 100 pods would be), each of which ran a statement with literals before going idle, as an
app's connection has. At 1,000 backends a third call is timed with them: what a poll adds when a
new leak is seen, ``Monitor.statements()`` for ``MAX_ASKED_PER_POLL`` (100) idle backends (the most
the operator asks about in one poll) and ``statement_of()`` over each answer, and its query alone
(no decoding, no normalising). The operator asks about each connection once in its life and only
while a workload leaks, so a poll that asks the full 100 is its worst case. The PgBouncer figures
use ``sample_poolers`` (what the operator runs per poll and pooler pod: connect, ``SHOW POOLS``,
``SHOW CLIENTS``) and ``SHOW CLIENTS`` alone on an open admin connection, with 1,000 clients
connected through PgBouncer.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from bench.common import Server, Spread, say
from connbudget.model.observations import PROBE_APPLICATION_NAME, ServerSample
from connbudget.policy import culprits, fingerprint
from connbudget.probe import backends, queries
from connbudget.probe.pgbouncer import sample_poolers
from connbudget.probe.postgres import PROBE_OPTIONS, Monitor

BACKENDS = (100, 1000)
PODS = 100  # application names the backends are spread over
ITERATIONS = 100  # timed calls of each kind per repeat
WARMUP = 10
APP_PREFIX = "pod-"  # application names of the held client connections: pod-0 .. pod-99
# What each held client connection last ran (an ORM's lookup of a user, about 120 characters),
# its literals different on every connection, as an app's are.
LAST_STATEMENT = sql.SQL(
    'SELECT "u"."id", "u"."email" FROM (VALUES ({id}, {email})) AS "u"("id", "email") '
    'WHERE "u"."id" = {id} LIMIT 21'
)


# The reference the issue names for a poll within a budget: a grouped count over the same view.
GROUPED_COUNT = (
    "SELECT datname, usename, application_name, client_addr, state, count(*) "
    "FROM pg_stat_activity GROUP BY 1, 2, 3, 4, 5"
)


def last_statement(i: int) -> sql.Composed:
    """The statement the ``i``-th held connection runs before going idle."""
    return LAST_STATEMENT.format(id=sql.Literal(i), email=sql.Literal(f"user{i}@example.com"))


def idle_backends(
    sample: ServerSample, n: int, *, prefix: str = APP_PREFIX
) -> list[tuple[int, float]]:
    """``(pid, backend_start)`` of the first ``n`` idle backends of applications named ``prefix*``
    in ``sample``: what the operator passes to ``Monitor.statements()`` for a leak's connections."""
    found = [
        (pid, start)
        for g in sample.groups
        if g.application_name.startswith(prefix)
        for pid, _, start in g.idle
    ]
    return found[:n]


def step_figures(medians: Sequence[Mapping[str, float]]) -> dict[str, Spread]:
    """One step's figures from each repeat's median seconds per kind of call.

    Times in ms, ratios to the floor of the same repeat. The statement figures only when every
    repeat timed ``statements``, its query alone (``statements_query``) and ``poll`` (the probe
    and the statements of one iteration added up: a poll that sees a new leak).
    """
    out = {
        "probe_ms": Spread.of(m["probe"] * 1000 for m in medians),
        "floor_ms": Spread.of(m["floor"] * 1000 for m in medians),
        "ratio": Spread.of(m["probe"] / m["floor"] for m in medians),
        "query_ms": Spread.of(m["query"] * 1000 for m in medians),
        "query_ratio": Spread.of(m["query"] / m["floor"] for m in medians),
    }
    if medians and all({"grouped", "full"} <= set(m) for m in medians):
        out["grouped_ms"] = Spread.of(m["grouped"] * 1000 for m in medians)
        out["grouped_ratio"] = Spread.of(m["grouped"] / m["floor"] for m in medians)
        out["probe_vs_grouped"] = Spread.of(m["probe"] / m["grouped"] for m in medians)
        out["full_ms"] = Spread.of(m["full"] * 1000 for m in medians)
        out["full_ratio"] = Spread.of(m["full"] / m["floor"] for m in medians)
    if medians and all({"statements", "statements_query", "poll"} <= set(m) for m in medians):
        out["statements_ms"] = Spread.of(m["statements"] * 1000 for m in medians)
        out["statements_ratio"] = Spread.of(m["statements"] / m["floor"] for m in medians)
        out["statements_query_ms"] = Spread.of(m["statements_query"] * 1000 for m in medians)
        out["with_statements_ms"] = Spread.of(m["poll"] * 1000 for m in medians)
        out["with_statements_ratio"] = Spread.of(m["poll"] / m["floor"] for m in medians)
    return out


def open_clients(
    dsn: str, n: int, *, offset: int = 0, pooler: bool = False
) -> list[psycopg.Connection[Any]]:
    """Open ``n`` idle connections (8 at a time), named as ``PODS`` pods would name them."""

    def one(i: int) -> psycopg.Connection[Any]:
        # PgBouncer refuses the options startup parameter.
        conn = psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=10,
            prepare_threshold=None,
            application_name=f"{APP_PREFIX}{i % PODS}",
            options=None if pooler else "-c idle_session_timeout=0",
        )
        if not pooler:
            # Through PgBouncer a statement would tie a server connection to each client.
            conn.execute(last_statement(i)).fetchall()
        return conn

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(offset, offset + n)))


async def _timed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


@dataclass
class Timings:
    """Per repeat, the median seconds of each kind of call; what the statements call fetched."""

    medians: list[dict[str, float]] = field(default_factory=list)
    asked: int = 0  # backends passed to Monitor.statements()
    found: int = 0  # statements it returned
    shown: int = 0  # of those, statements statement_of() had a shape for
    chars: float = 0.0  # median length of the raw statements returned


async def _probe_vs_floor(dsn: str, repeats: int, iterations: int, *, ask: int = 0) -> Timings:
    """Per repeat: the median seconds of the probe, the floor, the probe's query alone and (with
    ``ask``) the statements of ``ask`` idle client backends, interleaved call by call."""
    monitor = Monitor(dsn)
    floor_conn = await psycopg.AsyncConnection.connect(
        dsn,
        autocommit=True,
        application_name=PROBE_APPLICATION_NAME,
        options=PROBE_OPTIONS,
    )

    async def floor() -> object:
        cur = await floor_conn.execute(queries.COUNT_FLOOR)
        return await cur.fetchall()

    async def grouped() -> object:
        cur = await floor_conn.execute(GROUPED_COUNT)
        return await cur.fetchall()

    async def full_detail() -> object:
        # A poll in which every backend is new or changed (the first one, or a busy server).
        cur = await floor_conn.execute(queries.BACKEND_SAMPLE, {"since": None})
        (row,) = await cur.fetchall()
        return backends.decode(row, None)

    try:
        # The probe's query as the monitor sends it, asking detail for backends changed since
        # its last sample (the held connections here stay idle: none did).
        since = {"since": backends.detail_since(await monitor.sample())}

        async def query_only() -> object:
            cur = await floor_conn.execute(queries.BACKEND_SAMPLE, since)
            return await cur.fetchall()

        timings = Timings()
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "probe": monitor.sample,
            "floor": floor,
            "query": query_only,
            "grouped": grouped,
            "full": full_detail,
        }
        if ask:
            asked = idle_backends(await monitor.sample(), ask)
            if len(asked) < ask:
                raise RuntimeError(
                    f"only {len(asked)} idle client backends to ask about, not {ask}"
                )

            async def statements() -> object:
                # What a poll that sees a new leak adds: ask, then normalise each answer.
                got = await monitor.statements(asked)
                return [fingerprint.statement_of(s.query, s.query_id) for s in got]

            params = {"pids": [pid for pid, _ in asked], "starts": [t for _, t in asked]}

            async def statements_query() -> object:
                cur = await floor_conn.execute(queries.STATEMENTS, params)
                return await cur.fetchall()

            calls["statements"] = statements
            calls["statements_query"] = statements_query
            first = await monitor.statements(asked)
            timings.asked = len(asked)
            timings.found = len(first)
            timings.shown = sum(
                1 for s in first if fingerprint.statement_of(s.query, s.query_id) is not None
            )
            timings.chars = statistics.median(len(s.query) for s in first) if first else 0.0
        for fn in calls.values():
            await _timed(fn, WARMUP)
        for _ in range(repeats):
            times: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(iterations):
                for k, fn in calls.items():
                    times[k] += await _timed(fn, 1)
                if ask:
                    # A poll that sees a new leak runs both, one after the other.
                    times.setdefault("poll", []).append(
                        times["probe"][-1] + times["statements"][-1]
                    )
            timings.medians.append({k: statistics.median(v) for k, v in times.items()})
        return timings
    finally:
        await monitor.close()
        await floor_conn.close()


async def _pooler(server: Server, repeats: int, iterations: int) -> dict[str, list[float]]:
    info = server.info
    template = info.bouncer_admin_dsn
    admin = await psycopg.AsyncConnection.connect(
        template, autocommit=True, prepare_threshold=None, cursor_factory=psycopg.AsyncClientCursor
    )

    async def show_clients() -> object:
        cur = await admin.execute(queries.SHOW_CLIENTS)
        return await cur.fetchall()

    async def show_version() -> object:
        cur = await admin.execute("SHOW VERSION")
        return await cur.fetchall()

    async def per_poll() -> object:
        sample = await sample_poolers(template, [info.host], replicas=1)
        assert not sample.errors, sample.errors
        return sample

    out: dict[str, list[float]] = {"show_clients": [], "show_version": [], "per_poll": []}
    try:
        for _ in range(repeats):
            sc: list[float] = []
            sv: list[float] = []
            pp: list[float] = []
            for _ in range(iterations):
                sc += await _timed(show_clients, 1)
                sv += await _timed(show_version, 1)
            for _ in range(max(iterations // 5, 5)):
                pp += await _timed(per_poll, 1)
            out["show_clients"].append(statistics.median(sc))
            out["show_version"].append(statistics.median(sv))
            out["per_poll"].append(statistics.median(pp))
        cur = await admin.execute(queries.SHOW_CLIENTS)
        names = [d.name for d in cur.description or []]
        rows = [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
        # The admin console's own session is a client too; the operator leaves it out.
        out["clients_seen"] = [float(sum(1 for r in rows if r.get("database") != "pgbouncer"))]
    finally:
        await admin.close()
    return out


def run(server: Server, *, repeats: int, quick: bool) -> dict[str, Any]:
    iterations = 30 if quick else ITERATIONS
    say(
        f"\n== 3. probe cost: the operator's per-poll query vs SELECT count(*) FROM "
        f"pg_stat_activity, {iterations} interleaved calls each, {repeats} repeats"
    )
    out: dict[str, Any] = {"iterations": iterations}
    held: list[psycopg.Connection[Any]] = []
    left = server.wait_backends("true", at_most=0, timeout=120)
    if left:
        say(f"  warning: {left} client backends of earlier benchmarks are still open")
    try:
        for n in BACKENDS:
            held += open_clients(server.app_dsn(), n - len(held), offset=len(held))
            got = server.client_backends("datname = 'app'")
            # At the largest step, also what a poll adds when it sees a new leak.
            ask = culprits.MAX_ASKED_PER_POLL if n == BACKENDS[-1] else 0
            timings = asyncio.run(
                _probe_vs_floor(server.monitor_dsn(), repeats, iterations, ask=ask)
            )
            fig = step_figures(timings.medians)
            probe, floor, ratio = fig["probe_ms"], fig["floor_ms"], fig["ratio"]
            query, query_ratio = fig["query_ms"], fig["query_ratio"]
            row: dict[str, Any] = {
                "backends": got,
                "probe_ms": probe,
                "floor_ms": floor,
                "ratio": ratio,
                "query_ms": query,
                "query_ratio": query_ratio,
                "target_ratio": 1.5,
            }
            if "grouped_ms" in fig:
                row |= {k: fig[k] for k in ("grouped_ms", "grouped_ratio", "probe_vs_grouped")}
                row |= {k: fig[k] for k in ("full_ms", "full_ratio")}
                say(
                    f"  grouped count {fig['grouped_ms'].show('{:.2f}', ' ms')} "
                    f"({fig['grouped_ratio'].show('{:.2f}', 'x')} the floor; the probe "
                    f"{fig['probe_vs_grouped'].show('{:.2f}', 'x')} it); a poll with every "
                    f"backend in detail (the first, or all changed) "
                    f"{fig['full_ms'].show('{:.2f}', ' ms')} "
                    f"({fig['full_ratio'].show('{:.2f}', 'x')})"
                )
            say(
                f"  {got} backends: probe {probe.show('{:.2f}', ' ms')}, floor "
                f"{floor.show('{:.2f}', ' ms')}, ratio {ratio.show('{:.2f}', 'x')} "
                f"(target <= 1.5x at 1,000); the probe's query without decoding "
                f"{query.show('{:.2f}', ' ms')} ({query_ratio.show('{:.2f}', 'x')})"
            )
            if "statements_ms" in fig:
                row |= {
                    "statements_asked": timings.asked,
                    "statements_found": timings.found,
                    "statements_shown": timings.shown,
                    "statement_chars": timings.chars,
                    "statements_ms": fig["statements_ms"],
                    "statements_ratio": fig["statements_ratio"],
                    "statements_query_ms": fig["statements_query_ms"],
                    "with_statements_ms": fig["with_statements_ms"],
                    "with_statements_ratio": fig["with_statements_ratio"],
                }
                say(
                    f"  a poll with a new leak: Monitor.statements() for {timings.asked} idle "
                    f"backends ({timings.found} found, {timings.shown} shown, raw statements of "
                    f"{timings.chars:.0f} chars) + statement_of() "
                    f"{fig['statements_ms'].show('{:.2f}', ' ms')} "
                    f"({fig['statements_ratio'].show('{:.2f}', 'x')} the floor; its query "
                    f"alone {fig['statements_query_ms'].show('{:.2f}', ' ms')}); probe + "
                    f"statements {fig['with_statements_ms'].show('{:.2f}', ' ms')} "
                    f"({fig['with_statements_ratio'].show('{:.2f}', 'x')} the floor)"
                )
            out[f"backends{n}"] = row
        for c in held:
            c.close()
        held = []
        # 1,000 clients through PgBouncer (session pooling: they log in without a server
        # connection of their own until they send a query).
        held = open_clients(server.info.app_pooler_dsn, 1000, pooler=True)
        pool = asyncio.run(_pooler(server, repeats, iterations))
        sc = Spread.of(v * 1000 for v in pool["show_clients"])
        sv = Spread.of(v * 1000 for v in pool["show_version"])
        pp = Spread.of(v * 1000 for v in pool["per_poll"])
        ratio = Spread.of(
            a / b for a, b in zip(pool["show_clients"], pool["show_version"], strict=True)
        )
        out["pgbouncer"] = {
            "clients": int(pool["clients_seen"][0]),
            "show_clients_ms": sc,
            "show_version_ms": sv,
            "ratio": ratio,
            "per_poll_ms": pp,
        }
        say(
            f"  PgBouncer, {int(pool['clients_seen'][0])} clients: SHOW CLIENTS "
            f"{sc.show('{:.2f}', ' ms')} ({ratio.show('{:.1f}', 'x')} SHOW VERSION at "
            f"{sv.show('{:.2f}', ' ms')}); the operator's per-poll pooler probe (connect, SHOW "
            f"POOLS, SHOW CLIENTS) {pp.show('{:.1f}', ' ms')}"
        )
    finally:
        for c in held:
            c.close()
    return out
