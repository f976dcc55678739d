"""Helpers shared by the reliability and security tests (faults, bad input, secrets, TLS)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import psycopg

from e2e.conftest import Budgets, Operator, all_text
from sandbox.fixtures import Workloads
from sandbox.procs import free_port

FAST = {"pollSeconds": 1}  # every test polls each second to stay short


def budget_spec(app: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "database": {"secretRef": {"name": "pg-monitor"}},
        "budget": {"maxConnections": 20},
        "selector": {"matchLabels": {"app": app}},
        **FAST,
    }
    spec.update(overrides)
    return spec


def pod_names(workloads: Workloads, namespace: str, selector: str) -> set[str]:
    return {p.metadata.name for p in workloads.pods(namespace, selector)}


def backends(dsn: str, prefix: str) -> dict[str, int]:
    """application_name → client backends, for apps whose name starts with ``prefix``."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND application_name LIKE %s GROUP BY 1",
            (prefix + "%",),
        ).fetchall()
    return {a: int(n) for a, n in rows}


def ready(budgets: Budgets, name: str) -> str | None:
    """``status:reason`` of the Ready condition (None before the first status)."""
    c = budgets.condition(name, "Ready")
    return f"{c['status']}:{c['reason']}" if c else None


def actions(op: Operator) -> list[dict[str, Any]]:
    """The operator's ``action`` log records (JSON logs), in order."""
    out = []
    for line in op.logs().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("message") == "action":
            out.append(rec)
    return out


def assert_no_secret(budgets: Budgets, names: list[str], op: Operator, secrets: list[str]) -> None:
    """No planted secret in logs, Events, any budget's status or the metrics."""
    text = "\n".join(all_text(budgets, n, op) for n in names)
    for secret in secrets:
        assert secret not in text, "a secret leaked into the operator's output"


class PartitionProxy:
    """A TCP proxy to PostgreSQL that can be cut off, as a network partition would.

    While cut off it neither reads nor writes: connections stay open, bytes wait in the kernel's
    buffers, new connections are accepted by the kernel but never answered (as a SYN lost would
    leave a client waiting); when healed, everything flows again, as TCP's retransmissions would
    make it. Runs its own event loop in a thread.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._open.wait()
                data = await src.read(65536)
                await self._open.wait()
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._open.clear)

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)

    def close(self) -> None:
        async def stop() -> None:
            self._open.set()
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
