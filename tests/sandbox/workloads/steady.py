"""The well-behaved app: a small fixed pool of persistent connections, each reused in turn.

Settings (environment):
- ``DATABASE_URL``, ``PGAPPNAME``: as for the leaky app;
- ``POOL_SIZE``: connections held (default 2);
- ``QUERY_INTERVAL``: seconds between queries, round-robin over the pool (default 1.0);
- ``RECONNECT``: ``1`` (default) replaces a broken connection; ``0`` keeps using it and counts every
  error, like Django's ``CONN_MAX_AGE`` under a WSGI server without health checks.

Each query's failure is logged as ``query_failed`` with the error class, so collateral damage
(e.g. its idle connections killed by ``idle_session_timeout``) is visible.
"""

from __future__ import annotations

import time

import psycopg

from sandbox.workloads.common import database_url, env_float, env_int, log, stop_event

CONNECT_TIMEOUT = 5  # seconds


def main() -> None:
    stop = stop_event()
    url = database_url()
    size = env_int("POOL_SIZE", 2)
    interval = env_float("QUERY_INTERVAL", 1.0)
    reconnect = env_int("RECONNECT", 1) != 0
    pool: list[psycopg.Connection[tuple[object, ...]] | None] = [None] * size
    ok = errors = 0
    log("started", pool_size=size, interval=interval, reconnect=reconnect)
    turn = 0
    while not stop.is_set():
        i = turn % size
        turn += 1
        conn = pool[i]
        try:
            if conn is None or (reconnect and (conn.closed or conn.broken)):
                conn = pool[i] = psycopg.connect(
                    url, connect_timeout=CONNECT_TIMEOUT, autocommit=True, prepare_threshold=None
                )
            conn.execute("SELECT 1")
            ok += 1
            if ok % 30 == 1:
                log("queries_ok", ok=ok, errors=errors)
        except psycopg.Error as e:
            errors += 1
            log(
                "query_failed",
                slot=i,
                error=type(e).__name__,
                detail=str(e).strip()[:200],
                ok=ok,
                errors=errors,
            )
        t = time.monotonic()
        stop.wait(max(0.0, interval - (time.monotonic() - t)))
    for c in pool:
        if c is not None:
            c.close()
    log("stopped", ok=ok, errors=errors)


if __name__ == "__main__":
    main()
