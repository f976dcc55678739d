"""PgBouncer probe: ``SHOW POOLS`` and ``SHOW CLIENTS`` on the admin console of each pooler pod.

Talks to PgBouncer through psycopg 3 (async). The admin console speaks only the simple query
protocol, so it is queried with a client-side cursor, in autocommit, without prepared statements,
and without the ``options`` startup parameter (which it refuses). A connection is opened per poll
and pod and closed at once: pooler pods come and go, and none of them may be held busy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any, LiteralString

import psycopg
from psycopg import conninfo

from connbudget.model import timestamps
from connbudget.model.observations import PROBE_APPLICATION_NAME, PoolerClient, PoolerSample
from connbudget.probe import queries
from connbudget.probe.errors import ProbeError, ProbeFailure
from connbudget.probe.postgres import (
    ANSWER_TIMEOUT_SECONDS,
    CONNECT_TIMEOUT_SECONDS,
    answer_within,
    classify,
)

SERVER_STATES = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")


def _parse(dsn: str) -> dict[str, Any]:
    # libpq's parser quotes fragments of a malformed DSN (a password with a space, say) in its
    # message: only the redacted ProbeError leaves this module, never psycopg's own error.
    try:
        return conninfo.conninfo_to_dict(dsn)
    except psycopg.Error as e:
        raise classify(e, dsn) from None


def dsn_for_host(template: str, host: str) -> str:
    """The admin console DSN of one pooler pod: the template with its host replaced.

    Raises ``ProbeError(DSN_INVALID)``, saying nothing of its content, if the template is not a
    libpq connection string or URI.
    """
    params = _parse(template)
    params["host"] = host
    params.pop("hostaddr", None)
    return conninfo.make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


def host_of(dsn: str) -> str:
    """The host a DSN names (``localhost`` if none); ``ProbeError`` if the DSN is malformed."""
    return str(_parse(dsn).get("host") or "localhost")


async def _show(dsn: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    async with await psycopg.AsyncConnection.connect(
        dsn,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        application_name=PROBE_APPLICATION_NAME,
        prepare_threshold=None,
        cursor_factory=psycopg.AsyncClientCursor,
    ) as conn:
        pools = await _rows(conn, queries.SHOW_POOLS)
        clients = await _rows(conn, queries.SHOW_CLIENTS)
    return pools, clients


async def _rows(conn: psycopg.AsyncConnection[Any], query: LiteralString) -> list[dict[str, Any]]:
    cur = await conn.execute(query)
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


def _idle_seconds(request_time: object, now: float) -> float:
    """Seconds since a client's last request."""
    t = timestamps.parse_timestamp(request_time)
    return 0.0 if t is None else max(now - t, 0.0)


def _port(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def summarise(
    pools: Iterable[dict[str, Any]], clients: Iterable[dict[str, Any]], *, now: float
) -> tuple[int, int, list[PoolerClient]]:
    """Clients waiting, server connections, and the clients (admin console sessions left out)."""
    waiting = servers = 0
    for p in pools:
        if p.get("database") == "pgbouncer":
            continue
        waiting += int(p.get("cl_waiting") or 0)
        servers += sum(int(p.get(k) or 0) for k in SERVER_STATES)
    out = [
        PoolerClient(
            addr=c.get("addr"),
            user=str(c.get("user", "")),
            database=str(c.get("database", "")),
            state=str(c.get("state", "")),
            application_name=str(c.get("application_name") or ""),
            idle_seconds=_idle_seconds(c.get("request_time"), now),
            # PgBouncer prints whole seconds: the start check allows for it (attribution).
            connected_at=timestamps.parse_timestamp(c.get("connect_time")),
            port=_port(c.get("port")),
        )
        for c in clients
        if c.get("database") != "pgbouncer"
    ]
    return waiting, servers, out


# Failures only a change by the user can cure (the Secret's DSN or password).
USER_FAILURES = frozenset({ProbeFailure.AUTHENTICATION_FAILED, ProbeFailure.DSN_INVALID})


async def sample_poolers(template: str, hosts: Iterable[str], *, replicas: int) -> PoolerSample:
    """Query every pooler pod at ``hosts``; pods that fail are named in ``errors``.

    A malformed ``template`` raises ``ProbeError(DSN_INVALID)`` (its message redacted) before any
    pod is asked.
    """
    _parse(template)  # even with no pod to ask
    hosts = list(hosts)
    dsns = [dsn_for_host(template, h) for h in hosts]
    # A pooler pod that accepts connections but never answers (hung, stopped) must not hold the
    # cycle: it counts as an error after the connect timeout plus the answer timeout.
    limit = CONNECT_TIMEOUT_SECONDS + ANSWER_TIMEOUT_SECONDS
    results = await asyncio.gather(
        *(answer_within(_show(dsn), limit) for dsn in dsns),
        return_exceptions=True,
    )
    waiting = servers = 0
    clients: list[PoolerClient] = []
    errors: list[str] = []
    failure: str | None = None
    for host, result in zip(hosts, results, strict=True):
        if isinstance(result, BaseException):
            err = result if isinstance(result, ProbeError) else classify(result, template)
            errors.append(f"{host}: {err}")
            if err.failure in USER_FAILURES:
                failure = err.failure.value
            continue
        w, s, c = summarise(*result, now=time.time())
        waiting += w
        servers += s
        clients.extend(c)
    return PoolerSample(
        replicas=replicas,
        clients=tuple(clients),
        clients_waiting=waiting,
        server_connections=servers,
        errors=tuple(errors),
        failure=failure,
    )
