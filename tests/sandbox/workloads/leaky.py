"""The leaky app: opens connections at a steady rate and never closes them.

This is the failure connbudget exists for: a Django app under ASGI whose request-finished signal
does not always fire, so each request's connection stays open, idle, until PostgreSQL answers
``FATAL: sorry, too many clients already``.

Settings (environment):
- ``DATABASE_URL``: where to connect (directly or through PgBouncer);
- ``PGAPPNAME``: the ``application_name`` libpq sends (the pod name, through a fieldRef);
- ``LEAK_RATE``: connections opened per second (default 1.0);
- ``LEAK_MAX``: stop leaking after this many open connections (default 10,000);
- ``QUERY_EACH``: run ``SELECT 1`` on each new connection before abandoning it (default 1);
- ``IN_TRANSACTION``: ``1`` opens a transaction before that query and never ends it, so each
  leaked connection sits ``idle in transaction`` (default 0).

On SIGTERM it closes what it holds and exits 0; when the process is killed instead, the kernel
closes its sockets and PostgreSQL ends the backends.
"""

from __future__ import annotations

import time

import psycopg

from sandbox.workloads.common import database_url, env_float, env_int, log, stop_event

CONNECT_TIMEOUT = 5  # seconds


def main() -> None:
    stop = stop_event()
    url = database_url()
    rate = env_float("LEAK_RATE", 1.0)
    cap = env_int("LEAK_MAX", 10_000)
    query = env_int("QUERY_EACH", 1) != 0
    in_transaction = env_int("IN_TRANSACTION", 0) != 0
    held: list[psycopg.Connection[tuple[object, ...]]] = []
    failures = 0
    log("started", rate=rate, max=cap)
    next_at = time.monotonic()
    while not stop.is_set():
        if len(held) < cap:
            try:
                conn = psycopg.connect(
                    url,
                    connect_timeout=CONNECT_TIMEOUT,
                    autocommit=not in_transaction,
                    prepare_threshold=None,
                )
                if query or in_transaction:
                    conn.execute("SELECT 1")
                held.append(conn)
                log("leaked", open=len(held))
            except psycopg.Error as e:
                failures += 1
                log(
                    "connect_failed",
                    error=type(e).__name__,
                    detail=str(e).strip()[:200],
                    failures=failures,
                    open=len(held),
                )
        # Drop connections the server ended (terminated backends), as a real app's GC would.
        held = [c for c in held if not c.closed and not c.broken]
        next_at += 1.0 / rate if rate > 0 else 1.0
        stop.wait(max(0.0, next_at - time.monotonic()))
    for c in held:
        c.close()
    log("stopped", closed=len(held))


if __name__ == "__main__":
    main()
