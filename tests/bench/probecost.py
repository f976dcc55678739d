"""Benchmark 3: what the operator's probe costs, against its floor, in the same run.

The probe is the operator's own code: ``connbudget.probe.postgres.Monitor.sample()``, the one query
each budget runs per poll (and its decoding into ``ServerSample``). The floor is
``SELECT count(*) FROM pg_stat_activity`` (the cheapest possible look at the same data) on a
connection opened the same way, against the same server, interleaved with the probe so both see
the same load. Client backends are idle connections of the app role spread over 100 application
names (as 100 pods would be). The PgBouncer figures use ``sample_poolers`` (what the operator
runs per poll and pooler pod: connect, ``SHOW POOLS``, ``SHOW CLIENTS``) and ``SHOW CLIENTS``
alone on an open admin connection, with 1,000 clients connected through PgBouncer.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from bench.common import Server, Spread, say
from connbudget.model.observations import PROBE_APPLICATION_NAME
from connbudget.probe import queries
from connbudget.probe.pgbouncer import sample_poolers
from connbudget.probe.postgres import STATEMENT_TIMEOUT_MS, Monitor

BACKENDS = (100, 1000)
PODS = 100  # application names the backends are spread over
ITERATIONS = 100  # timed calls of each kind per repeat
WARMUP = 10


def open_clients(
    dsn: str, n: int, *, offset: int = 0, pooler: bool = False
) -> list[psycopg.Connection[Any]]:
    """Open ``n`` idle connections (8 at a time), named as ``PODS`` pods would name them."""

    def one(i: int) -> psycopg.Connection[Any]:
        # PgBouncer refuses the options startup parameter.
        return psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=10,
            prepare_threshold=None,
            application_name=f"pod-{i % PODS}",
            options=None if pooler else "-c idle_session_timeout=0",
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(offset, offset + n)))


async def _timed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


async def _probe_vs_floor(
    dsn: str, repeats: int, iterations: int
) -> list[tuple[float, float, float]]:
    """Per repeat: the median seconds of the probe, the floor and the probe's query alone."""
    monitor = Monitor(dsn)
    floor_conn = await psycopg.AsyncConnection.connect(
        dsn,
        autocommit=True,
        application_name=PROBE_APPLICATION_NAME,
        options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c idle_session_timeout=0",
    )

    async def floor() -> object:
        cur = await floor_conn.execute(queries.COUNT_FLOOR)
        return await cur.fetchall()

    async def query_only() -> object:
        cur = await floor_conn.execute(queries.BACKENDS)
        return await cur.fetchall()

    try:
        await _timed(monitor.sample, WARMUP)
        await _timed(floor, WARMUP)
        out = []
        for _ in range(repeats):
            probe_t: list[float] = []
            floor_t: list[float] = []
            query_t: list[float] = []
            for _ in range(iterations):
                probe_t += await _timed(monitor.sample, 1)
                floor_t += await _timed(floor, 1)
                query_t += await _timed(query_only, 1)
            out.append(
                (statistics.median(probe_t), statistics.median(floor_t), statistics.median(query_t))
            )
        return out
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
    out: dict[str, Any] = {}
    held: list[psycopg.Connection[Any]] = []
    left = server.wait_backends("true", at_most=0, timeout=120)
    if left:
        say(f"  warning: {left} client backends of earlier benchmarks are still open")
    try:
        for n in BACKENDS:
            held += open_clients(server.app_dsn(), n - len(held), offset=len(held))
            got = server.client_backends("datname = 'app'")
            pairs = asyncio.run(_probe_vs_floor(server.monitor_dsn(), repeats, iterations))
            probe = Spread.of(p * 1000 for p, _, _ in pairs)
            floor = Spread.of(f * 1000 for _, f, _ in pairs)
            query = Spread.of(q * 1000 for _, _, q in pairs)
            ratio = Spread.of(p / f for p, f, _ in pairs)
            query_ratio = Spread.of(q / f for _, f, q in pairs)
            out[f"backends{n}"] = {
                "backends": got,
                "probe_ms": probe,
                "floor_ms": floor,
                "ratio": ratio,
                "query_ms": query,
                "query_ratio": query_ratio,
                "target_ratio": 1.5,
            }
            say(
                f"  {got} backends: probe {probe.show('{:.2f}', ' ms')}, floor "
                f"{floor.show('{:.2f}', ' ms')}, ratio {ratio.show('{:.2f}', 'x')} "
                f"(target <= 1.5x at 1,000); the probe's query without decoding "
                f"{query.show('{:.2f}', ' ms')} ({query_ratio.show('{:.2f}', 'x')})"
            )
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
