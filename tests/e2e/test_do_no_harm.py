"""Do no harm: healthy pools, in a budget with room, lose nothing to the operator.

The operator runs as in the other e2e tests, with a ConnectionBudget that names only its database,
its budget and its selector (the README's first budget), far above what the apps hold, so no breach
ever happens. The app is the psycopg_pool app (``ConnectionPool(check=None)``: no pre-ping, a dead
connection is lent as it is and fails the request that gets it), which opens all its connections
when it starts and lends them in turn (first in, first out), so at a sparse request rate each one
sits idle for many seconds between two uses. Three habits of real pools:

1. a warm-up burst: two pods started apart, each opening 8 connections at once, then sparse
   requests, some pausing between two queries while they wait on an upstream;
2. a reconnect storm: PostgreSQL restarted under a warmed pool, which opens its 8 connections
   again as its requests find the broken ones (over some 10-30 s at its request rate);
3. spare idle connections: three pods of 10 connections each, used 2 at a time. Lent in turn
   (psycopg_pool), each connection sits idle about a minute between two uses: a regression
   guard, since all of them are used. HikariCP with ``minimumIdle`` 10 (``maximumPoolSize``
   10) opens its 10 at once, then lends the connection the thread used last or the first idle one
   of its list, so the same 2 serve every request and the 8 others sit idle, never used, for as
   long as the pod runs: 30 connections opened within seconds, 24 of them unused, which the
   operator of bc863c9 took for a leak (``Leaking``) and terminated.

Damage is counted from the apps' own logs (``sandbox.workloads.outcomes``) and from PostgreSQL
(its log's ``terminating connection due to administrator command`` lines, and the app's backends
followed in ``pg_stat_activity``: the pool never closes a connection itself, so a backend that
vanishes while its pod runs was ended by someone else), never from the operator; the Events come
from the API. Each test drives its load for a bounded time and stops it by itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from e2e.conftest import Budgets, Operator, wait_until
from e2e.reliability import refresh_pids
from sandbox import postgres
from sandbox.apps.deploy import deploy_app, pool_settings
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads, eventually
from sandbox.workloads.outcomes import count_outcomes, failures, request_lines

pytestmark = pytest.mark.sandbox

T = TypeVar("T")

APP = "pool"
SHOP = {"tier": "shop"}
BUDGET = 80  # well above what any app here holds (30 at most): no breach, ever
THREE_FIELDS = {
    "database": {"secretRef": {"name": "pg-monitor"}},
    "budget": {"maxConnections": BUDGET},
    "selector": {"matchLabels": SHOP},
}
# What PostgreSQL logs (FATAL) for a backend ended by pg_terminate_backend.
TERMINATED = "terminating connection due to administrator command"
# Requests that wait on an upstream: this share of them holds its connection idle this long
# between two queries (``/work?idle=S``).
PAUSES = {"INFLIGHT_FRACTION": "0.3", "INFLIGHT_IDLE_MIN": "2", "INFLIGHT_IDLE_MAX": "8"}
SAMPLE_EVERY = 0.5  # seconds between two looks at pg_stat_activity
# Seconds after its start in which a backend runs its client's set-up (pgjdbc's ``SET
# application_name``), which moves ``state_change`` once: not a use by the app.
OPENING_SECONDS = 2.0


@dataclass
class Backend:
    """One backend of the app, as ``pg_stat_activity`` showed it from outside."""

    pid: int
    start: float  # backend_start, epoch seconds (the server's clock: this machine's)
    app: str  # application_name: the pod's name
    first_seen: float
    last_seen: float
    changes: list[float] = field(default_factory=list)  # each distinct state_change seen
    gone_at: float | None = None  # first sample it was missing from, once it has been seen

    @property
    def uses(self) -> int:
        """Uses seen after it was opened (each moves ``state_change`` on)."""
        return max(0, len(self.changes) - 1)

    @property
    def used_after_opening(self) -> bool:
        """Whether a statement ran on it later than its client's set-up just after opening."""
        return any(change - self.start > OPENING_SECONDS for change in self.changes)


@dataclass
class BackendWatch:
    """Follows the app's backends (``application_name`` starting with ``prefix``) by identity,
    pid and ``backend_start``, every ``SAMPLE_EVERY`` seconds, reconnecting after an outage."""

    dsn: str
    prefix: str
    seen: dict[tuple[int, float], Backend] = field(default_factory=dict)
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _present: set[tuple[int, float]] = field(default_factory=set)

    def _sample(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(
            "SELECT pid, extract(epoch FROM backend_start)::float8, application_name, "
            "extract(epoch FROM state_change)::float8 FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND application_name LIKE %s",
            [self.prefix + "%"],
        ).fetchall()
        now = time.time()
        with self.lock:
            current: set[tuple[int, float]] = set()
            for pid, start, app, change in rows:
                key = (int(pid), float(start))
                current.add(key)
                b = self.seen.setdefault(key, Backend(key[0], key[1], str(app), now, now))
                b.last_seen = now
                if change is not None and (not b.changes or abs(change - b.changes[-1]) > 1e-3):
                    b.changes.append(float(change))
            for key in self._present - current:
                self.seen[key].gone_at = now
            self._present = current
            self.samples += 1

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop.is_set() and time.monotonic() < end:
            try:
                with psycopg.connect(
                    self.dsn, autocommit=True, connect_timeout=3, application_name="test-watch"
                ) as conn:
                    while not self.stop.is_set() and time.monotonic() < end:
                        self._sample(conn)
                        self.stop.wait(SAMPLE_EVERY)
            except psycopg.Error:  # PostgreSQL restarted or down: look again shortly
                self.stop.wait(SAMPLE_EVERY)

    def backends(self) -> list[Backend]:
        with self.lock:
            return list(self.seen.values())

    def alive(self) -> list[Backend]:
        with self.lock:
            return [self.seen[k] for k in self._present]


@contextlib.contextmanager
def watching(dsn: str, seconds: float) -> Iterator[BackendWatch]:
    """A ``BackendWatch`` of the app's backends, running in a thread for at most ``seconds``."""
    watch = BackendWatch(dsn, f"{APP}-")
    thread = threading.Thread(target=watch.run, args=(seconds,), daemon=True)
    thread.start()
    try:
        eventually(lambda: watch.samples > 0, timeout=15, what="a first look at pg_stat_activity")
        yield watch
    finally:
        watch.stop.set()
        thread.join(timeout=10)


def pg_log(sandbox: Sandbox) -> Path:
    return sandbox.state_dir / "logs" / "postgres.log"


def pg_log_size(sandbox: Sandbox) -> int:
    path = pg_log(sandbox)
    return path.stat().st_size if path.exists() else 0


def terminated_in_pg_log(sandbox: Sandbox, offset: int) -> list[int]:
    """pids of the backends PostgreSQL's log says were terminated by an administrator (by
    ``pg_terminate_backend``) since ``offset``, whoever they were (nothing but the operator
    terminates a backend in these tests); 0 for a line without a pid."""
    with pg_log(sandbox).open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    found = []
    for line in text.splitlines():
        if TERMINATED in line:
            m = re.search(r"\[(\d+)\]", line)  # the default log_line_prefix: '%m [%p] '
            found.append(int(m.group(1)) if m else 0)
    return found


def start_budget(sandbox: Sandbox, budgets: Budgets) -> None:
    """The README's first budget, with room, and its first probe done."""
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    budgets.create("shop", THREE_FIELDS)
    wait_until(lambda: budgets.status("shop").get("usage"), 60, "the first probe")


def deploy_pool(
    workloads: Workloads,
    namespace: str,
    *,
    size: int,
    lanes: int,
    gap: tuple[float, float],
    seconds: float,
    replicas: int = 1,
    kind: str = "psycopg",
    app_env: dict[str, str] | None = None,
) -> list[str]:
    """The pool app ``kind`` (psycopg_pool unless told) with ``size`` connections (``app_env``
    for another kind), driven by ``lanes`` closed-loop lanes per pod (a request, then a pause of
    ``gap`` seconds) for ``seconds``; return its pods."""
    deploy_app(
        workloads,
        namespace,
        APP,
        kind=kind,
        driver_env=pool_settings(lanes, gap, seconds, **PAUSES),
        app_env=app_env if app_env is not None else {"POOL_SIZE": str(size)},
        replicas=replicas,
        labels=SHOP,
    )
    return app_pods(workloads, namespace)


def app_pods(workloads: Workloads, namespace: str) -> list[str]:
    return sorted(str(p.metadata.name) for p in workloads.pods(namespace, f"app={APP}"))


def requests(sandbox: Sandbox, namespace: str, pods: list[str]) -> list[dict[str, object]]:
    """Every request the app's pods logged (their own account of each)."""
    return [line for pod in pods for line in request_lines(sandbox.pod_log(namespace, pod, "app"))]


def outcomes(sandbox: Sandbox, namespace: str, pods: list[str]) -> Counter[str]:
    total: Counter[str] = Counter()
    for pod in pods:
        total.update(count_outcomes(sandbox.pod_log(namespace, pod, "app")))
    return total


def logged_at(line: dict[str, object]) -> float:
    return dt.datetime.fromisoformat(str(line["time"])).timestamp()


def drivers_done(sandbox: Sandbox, namespace: str, pods: list[str]) -> bool:
    return all('"event": "done"' in sandbox.pod_log(namespace, p, "driver") for p in pods)


def leak_events(budgets: Budgets) -> list[str]:
    """Every ``LeakDetected`` Event of the namespace (whatever object it names), as text."""
    items = budgets.core.list_namespaced_event(budgets.namespace).items
    return [
        f"{e.involved_object.kind}/{e.involved_object.name}: {e.message}"
        for e in items
        if e.reason == "LeakDetected"
    ]


@dataclass
class Verdicts:
    """What the operator's status called the app, looked at now and then: reported beside the
    figures, never asserted (the damage is counted from the app and PostgreSQL)."""

    looks: list[tuple[float, str]] = field(default_factory=list)

    def look(self, budgets: Budgets) -> None:
        try:
            owners = (budgets.status("shop").get("usage") or {}).get("byOwner") or []
        except Exception:  # an API hiccup: no look this time
            return
        found = next((o for o in owners if o.get("owner") == f"Deployment/{APP}"), None)
        self.looks.append((time.time(), str((found or {}).get("class", "-"))))

    def summary(self, since: float) -> str:
        leaking = [t for t, c in self.looks if c == "Leaking" and t >= since]
        if not leaking:
            return f"never Leaking ({Counter(c for _, c in self.looks)})"
        return (
            f"Leaking {leaking[0] - since:.0f}s after the start, until {leaking[-1] - since:.0f}s"
            f" ({len(leaking)} of {len(self.looks)} looks)"
        )


def operator_terminated(op: Operator) -> str:
    """The operator's own count of terminated connections (reported, never asserted)."""
    try:
        text = op.metrics()
    except OSError:
        return "?"
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("connbudget_terminated_connections_total{")
    )
    return f"{total:.0f}"


def observe(
    until: Callable[[], T | None],
    seconds: float,
    budgets: Budgets,
    verdicts: Verdicts,
) -> T | None:
    """Look at the operator's verdict every second until ``until`` answers or ``seconds`` pass;
    return its answer (None at the deadline)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = until()
        if got:
            return got
        verdicts.look(budgets)
        time.sleep(1.0)
    return None


def never() -> None:
    return None


WARMUP_POOL = 8
WARMUP_STAGGER = 2.5  # seconds between the first pod Ready and the second asked for
WARMUP_DRIVE = 70.0  # seconds each pod's driver sends requests


def test_a_warm_up_burst_of_two_pods_started_apart_loses_nothing(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    pg_dsn: str,
) -> None:
    start_budget(sandbox, budgets)
    offset = pg_log_size(sandbox)
    verdicts = Verdicts()
    with watching(pg_dsn, WARMUP_DRIVE + 120) as watch:
        started = time.time()
        # One pod first; the second 2.5 s after it is Ready, as a Deployment's pods start on a
        # real cluster. Each opens its 8 connections at once, then a request every 5-15 s.
        deploy_pool(
            workloads, namespace, size=WARMUP_POOL, lanes=1, gap=(5.0, 15.0), seconds=WARMUP_DRIVE
        )
        time.sleep(WARMUP_STAGGER)
        workloads.apps.patch_namespaced_deployment_scale(APP, namespace, {"spec": {"replicas": 2}})
        workloads.wait_available(namespace, APP, 2)
        pods = app_pods(workloads, namespace)
        assert len(pods) == 2, pods
        done = observe(
            lambda: drivers_done(sandbox, namespace, pods), WARMUP_DRIVE + 60, budgets, verdicts
        )
        time.sleep(2 * SAMPLE_EVERY)  # one more look at the backends
    found = watch.backends()
    # Each pod's warm-up burst: the first connections its pool opened.
    by_pod = {p: sorted(b.start for b in found if b.app == p)[:WARMUP_POOL] for p in pods}
    first = sorted(starts[0] for starts in by_pod.values() if starts)
    vanished = [b for b in found if b.gone_at is not None]
    counts = outcomes(sandbox, namespace, pods)
    killed = terminated_in_pg_log(sandbox, offset)
    leaks = leak_events(budgets)
    summary = (
        f"backends per pod {[len(s) for s in by_pod.values()]}, bursts "
        f"{[round(s[-1] - s[0], 2) for s in by_pod.values() if s]}s long and "
        f"{first[-1] - first[0] if len(first) == 2 else float('nan'):.1f}s apart; "
        f"requests {dict(counts)}, {failures(counts)} failed; {len(vanished)} backends vanished, "
        f"{len(killed)} terminated by an administrator (PostgreSQL's log); "
        f"LeakDetected {leaks}; operator: {verdicts.summary(started)}, "
        f"{operator_terminated(operator)} terminated"
    )
    print(summary)
    # The scenario is the one claimed: two bursts of 8, started apart, sparse requests served.
    assert done, f"the drivers did not finish: {summary}"
    assert all(len(s) >= WARMUP_POOL for s in by_pod.values()), summary
    assert len(first) == 2, summary
    assert first[1] - first[0] >= 2.0, summary
    assert sum(counts.values()) >= 8, summary
    # ... and nothing was lost.
    assert failures(counts) == 0, summary
    assert not vanished, summary
    assert not killed, summary
    assert not leaks, summary
    assert app_pods(workloads, namespace) == pods, "a pod of the app was replaced"


RESTART_POOL = 8
RESTART_WARM = 45.0  # seconds of reuse before the restart
# Seconds PostgreSQL is down: a restart with a shutdown checkpoint and recovery; long enough for
# a poll of the operator (every 5 s while calm) to find it down.
RESTART_OUTAGE = 10.0
RESTART_RECONNECT = 45.0  # seconds the pool may take to open its 8 connections again
RESTART_AFTER = 55.0  # seconds watched after the pool reconnected
RESTART_DRIVE = RESTART_WARM + RESTART_OUTAGE + 20 + RESTART_AFTER


def test_a_warmed_pool_reconnecting_after_a_postgres_restart_loses_nothing(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    pg_dsn: str,
) -> None:
    start_budget(sandbox, budgets)
    verdicts = Verdicts()
    with watching(pg_dsn, RESTART_DRIVE + 120) as watch:
        # Three lanes, each a request every 5-15 s: lent in turn, each of the 8 connections is
        # used again every 20-30 s, and the operator learns those gaps before the restart.
        pods = deploy_pool(
            workloads, namespace, size=RESTART_POOL, lanes=3, gap=(5.0, 15.0), seconds=RESTART_DRIVE
        )
        assert len(pods) == 1, pods
        started = time.time()
        observe(never, RESTART_WARM, budgets, verdicts)
        warmed = watch.alive()

        down_at = time.time()
        postgres.stop_postgres(sandbox.state_dir)
        try:
            time.sleep(RESTART_OUTAGE)
        finally:
            postgres.start_postgres(sandbox.state_dir, sandbox.db)
            refresh_pids(sandbox)
        # After the shutdown's own "terminating connection" lines (one per backend it ended).
        offset = pg_log_size(sandbox)

        def reconnected() -> float | None:
            new = [b for b in watch.alive() if b.start > down_at]
            return max(b.start for b in new) if len(new) >= RESTART_POOL else None

        # Failures are counted from here: those before (the outage's, one per connection the
        # restart broke, each found by the request it was lent to) are not the operator's.
        came_back = observe(reconnected, RESTART_RECONNECT, budgets, verdicts)
        back_at = came_back or time.time()
        observe(never, RESTART_AFTER, budgets, verdicts)
        time.sleep(2 * SAMPLE_EVERY)
    new = [b for b in watch.backends() if b.start > down_at]
    vanished = [b for b in new if b.gone_at is not None]
    lines = requests(sandbox, namespace, pods)
    during = Counter(str(r["outcome"]) for r in lines if down_at <= logged_at(r) <= back_at)
    after = Counter(str(r["outcome"]) for r in lines if logged_at(r) > back_at)
    killed = terminated_in_pg_log(sandbox, offset)
    leaks = leak_events(budgets)
    reused = [b for b in warmed if b.uses >= 1]
    summary = (
        f"before the restart {len(reused)} of {len(warmed)} backends used again; "
        f"{'reconnected' if came_back else 'not reconnected'} {back_at - down_at:.1f}s after "
        f"the stop ({len(new)} new backends); requests during "
        f"the outage {dict(during)}, after it {dict(after)}, {failures(after)} failed; "
        f"{len(vanished)} new backends vanished, {len(killed)} terminated by an administrator "
        f"(PostgreSQL's log); LeakDetected {leaks}; operator: {verdicts.summary(started)}, "
        f"{operator_terminated(operator)} terminated"
    )
    print(summary)
    # The scenario is the one claimed: a warmed pool, reused, that served after the restart.
    assert len(reused) >= RESTART_POOL - 2, summary
    assert sum(after.values()) >= 8, summary
    # ... and the operator took nothing of it after the restart.
    assert failures(after) == 0, summary
    assert not vanished, summary
    assert not killed, summary
    assert not leaks, summary
    assert came_back, summary
    assert app_pods(workloads, namespace) == pods, "the app's pod was replaced"


SPARE_PODS = 3
SPARE_POOL = 10
SPARE_LANES = 2  # requests a pod serves at a time, at most
SPARE_DRIVE = 80.0


@dataclass(frozen=True)
class SparePool:
    """A pool app of ``SPARE_POOL`` connections, and how many of them each pod leaves unused."""

    kind: str
    app_env: dict[str, str]
    # Least connections a pod opens and never uses: the scenario claimed, checked from outside.
    unused: int


SPARE_POOLS = [
    # Lent in turn (first in, first out): all 10 used, each idle about a minute between two uses.
    pytest.param(
        SparePool("psycopg", {"POOL_SIZE": str(SPARE_POOL)}, unused=0),
        id="psycopg_pool-lent-in-turn",
    ),
    # All 10 opened at start and kept (minimumIdle = maximumPoolSize); the same 2 lent again and
    # again (the thread's last, else the first idle of its list), the other 8 never.
    pytest.param(
        SparePool(
            "java-hikari",
            {"HIKARI_MAXIMUM_POOL_SIZE": str(SPARE_POOL), "HIKARI_MINIMUM_IDLE": str(SPARE_POOL)},
            unused=SPARE_POOL - SPARE_LANES,
        ),
        id="hikaricp-minimum-idle",
    ),
]


@pytest.mark.parametrize("pool", SPARE_POOLS)
def test_a_pool_with_spare_idle_connections_loses_nothing(
    pool: SparePool,
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    pg_dsn: str,
) -> None:
    start_budget(sandbox, budgets)
    offset = pg_log_size(sandbox)
    verdicts = Verdicts()
    with watching(pg_dsn, SPARE_DRIVE + 120) as watch:
        started = time.time()
        # 10 connections a pod, 2 requests at a time at most, a request every 5-20 s a lane.
        pods = deploy_pool(
            workloads,
            namespace,
            size=SPARE_POOL,
            lanes=SPARE_LANES,
            gap=(5.0, 20.0),
            seconds=SPARE_DRIVE,
            replicas=SPARE_PODS,
            kind=pool.kind,
            app_env=pool.app_env,
        )
        assert len(pods) == SPARE_PODS, pods
        done = observe(
            lambda: drivers_done(sandbox, namespace, pods), SPARE_DRIVE + 60, budgets, verdicts
        )
        time.sleep(2 * SAMPLE_EVERY)
    found = watch.backends()
    vanished = [b for b in found if b.gone_at is not None]
    idle = sorted(
        round(after - before) for b in found for before, after in itertools.pairwise(b.changes)
    )
    unused = {p: [b for b in found if b.app == p and not b.used_after_opening] for p in pods}
    # How long the unused ones sat idle (until they vanished or the last look).
    unused_idle = [
        round(b.last_seen - b.changes[-1]) for u in unused.values() for b in u if b.changes
    ]
    counts = outcomes(sandbox, namespace, pods)
    killed = terminated_in_pg_log(sandbox, offset)
    leaks = leak_events(budgets)
    summary = (
        f"{pool.kind}: {len(found)} backends over {len(pods)} pods, never used after opening "
        f"{[len(u) for u in unused.values()]} (idle up to {max(unused_idle, default=0)}s), "
        f"longest idle stretches between uses {idle[-5:]}s; requests {dict(counts)}, "
        f"{failures(counts)} failed; {len(vanished)} backends vanished, {len(killed)} terminated "
        f"by an administrator (PostgreSQL's log); LeakDetected {leaks}; operator: "
        f"{verdicts.summary(started)}, {operator_terminated(operator)} terminated"
    )
    print(summary)
    # The scenario is the one claimed: 3 pods of 10, served, with the pool's unused spares.
    assert done, f"the drivers did not finish: {summary}"
    assert len(found) >= SPARE_PODS * SPARE_POOL, summary
    assert all(len(u) >= pool.unused for u in unused.values()), summary
    assert sum(counts.values()) >= 10, summary
    # ... and nothing was lost.
    assert failures(counts) == 0, summary
    assert not vanished, summary
    assert not killed, summary
    assert not leaks, summary
    assert app_pods(workloads, namespace) == pods, "a pod of the app was replaced"


@pytest.fixture(autouse=True)
def _apps_ready(sandbox: Sandbox) -> None:
    """The real apps need their environments and builds (``tests/setup`` installs them)."""
    from sandbox.apps import builds, envs

    missing = [name for name in envs.ENVS if not envs.is_ready(name)]
    missing += [name for name in builds.BUILDS if not builds.is_ready(name)]
    assert not missing, f"app environments or builds missing: {missing}; run tests/setup"
