"""A leaked connection keeps the last statement of the code that leaked it, in pg_stat_activity.

Two workloads leak at once, each at the driven rate, with different last statements:

- Django 5.0.1 under uvicorn with sqlcommenter (``SQLCOMMENTER=1``): each client that hangs up
  leaves its backend idle (ticket #35059) with the view's query and its tags,
  ``/*controller='awork',framework='django%3A5.0.1',route='awork'*/``;
- the psycopg app without a pool (``psycopg-leak``): each request leaves its backend idle with an
  untagged lookup whose literal is a planted secret (``sandbox.apps.planted``), which reaches the
  database as written: what a leak report makes of it must not show it.
"""

from __future__ import annotations

import functools
import time
from collections import Counter

import psycopg
import pytest

from sandbox.apps import envs
from sandbox.apps.deploy import SQLCOMMENTER, deploy_app, leak_settings, rate_settings
from sandbox.apps.planted import PLANTED_SECRET, SECRET_LOOKUP
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads, eventually
from sandbox.workloads.outcomes import count_outcomes, failures

pytestmark = pytest.mark.sandbox

RATE = 1.0  # connections leaked per second by each workload
WINDOW = 12.0  # seconds measured
# Long enough to cover the window after both drivers are ready, short enough that both leaks
# together stay well under the sandbox's max_connections (100): at most 30 each.
DRIVE_SECONDS = 30
INFLIGHT = {"INFLIGHT_IDLE_MIN": "1", "INFLIGHT_IDLE_MAX": "2"}
DJANGO_TAGS = "/*controller='awork',framework='django%3A5.0.1',route='awork'*/"
DJANGO_QUERY = f'SELECT COUNT(*) AS "__count" FROM "auth_user" {DJANGO_TAGS}'
SETTLED = 1.0  # seconds: longer than a request takes from its connection to its first query


@pytest.fixture(autouse=True)
def _apps_ready() -> None:
    """The apps need their environments, with these pins (``tests/sandbox/apps/setup``)."""
    missing = [name for name in envs.ENVS if not envs.is_ready(name)]
    assert not missing, f"app environments missing: {missing}; run tests/sandbox/apps/setup"


def idle_backends(sandbox: Sandbox, app: str) -> dict[int, tuple[float, str]]:
    """pid → (state_change as epoch seconds, last query) of ``app``'s idle client backends."""
    with psycopg.connect(sandbox.db.superuser_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, extract(epoch FROM state_change)::float8, query FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND state = 'idle' "
            "AND application_name = %s",
            [app],
        ).fetchall()
    return {pid: (change, query) for pid, change, query in rows}


def driver_ready(sandbox: Sandbox, namespace: str, pod: str) -> bool:
    return '"target_ready"' in sandbox.pod_log(namespace, pod, "driver")


def settled(found: dict[int, tuple[float, str]]) -> dict[int, tuple[float, str]]:
    """The backends idle for more than ``SETTLED`` seconds.

    A request's connection is idle for a moment before its first query (with no query yet, or
    after the database driver's session setup): those are left out.
    """
    now = time.time()
    return {pid: b for pid, b in found.items() if now - b[0] > SETTLED}


def statements(found: dict[int, tuple[float, str]]) -> Counter[str]:
    """How many settled backends end on each statement."""
    return Counter(query for _, query in settled(found).values())


def test_two_leaks_leave_their_own_last_statements_at_the_driven_rate(
    sandbox: Sandbox, workloads: Workloads, namespace: str
) -> None:
    deploy_app(
        workloads,
        namespace,
        "tagged",
        kind="leak",
        app_env=SQLCOMMENTER,
        driver_env=leak_settings(RATE, DRIVE_SECONDS, ABANDON_AFTER="0.5", **INFLIGHT),
        wait=False,
    )
    deploy_app(
        workloads,
        namespace,
        "planted",
        kind="psycopg-leak",
        driver_env=rate_settings(RATE, DRIVE_SECONDS, INFLIGHT_FRACTION="0"),
        wait=False,
    )
    pods = {}
    for name in ("tagged", "planted"):
        workloads.wait_available(namespace, name, 1)
        found = workloads.pods(namespace, f"app={name}")
        assert len(found) == 1
        pods[name] = str(found[0].metadata.name)
    for pod in pods.values():
        ready = functools.partial(driver_ready, sandbox, namespace, pod)
        eventually(ready, timeout=60, what=f"driver of {pod}")
    time.sleep(3)  # past the first leaked requests
    first = {name: idle_backends(sandbox, pod) for name, pod in pods.items()}
    # Left idle before the window and settled: leaked backends, to check they are never reused.
    leaked = {name: settled(found) for name, found in first.items()}
    t0 = time.monotonic()
    time.sleep(WINDOW)
    last = {name: idle_backends(sandbox, pod) for name, pod in pods.items()}
    elapsed = time.monotonic() - t0

    for name, pod in pods.items():
        rate = (len(last[name]) - len(first[name])) / elapsed
        counts = dict(statements(last[name]))
        print(f"{name}: {len(first[name])} -> {len(last[name])} idle, {rate:.2f}/s; {counts}")
        assert RATE * 0.7 <= rate <= RATE * 1.3, name
        # Leaked: never used again, so each keeps the statement it had.
        assert all(last[name].get(pid) == b for pid, b in leaked[name].items()), name
        assert failures(count_outcomes(sandbox.pod_log(namespace, pod, "app"))) == 0, name

    # Django's leaked backends end on the view's first query (the hang-up cancels the view
    # before its second), tagged by sqlcommenter.
    tagged = statements(last["tagged"])
    assert set(tagged) == {DJANGO_QUERY}
    assert tagged[DJANGO_QUERY] >= RATE * WINDOW * 0.7
    # The other leak's statement is different, untagged, and has its planted literal.
    planted = statements(last["planted"])
    assert set(planted) == {SECRET_LOOKUP}
    assert planted[SECRET_LOOKUP] >= RATE * WINDOW * 0.7
    assert PLANTED_SECRET in SECRET_LOOKUP
    assert "/*" not in SECRET_LOOKUP
