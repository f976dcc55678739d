"""The local demo: the connection leak that connbudget exists for, played on the sandbox.

It brings up the sandbox, deploys a leaky app (3 replicas, like a Django app under ASGI that never
closes its connections) and a well-behaved app, and shows, every second, who holds PostgreSQL's
connections, until PostgreSQL refuses new clients (``too many clients already``) or the time limit
is reached. Then it prints a summary and tears everything down.
"""

from __future__ import annotations

import argparse
import sys
import time

import psycopg

from sandbox.core import Sandbox
from sandbox.fixtures import STEADY_IMAGE, Workloads

DEFAULT_LIMIT_SECONDS = 120.0


def snapshot(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, tuple[int, int]]:
    """application_name → (connections, idle) over client backends.

    The monitoring connection is opened once and kept: when the leak has filled the server, a new
    connection would be refused like everyone else's.
    """
    rows: list[tuple[str, int, int]] = conn.execute(
        "SELECT application_name, count(*), count(*) FILTER (WHERE state = 'idle') "
        "FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND pid <> pg_backend_pid() GROUP BY 1 ORDER BY 2 DESC"
    ).fetchall()  # type: ignore[assignment]
    return {app or "(none)": (n, idle) for app, n, idle in rows}


def say(message: str) -> None:
    print(message, flush=True)


def is_refusal(error: psycopg.OperationalError) -> bool:
    """Tell whether PostgreSQL refused a connection because it is full.

    A non-superuser is refused as soon as only the superuser-reserved slots are left; a superuser
    only when every slot is taken.
    """
    text = str(error)
    return "too many clients" in text or "remaining connection slots are reserved" in text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=float, default=DEFAULT_LIMIT_SECONDS, help="seconds")
    args = parser.parse_args(argv)
    sb = Sandbox.up(progress=lambda m: say(f"sandbox: {m}"))
    try:
        wl = Workloads(sandbox=sb, api=sb.api_client())
        db = sb.db
        say(
            f"\nPostgreSQL max_connections={db.max_connections} "
            f"(3 reserved for superusers); network mode: {sb.network.mode}"
        )
        wl.deploy("default", "web", replicas=3, env={"LEAK_RATE": "1.5"})
        wl.deploy("default", "worker", image=STEADY_IMAGE, replicas=1, env={"POOL_SIZE": "3"})
        say("deployed web (leaky, 3 pods, 1.5 connections/s each) and worker (pool of 3)\n")
        monitor = psycopg.connect(
            db.monitor_dsn, autocommit=True, connect_timeout=5, application_name="connbudget-demo"
        )
        t0 = time.monotonic()
        refused_at = None
        while time.monotonic() - t0 < args.limit:
            snap = snapshot(monitor)
            total = sum(n for n, _ in snap.values())
            top = ", ".join(f"{app}={n}" for app, (n, _) in list(snap.items())[:4])
            say(f"t={time.monotonic() - t0:5.1f}s  {total:3d}/{db.max_connections} used  {top}")
            try:
                psycopg.connect(db.app_dsn, connect_timeout=5).close()
            except psycopg.OperationalError as e:
                if is_refusal(e):
                    refused_at = time.monotonic() - t0
                    say(f"\nPostgreSQL now refuses new clients: {str(e).strip().splitlines()[-1]}")
                    break
            time.sleep(1)
        snap = snapshot(monitor)
        leaky = {a: v for a, v in snap.items() if a.startswith("web-")}
        say("\nsummary:")
        if refused_at is not None:
            say(f"  the server was full after {refused_at:.0f}s")
        else:
            say(f"  the server was not full within {args.limit:.0f}s")
        say(
            f"  leaky pods hold {sum(n for n, _ in leaky.values())} connections, "
            f"{sum(i for _, i in leaky.values())} of them idle: "
            + ", ".join(f"{a}={n}" for a, (n, _) in leaky.items())
        )
        say("  connbudget's job is to see this coming and act before the server is full.")
        monitor.close()
    finally:
        sb.down()
        say("sandbox torn down")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
