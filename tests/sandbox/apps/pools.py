"""A WSGI app over a connection pool that never checks a connection before lending it.

``POOL_KIND``: ``psycopg`` (psycopg_pool ``ConnectionPool(check=None)``, the default) or
``sqlalchemy`` (``QueuePool`` with ``pool_pre_ping=False``). ``POOL_SIZE`` connections (default 2),
opened at start for psycopg_pool and on first use for SQLAlchemy, ``application_name`` from
``PGAPPNAME``. Run by gunicorn with one ``gthread`` worker (one pool per pod):
``gunicorn --worker-class gthread --threads N sandbox.apps.pools:application``.

``POOL_KIND=leak`` is the same app without a pool, and with a leak: each request opens a psycopg
connection and never closes it (it stays referenced, as one kept in a cache or a global does), so
each request leaves one connection idle, never used again. Its statement differs from the pools'
and carries no tags: ``sandbox.apps.planted.SECRET_LOOKUP``, with a planted password-like literal.

``/work?idle=S`` runs a query, and with ``idle`` > 0 waits ``S`` seconds holding the connection and
runs a second; one JSON log line per request, errors classified by ``sandbox.workloads.outcomes``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import parse_qs

from sandbox.apps.planted import SECRET_LOOKUP
from sandbox.workloads.common import log
from sandbox.workloads.outcomes import classify_exception

QUERY_1 = "SELECT count(*) FROM pg_catalog.pg_class"
QUERY_2 = "SELECT count(*) FROM pg_catalog.pg_namespace"
MAX_IDLE = 30.0  # seconds

KIND = os.environ.get("POOL_KIND", "psycopg")
SIZE = int(os.environ.get("POOL_SIZE", "2"))
APPNAME = os.environ.get("PGAPPNAME", "pool-app")

Execute = Callable[[str], None]


def _psycopg_pool() -> Callable[[], AbstractContextManager[Execute]]:
    from contextlib import contextmanager

    import psycopg_pool  # type: ignore[import-not-found]

    pool = psycopg_pool.ConnectionPool(
        os.environ["DATABASE_URL"],
        min_size=SIZE,
        max_size=SIZE,
        check=None,  # no health check: a dead idle connection is lent as is
        kwargs={"application_name": APPNAME, "autocommit": True},
        open=True,
        name=APPNAME,
    )

    @contextmanager
    def lend() -> Iterator[Execute]:
        with pool.connection() as conn:
            yield lambda sql: conn.execute(sql).fetchall() and None

    return lend


def _sqlalchemy_pool() -> Callable[[], AbstractContextManager[Execute]]:
    from contextlib import contextmanager

    import sqlalchemy  # type: ignore[import-not-found]

    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sqlalchemy.create_engine(
        url,
        pool_size=SIZE,
        max_overflow=0,
        pool_pre_ping=False,  # no ping: a dead idle connection is lent as is
        connect_args={"application_name": APPNAME},
    )

    @contextmanager
    def lend() -> Iterator[Execute]:
        with engine.connect() as conn:
            yield lambda sql: conn.execute(sqlalchemy.text(sql)).fetchall() and None
            conn.rollback()

    return lend


def _leaking_connections() -> Callable[[], AbstractContextManager[Execute]]:
    from contextlib import contextmanager

    import psycopg

    leaked: list[psycopg.Connection[Any]] = []

    @contextmanager
    def lend() -> Iterator[Execute]:
        conn = psycopg.connect(
            os.environ["DATABASE_URL"], application_name=APPNAME, autocommit=True
        )
        # The leak: kept, never closed, never lent again.
        leaked.append(conn)

        def execute(sql: str) -> None:
            conn.execute(sql).fetchall()

        yield execute

    return lend


LENDERS = {"sqlalchemy": _sqlalchemy_pool, "leak": _leaking_connections}
LEND = LENDERS.get(KIND, _psycopg_pool)()
FIRST, SECOND = (SECRET_LOOKUP, SECRET_LOOKUP) if KIND == "leak" else (QUERY_1, QUERY_2)
log("pool_ready", kind=KIND, size=SIZE, pid=os.getpid())


def _reply(start_response: Any, status: str, body: dict[str, object]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def application(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/healthz":
        return _reply(start_response, "200 OK", {"ok": True})
    if path != "/work":
        return _reply(start_response, "404 Not Found", {"error": "not found"})
    try:
        idle = float(parse_qs(environ.get("QUERY_STRING", "")).get("idle", ["0"])[0])
    except ValueError:
        idle = 0.0
    idle = min(MAX_IDLE, max(0.0, idle))
    started = time.monotonic()
    in_flight = False
    fields: dict[str, object] = {}
    try:
        with LEND() as execute:
            execute(FIRST)
            in_flight = True
            if idle:
                time.sleep(idle)
                execute(SECOND)
        outcome = "ok"
    except Exception as e:  # every driver's error class, classified by its message
        outcome, reason = classify_exception(e, in_flight=in_flight)
        fields = {"error": type(e).__name__, "reason": reason}
    ms = round((time.monotonic() - started) * 1000)
    log("request", outcome=outcome, idle=idle, ms=ms, kind=KIND, **fields)
    status = "200 OK" if outcome == "ok" else "503 Service Unavailable"
    return _reply(start_response, status, {"outcome": outcome, **fields})
