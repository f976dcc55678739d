"""The real workloads behave like the apps they stand for, measured from PostgreSQL and their logs.

- Django 5.0.1 under uvicorn leaks one connection per client that hangs up mid-request (ticket
  #35059: ``request_finished`` is not sent, so the connection is never closed), at the driven rate,
  and the leaked backends are never used again;
- Django 5.0.2 under gunicorn (``CONN_MAX_AGE``) and a psycopg_pool app hold a few connections and
  reuse them, without a failure;
- neither checks a connection before using it: terminating an idle one by hand fails the next
  request that gets it, and the app's own log says so.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from dataclasses import dataclass, field

import psycopg
import pytest

from sandbox.apps.deploy import deploy_app, leak_settings, pool_settings
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads, eventually
from sandbox.workloads.outcomes import count_outcomes, failures

pytestmark = pytest.mark.sandbox

LEAK_RATE = 2.0  # connections leaked per second
LEAK_WINDOW = 15.0  # seconds measured
GAP = (3.0, 6.0)  # seconds between two uses of a pooled connection (short, to keep the test short)
INFLIGHT = {"INFLIGHT_FRACTION": "0.2", "INFLIGHT_IDLE_MIN": "1", "INFLIGHT_IDLE_MAX": "2"}
INFLIGHT_SPAN = 2.5  # seconds: longer than a request in flight keeps its connection idle


@dataclass
class Backend:
    pid: int
    state: str
    state_change: float
    changes: list[float] = field(default_factory=list)


def backends(dsn: str, app: str) -> dict[int, tuple[str, float]]:
    """pid → (state, state_change as epoch seconds) of ``app``'s client backends."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, state, extract(epoch FROM state_change)::float8 FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND application_name = %s",
            [app],
        ).fetchall()
    return {pid: (state, change) for pid, state, change in rows}


def reuse_gaps(found: dict[int, Backend]) -> list[float]:
    """Seconds between two uses of the same backend.

    Each query moves ``state_change`` (idle -> active -> idle), and a request in flight holds its
    connection idle up to 2 s between two: changes closer than that are one use.
    """
    return [
        after - before
        for b in found.values()
        for before, after in itertools.pairwise(b.changes)
        if after - before > INFLIGHT_SPAN
    ]


def pod_of(workloads: Workloads, namespace: str, name: str) -> str:
    pods = workloads.pods(namespace, f"app={name}")
    assert len(pods) == 1
    return str(pods[0].metadata.name)


def driver_ready(sandbox: Sandbox, namespace: str, pod: str) -> bool:
    return '"target_ready"' in sandbox.pod_log(namespace, pod, "driver")


def test_django_501_under_asgi_leaks_at_the_driven_rate(
    sandbox: Sandbox, workloads: Workloads, namespace: str, pg_dsn: str
) -> None:
    deploy_app(
        workloads,
        namespace,
        "leak",
        kind="leak",
        driver_env=leak_settings(LEAK_RATE, LEAK_WINDOW + 10, ABANDON_AFTER="0.5", **INFLIGHT),
    )
    pod = pod_of(workloads, namespace, "leak")
    eventually(lambda: driver_ready(sandbox, namespace, pod), timeout=60, what="driver started")
    time.sleep(3)  # past the first abandoned requests
    first = {p: b for p, b in backends(pg_dsn, pod).items() if b[0] == "idle"}
    t0 = time.monotonic()
    time.sleep(LEAK_WINDOW)
    last = {p: b for p, b in backends(pg_dsn, pod).items() if b[0] == "idle"}
    rate = (len(last) - len(first)) / (time.monotonic() - t0)
    abandoned = count_outcomes(sandbox.pod_log(namespace, pod, "driver"), "sent")["abandoned"]
    print(f"leak: {len(first)} -> {len(last)} idle backends, {rate:.2f}/s; {abandoned} abandoned")
    assert LEAK_RATE * 0.7 <= rate <= LEAK_RATE * 1.3
    # Never reused: every backend idle at the start is still there, its state unchanged.
    assert all(last.get(pid) == b for pid, b in first.items())
    # The app itself never noticed: Django logged no failed request.
    assert failures(count_outcomes(sandbox.pod_log(namespace, pod, "app"))) == 0


def test_healthy_pools_reuse_their_connections_and_have_no_health_check(
    sandbox: Sandbox, workloads: Workloads, namespace: str, pg_dsn: str
) -> None:
    for name, kind in (("django", "django"), ("pool", "psycopg")):
        deploy_app(
            workloads,
            namespace,
            name,
            kind=kind,
            driver_env=pool_settings(2, GAP, 150, **INFLIGHT),
            wait=False,
        )
    for name in ("django", "pool"):
        workloads.wait_available(namespace, name, 1)
    pods = {name: pod_of(workloads, namespace, name) for name in ("django", "pool")}
    for pod in pods.values():
        ready = functools.partial(driver_ready, sandbox, namespace, pod)
        eventually(ready, timeout=60, what=f"driver of {pod}")

    # Watch the pools for a while: the same few backends, each used again and again. Requests
    # arrive at random gaps, so watch at least 20 s and until each pool shows 4 reuses (at most
    # 60 s: a pool that does not reuse its connections fails below).
    seen: dict[str, dict[int, Backend]] = {name: {} for name in pods}
    start = time.monotonic()
    while time.monotonic() < start + 60:
        for name, pod in pods.items():
            for pid, (state, change) in backends(pg_dsn, pod).items():
                b = seen[name].setdefault(pid, Backend(pid, state, change, [change]))
                if change != b.changes[-1]:
                    b.changes.append(change)
        if time.monotonic() > start + 20 and all(len(reuse_gaps(f)) >= 4 for f in seen.values()):
            break
        time.sleep(0.2)
    for name, found in seen.items():
        assert 1 <= len(found) <= 2, f"{name}: {len(found)} backends"
        gaps = reuse_gaps(found)
        print(f"{name}: {len(found)} backends, reuse gaps {sorted(round(g, 1) for g in gaps)}")
        assert len(gaps) >= 4, f"{name}: its connections were not reused"
        assert max(gaps) <= 2 * GAP[1] + 2, f"{name}: a connection idle longer than the driven gap"
        assert statistics.median(gaps) <= GAP[1] + 2
        log = sandbox.pod_log(namespace, pods[name], "app")
        assert failures(count_outcomes(log)) == 0, f"{name}: {count_outcomes(log)}"

    # No pre-ping: terminate one idle pooled connection of the Django app; its next request fails.
    django_pod = pods["django"]
    before = count_outcomes(sandbox.pod_log(namespace, django_pod, "app"))

    # Idle between two requests, not between two queries of one (in flight for at most 2 s).
    def idle_between_requests() -> list[int]:
        now = time.time()
        found = backends(pg_dsn, django_pod).items()
        return [pid for pid, (state, t) in found if state == "idle" and now - t > INFLIGHT_SPAN]

    idle = eventually(idle_between_requests, timeout=2 * GAP[1], what="an idle Django connection")
    with psycopg.connect(sandbox.db.superuser_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", [idle[0]])

    def hurt() -> dict[str, int] | None:
        counts = count_outcomes(sandbox.pod_log(namespace, django_pod, "app"))
        return counts if failures(counts) > failures(before) else None

    after = eventually(hurt, timeout=3 * GAP[1] + 5, what="a failed request in the Django log")
    print(f"django after terminating backend {idle[0]}: {after}")
    assert after["terminated"] == 1
    assert failures(after) == 1
    assert failures(count_outcomes(sandbox.pod_log(namespace, pods["pool"], "app"))) == 0
