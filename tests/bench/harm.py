"""Benchmark: do no harm. Healthy apps of four ecosystems through the events of a real life, and
leaks beside them, each with the three-field ConnectionBudget a new user writes.

Each scenario gets its own PostgreSQL 15 (``max_connections`` 100, a budget of 80) and namespace
inside one sandbox, and its own operator process (standalone, or two replicas under leader
election for the failover), started together with the apps. Healthy apps, without pre-ping or
health checks where the library allows, with real habits: Django 5.0.2 under gunicorn with
``CONN_MAX_AGE``, psycopg_pool (``min_size`` connections opened at start, sparse bursts),
SQLAlchemy's ``QueuePool`` (reuse gaps up to three minutes), node-postgres' ``pg.Pool`` (sparse
bursts, ``idleTimeoutMillis: 0``), pgx's ``pgxpool``, Go's ``database/sql`` with ``MaxIdleConns``
below the concurrency, HikariCP with ``minimumIdle`` below ``maximumPoolSize``; a share of their
requests pause 2-10 s between two queries. The events, one per scenario: none (operator and apps
start together, two of the pods 2.5 s apart), PostgreSQL restarted, PostgreSQL stalled 10 s, the
operator restarted, its leader killed (two replicas), a rollout of every app, PgBouncer restarted
under an app behind it, a quiet period then every lane at once, and a breach another workload
(outside the selector) causes while an app behind PgBouncer is inside it.

Damage is counted from the workloads' and PostgreSQL's own logs and the API server's audit log,
never from the operator's: healthy backends terminated (PostgreSQL's ``administrator command``
FATALs of a healthy pod, outside a shutdown of the server), healthy requests failed (the drivers'
lines; in the scenarios whose event breaks connections itself, only those the operator's
terminations explain are the operator's), healthy pods evicted (audit log) or restarted (their
containers' restart counts), and ``LeakDetected`` Events naming a healthy app.

The leak scenarios: the Django 5.0.1 ASGI leak at 1, 7 and 20 connections a second with 30 % of
the app's other requests pausing 2-8 s between two queries on one connection; a node-postgres
``new pg.Client()`` leak without an ``error`` listener (each termination kills the process),
side by side with ``idle_session_timeout = 10s``; a Go leak of connections never closed; an
``idle in transaction`` leak. Counted: refused connections (a probe client's and the apps'),
paused requests broken, the share of the node leak's requests answered, and whether the
idle-in-transaction leak was restarted before it crossed the budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from kubernetes.client.rest import ApiException

from bench.common import (
    Kube,
    Operator,
    Server,
    Ticker,
    is_refusal,
    parse_terminations,
    say,
    workload_of,
)
from bench.exhaustion import (
    REFUSED_SHARE_AT_20,
    _LaneSandbox,
    _pods,
    _records,
    in_window,
    outcome_counts,
)
from sandbox import postgres
from sandbox.apps.deploy import APP_IMAGES, deploy_app, leak_settings, pool_settings, rate_settings
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads
from sandbox.workloads.outcomes import FAILURES

MAX_CONNECTIONS = 100
BUDGET = 80
TIER = {"tier": "shop"}  # what the budget selects
OUTSIDE = {"tier": "other"}
PAUSES = {"INFLIGHT_FRACTION": "0.2", "INFLIGHT_IDLE_MIN": "2", "INFLIGHT_IDLE_MAX": "10"}
LEAK_PAUSES = {"INFLIGHT_FRACTION": "0.3", "INFLIGHT_IDLE_MIN": "2", "INFLIGHT_IDLE_MAX": "8"}
STAGGER_SECONDS = 2.5  # a Deployment's second pod starts this long after its first
STALL_SECONDS = 10.0
SHUTDOWN_GRACE = 10.0  # FATALs this soon after a shutdown request are the shutdown's
PROBE_INTERVAL = 0.5
ANSWERED_TARGET = 0.95  # the node leak that dies on termination: requests answered
NODE_LEAK_RATE = 2.0
LEAK_RATES = (1.0, 7.0, 20.0)


@dataclass(frozen=True)
class App:
    """A workload: ``kind`` of ``sandbox.apps.deploy`` (or ``leaky`` for the plain leaky app)."""

    name: str
    kind: str
    label: str
    driver: dict[str, str] = field(default_factory=dict)
    app_env: dict[str, str] = field(default_factory=dict)
    replicas: int = 1
    stagger: bool = False  # its second pod starts STAGGER_SECONDS after the first
    via_pooler: bool = False  # reaches PostgreSQL through a PgBouncer Deployment
    labels: dict[str, str] = field(default_factory=lambda: dict(TIER))
    healthy: bool = True


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    apps: tuple[App, ...]
    event: str | None = None  # see EVENTS
    event_at: float = 0.0
    seconds: float = 180.0
    idle_session_timeout: int | None = None  # a lane of PostgreSQL's own knob, no operator
    guard: str = "connbudget"  # or "idle_session_timeout", or "none": no operator at all
    replicas: int = 1  # operator replicas (2: under leader election, for the failover)
    leak: str | None = None  # the leak's workload name, in a leak scenario


def _bursts(low: int, high: int, every: tuple[float, float], seconds: float) -> dict[str, str]:
    return {
        "BURST_SIZE_MIN": str(low),
        "BURST_SIZE_MAX": str(high),
        "BURST_EVERY_MIN": str(every[0]),
        "BURST_EVERY_MAX": str(every[1]),
        "DRIVE_SECONDS": str(seconds),
        **PAUSES,
    }


def healthy_apps(seconds: float, *, few: bool = False) -> tuple[App, ...]:
    """The healthy apps of every ecosystem whose image the sandbox has, driven ``seconds``."""
    drive = seconds + 60
    apps = (
        App(
            "django",
            "django",
            "Django 5.0.2, gunicorn, CONN_MAX_AGE",
            pool_settings(3, (5.0, 60.0), drive, **PAUSES),
        ),
        App(
            "psycopg",
            "psycopg",
            "psycopg_pool min_size 8, check=None, 2 pods 2.5 s apart",
            _bursts(2, 6, (20.0, 60.0), drive),
            {"POOL_SIZE": "8"},
            replicas=2,
            stagger=True,
        ),
        App(
            "sqlalchemy",
            "sqlalchemy",
            "SQLAlchemy QueuePool, no pre-ping",
            pool_settings(3, (30.0, 180.0), drive, **PAUSES),
        ),
        App(
            "node",
            "node-pool",
            "node-postgres pg.Pool max 10, idleTimeoutMillis 0",
            _bursts(2, 6, (30.0, 110.0), drive),
            {"POOL_MAX": "10"},
        ),
        App(
            "pgx",
            "go-pgxpool",
            "pgx pgxpool",
            pool_settings(4, (5.0, 90.0), drive, **PAUSES),
        ),
        App(
            "gosql",
            "go-sql",
            "database/sql, MaxIdleConns 2 of 8",
            _bursts(3, 8, (10.0, 40.0), drive),
            {"SQL_MAX_OPEN_CONNS": "8", "SQL_MAX_IDLE_CONNS": "2"},
        ),
        App(
            "hikari",
            "java-hikari",
            "HikariCP minimumIdle 2 of 10",
            _bursts(2, 8, (15.0, 60.0), drive),
            {"HIKARI_MAXIMUM_POOL_SIZE": "10", "HIKARI_MINIMUM_IDLE": "2"},
        ),
    )
    found = tuple(a for a in apps if a.kind in APP_IMAGES)
    return found[:3] if few else found


def scenarios(quick: bool) -> tuple[Scenario, ...]:
    """The healthy lifecycle scenarios, then the leak scenarios (``quick``: shorter, fewer)."""
    at, length = (40.0, 100.0) if quick else (60.0, 180.0)
    quiet = 90.0 if quick else 600.0
    apps = healthy_apps(length, few=quick)
    behind = App(
        "pooled",
        "psycopg",
        "psycopg_pool through PgBouncer",
        pool_settings(4, (5.0, 60.0), length + 60, **PAUSES),
        via_pooler=True,
    )
    outside = App(
        "other",
        "leaky",
        "a leak outside the selector",
        app_env={"LEAK_RATE": "3", "LEAK_MAX": "85"},
        labels=dict(OUTSIDE),
        healthy=False,
    )
    out = [
        Scenario("start", "operator and apps start together", apps, seconds=length),
        Scenario("pg-restart", "PostgreSQL restarts", apps, "pg-restart", at, length),
        Scenario("pg-stall", "PostgreSQL stalls 10 s", apps, "pg-stall", at, length),
        Scenario("op-restart", "the operator restarts", apps, "op-restart", at, length),
        Scenario("failover", "the leader is killed", apps, "failover", at, length, replicas=2),
        Scenario("rollout", "a rollout replaces every pod", apps, "rollout", at, length),
        Scenario(
            "pgb-restart", "PgBouncer restarts", (behind, *apps[:2]), "pgb-restart", at, length
        ),
        Scenario(
            "quiet",
            f"no traffic for {quiet:.0f} s, then every lane at once",
            tuple(dataclasses.replace(a, driver=a.driver | _quiet(at, quiet)) for a in apps),
            seconds=at + quiet + 90,
        ),
        Scenario(
            "outside",
            "a breach another workload causes, an app behind PgBouncer inside",
            (behind, outside, *apps[:1]),
            seconds=length,
        ),
    ]
    return (*out, *leak_scenarios(quick))


def _quiet(after: float, seconds: float) -> dict[str, str]:
    return {"QUIET_AFTER": str(after), "QUIET_SECONDS": str(seconds), "DRIVE_SECONDS": "100000"}


def leak_scenarios(quick: bool) -> tuple[Scenario, ...]:
    length = 90.0 if quick else 180.0
    beside = healthy_apps(length, few=True)[:2]
    out: list[Scenario] = []
    for rate in LEAK_RATES[:2] if quick else LEAK_RATES:
        leak = App(
            "leak",
            "leak",
            f"Django 5.0.1 ASGI leak at {rate:g}/s, 30 % of requests pausing 2-8 s",
            leak_settings(rate, length, DRIVE_RATE="2", **LEAK_PAUSES),
            replicas=max(1, round(rate / 10)),
            healthy=False,
        )
        out.append(
            Scenario(f"leak-{rate:g}", leak.label, (leak, *beside), seconds=length, leak="leak")
        )
        if rate == max(LEAK_RATES):
            # The fastest leak's target is a share of what it does unguarded, in the same run.
            out.append(
                Scenario(
                    f"leak-{rate:g}-none",
                    leak.label + " (no guard)",
                    (leak, *beside),
                    seconds=length,
                    leak="leak",
                    guard="none",
                )
            )
    if "node-leak" in APP_IMAGES:
        node = App(
            "nodeleak",
            "node-leak",
            "node-postgres new pg.Client() leak, no error listener, 2 pods",
            rate_settings(NODE_LEAK_RATE, length + 30),
            replicas=2,
            healthy=False,
        )
        for ist in (None, 10):
            out.append(
                Scenario(
                    "node-leak" if ist is None else "node-leak-ist10",
                    node.label + ("" if ist is None else " (idle_session_timeout 10 s, no guard)"),
                    (node, *beside[:1]),
                    seconds=length,
                    idle_session_timeout=ist,
                    guard="connbudget" if ist is None else "idle_session_timeout",
                    leak="nodeleak",
                )
            )
    if "go-leak" in APP_IMAGES:
        go = App(
            "goleak",
            "go-leak",
            "Go pgx.Connect leak, never closed",
            rate_settings(3.0, length + 30),
            healthy=False,
        )
        out.append(Scenario("go-leak", go.label, (go, *beside[:1]), seconds=length, leak="goleak"))
    # 1/s: unguarded it crosses the budget within the scenario (at 0.5/s it never got near it,
    # peak 63 of 80, and the target was met without the operator doing anything).
    tx = App(
        "txleak",
        "leaky",
        "idle in transaction leak, 1/s",
        app_env={"LEAK_RATE": "1", "LEAK_MAX": "150", "IN_TRANSACTION": "1"},
        healthy=False,
    )
    out.append(Scenario("tx-leak", tx.label, (tx, *beside[:1]), seconds=length, leak="txleak"))
    return tuple(out)


# --- one scenario --------------------------------------------------------------------------------


def budget_spec() -> dict[str, Any]:
    return {
        "database": {"secretRef": {"name": "pg-monitor"}},
        "budget": {"maxConnections": BUDGET},
        "selector": {"matchLabels": dict(TIER)},
    }


@dataclass
class Run:
    """What one scenario's measurements are made of, while it plays."""

    scenario: Scenario
    server: Server
    state: Path  # the server's folder (its restart)
    namespace: str
    started: float = 0.0
    operators: list[Operator] = field(default_factory=list)
    tries: list[tuple[float, str]] = field(default_factory=list)
    # (time, client backends counted against the budget, of them idle in transaction)
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    shutdowns: list[float] = field(default_factory=list)  # when the server was asked to stop
    event_window: tuple[float, float] | None = None
    pooler_ip: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def probe(self) -> None:
        t = time.time()
        try:
            psycopg.connect(
                self.server.app_dsn(), connect_timeout=2, application_name="probe"
            ).close()
        except psycopg.OperationalError as e:
            self.tries.append((t, "refused" if is_refusal(e) else "error"))
        else:
            self.tries.append((t, "ok"))

    def sample(self) -> None:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = self.server.superuser()
            row = self.conn.execute(
                "SELECT count(*) FILTER (WHERE datname = 'app' AND application_name NOT IN "
                "('connbudget-probe', 'probe')), count(*) FILTER (WHERE state LIKE 'idle in "
                "transaction%') FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ).fetchone()
        except psycopg.Error:
            self.conn = None  # the server restarts or stalls: sampled again when it is back
            return
        if row is not None:
            with self.lock:
                self.samples.append((time.time(), int(row[0]), int(row[1])))


def _deploy(sb: Sandbox, kube: Kube, run: Run, app: App) -> None:
    info = run.server.info
    if app.via_pooler:
        assert run.pooler_ip is not None
        info = dataclasses.replace(info, host=run.pooler_ip, pg_port=6432)
    wl = Workloads(sandbox=_LaneSandbox(sb, info), api=kube.api)
    first = 1 if app.stagger else app.replicas
    if app.kind == "leaky":
        wl.deploy(
            run.namespace, app.name, replicas=first, env=app.app_env, labels=app.labels, wait=False
        )
    else:
        deploy_app(
            wl,
            run.namespace,
            app.name,
            kind=app.kind,
            driver_env=app.driver,
            app_env=app.app_env,
            replicas=first,
            labels=app.labels,
            wait=False,
        )
    if app.stagger and app.replicas > first:
        threading.Thread(target=_scale_later, args=(kube, run.namespace, app), daemon=True).start()


def _scale_later(kube: Kube, namespace: str, app: App) -> None:
    """Scale to the app's replicas STAGGER_SECONDS after its first pod runs (bounded)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(ApiException):
            pods = kube.core.list_namespaced_pod(namespace, label_selector=f"app={app.name}")
            if any(p.status.phase == "Running" for p in pods.items):
                break
        time.sleep(0.5)
    time.sleep(STAGGER_SECONDS)
    with contextlib.suppress(ApiException):
        kube.apps.patch_namespaced_deployment_scale(
            app.name, namespace, {"spec": {"replicas": app.replicas}}
        )


def _postgres_pids(run: Run) -> list[int]:
    """The server's postmaster and its children (backends, background workers)."""
    master = run.server.pids[0]
    found = [master]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parts = stat.read_text().rsplit(")", 1)[1].split()
            if int(parts[1]) == master:
                found.append(int(stat.parent.name))
    return found


def _event(sb: Sandbox, kube: Kube, run: Run, out_dir: Path) -> None:
    """Play the scenario's event; ``run.event_window`` says when it broke things itself."""
    sc = run.scenario
    began = time.time()
    if sc.event == "pg-restart":
        run.shutdowns.append(time.time())
        # The sandbox's own server keeps its pids in state.json; a benchmark's gets one here.
        (run.state / "state.json").write_text(
            json.dumps({"pids": {"postgres": run.server.pids[0]}})
        )
        postgres.stop_postgres(run.state)
        postgres.start_postgres(run.state, run.server.info)
        run.server.pids[0] = json.loads((run.state / "state.json").read_text())["pids"]["postgres"]
    elif sc.event == "pg-stall":
        pids = _postgres_pids(run)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        time.sleep(STALL_SECONDS)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
    elif sc.event == "op-restart":
        for op in run.operators:
            op.stop()
        run.operators = [
            Operator.start(sb, [run.namespace], out_dir / f"harm-{sc.key}-operator-2.log")
        ]
    elif sc.event == "failover":
        # The replica that holds the Lease (in the namespace it watches) is killed.
        leader = _leader(kube, run.namespace)
        victim = next((op for op in run.operators if _identity(op) == leader), run.operators[0])
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=10)
    elif sc.event == "rollout":
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for app in sc.apps:
            if app.healthy:
                body = {
                    "spec": {
                        "template": {
                            "metadata": {
                                "annotations": {"kubectl.kubernetes.io/restartedAt": stamp}
                            }
                        }
                    }
                }
                with contextlib.suppress(ApiException):
                    kube.apps.patch_namespaced_deployment(app.name, run.namespace, body)
    elif sc.event == "pgb-restart":
        _restart_pgbouncer(sb, run)
    run.event_window = (began, time.time())


LEASE = "connbudget-operator"  # one shard: the operator's single Lease


def _leader(kube: Kube, namespace: str) -> str | None:
    """Who holds the operator's Lease (None: nobody yet)."""
    import kubernetes

    with contextlib.suppress(ApiException):
        lease = kubernetes.client.CoordinationV1Api(kube.api).read_namespaced_lease(
            LEASE, namespace
        )
        return str(lease.spec.holder_identity) if lease.spec.holder_identity else None
    return None


def _identity(op: Operator) -> str | None:
    """A replica's identity, as it logs it when its election starts."""
    for line in op.log.read_text(errors="replace").splitlines():
        if '"leader election"' in line or '"sharded election"' in line:
            return str(json.loads(line)["identity"])
    return None


def _restart_pgbouncer(sb: Sandbox, run: Run) -> None:
    """End the PgBouncer pod's process: the kubelet restarts its container, same address."""
    for pid, cmd in sb.processes().items():
        if "pgbouncer" in cmd and "pgbouncer.ini" in cmd and run.namespace in _pod_of(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


def _pod_of(pid: int) -> str:
    """The pod folder a sandbox process runs in (its working directory), or ''."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/cwd")
    return ""


def play(sb: Sandbox, kube: Kube, sc: Scenario, out_dir: Path) -> dict[str, Any]:
    """Play one scenario on a fresh server and namespace; return its figures."""
    ns = f"harm-{sc.key}"
    server = Server.start(sb, ns, max_connections=MAX_CONNECTIONS)
    run = Run(scenario=sc, server=server, state=sb.state_dir / "bench" / ns, namespace=ns)
    try:
        server.log_backends()
        server.set_idle_session_timeout(sc.idle_session_timeout)
        kube.namespace(ns)
        kube.secret(ns, "pg-monitor", {"dsn": server.monitor_dsn()})
        if sc.guard == "connbudget":
            kube.budget(ns, "shop", budget_spec())
            for i in range(sc.replicas):
                run.operators.append(
                    Operator.start(
                        sb,
                        [ns],
                        out_dir / f"harm-{sc.key}-operator-{i}.log",
                        shards=1 if sc.replicas > 1 else None,
                    )
                )
        if any(a.via_pooler for a in sc.apps):
            wl = Workloads(sandbox=_LaneSandbox(sb, server.info), api=kube.api)
            (run.pooler_ip,) = wl.deploy_pgbouncer(ns, pool_size=20)
        run.started = time.time()
        for app in sc.apps:
            _deploy(sb, kube, run, app)
        tickers = [
            Ticker(run.probe, interval=PROBE_INTERVAL, limit=sc.seconds + 60).start(),
            Ticker(run.sample, interval=0.5, limit=sc.seconds + 60).start(),
        ]
        try:
            if sc.event is not None:
                _sleep_until(run.started + sc.event_at)
                say(f"harm {sc.key}: {sc.event}")
                _event(sb, kube, run, out_dir)
            _sleep_until(run.started + sc.seconds)
        finally:
            for t in tickers:
                t.stop()
        return _measure(sb, kube, run)
    finally:
        for op in run.operators:
            op.stop()
        if run.conn is not None:
            with contextlib.suppress(psycopg.Error):
                run.conn.close()
        kube.delete_namespaces([ns])
        server.stop()


def _sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 1.0))


# --- what the logs say ---------------------------------------------------------------------------

_SHUTDOWN = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) \S+ \[\d+\] app=\S* LOG:  received")


def shutdown_requests(log_text: str) -> list[float]:
    """When PostgreSQL's log says it was asked to shut down (``received ... shutdown request``)."""
    import datetime as dt

    found = []
    for line in log_text.splitlines():
        m = _SHUTDOWN.match(line)
        if m and "shutdown request" in line:
            when = dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.UTC)
            found.append(when.timestamp())
    return found


def operator_terminations(log_text: str, *, shutdowns: Sequence[float]) -> list[tuple[float, str]]:
    """``(time, pod)`` of each backend PostgreSQL says was terminated by an administrator
    command outside a shutdown (nothing else in the benchmark terminates a backend)."""
    return [
        (t, app)
        for t, app, cause in parse_terminations(log_text)
        if cause == "terminated" and not any(0 <= t - s <= SHUTDOWN_GRACE for s in shutdowns)
    ]


def evictions(audit_lines: Sequence[str], namespace: str) -> list[str]:
    """The pods of ``namespace`` evicted (the audit log's successful ``pods/eviction`` creates)."""
    found = []
    for raw in audit_lines:
        if not raw.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            e = json.loads(raw)
            ref = e.get("objectRef") or {}
            if (
                e.get("stage") == "ResponseComplete"
                and ref.get("subresource") == "eviction"
                and ref.get("namespace") == namespace
                and 200 <= int((e.get("responseStatus") or {}).get("code", 0)) < 300
            ):
                found.append(str(ref.get("name", "")))
    return found


def _container_restarts(kube: Kube, namespace: str) -> Counter[str]:
    found: Counter[str] = Counter()
    with contextlib.suppress(ApiException):
        for p in kube.core.list_namespaced_pod(namespace).items:
            for c in p.status.container_statuses or []:
                found[workload_of(p.metadata.name)] += c.restart_count or 0
    return found


def _leak_events(kube: Kube, namespace: str) -> list[str]:
    """The workloads ``LeakDetected`` Events name (``Deployment/<name>``)."""
    named = []
    with contextlib.suppress(ApiException):
        for e in kube.events(namespace):
            if e.reason == "LeakDetected":
                named += re.findall(r"Deployment/([a-z0-9-]+)", e.message or "")
    return named


def _restart_cause(kube: Kube, namespace: str) -> str | None:
    with contextlib.suppress(ApiException):
        obj = kube.custom.get_namespaced_custom_object(
            "connbudget.io", "v1alpha1", namespace, "connectionbudgets", "shop"
        )
        return ((obj.get("status") or {}).get("remediation") or {}).get("restartCause")
    return None


def _measure(sb: Sandbox, kube: Kube, run: Run) -> dict[str, Any]:
    sc, ns = run.scenario, run.namespace
    t0, t1 = run.started, run.started + sc.seconds
    pods = _pods(sb, ns)
    log_text = run.server.log_text()
    shutdowns = shutdown_requests(log_text)
    ended = operator_terminations(log_text, shutdowns=shutdowns)
    audit_log = sb.state_dir / "logs" / "audit.log"
    audit = audit_log.read_text(errors="replace").splitlines() if audit_log.exists() else []
    evicted = evictions(audit, ns)
    restarts = _container_restarts(kube, ns)
    named = Counter(_leak_events(kube, ns))
    apps: dict[str, Any] = {}
    for app in sc.apps:
        names = pods.get(app.name, [])
        sent = in_window(_records(sb, ns, names, "driver", "sent"), t0, t1)
        served = in_window(_records(sb, ns, names, "app", "request"), t0, t1)
        counts = outcome_counts(sent if sent else served)
        paused = [r for r in sent if float(r.get("idle") or 0) > 0 and r.get("kind") != "leak"]
        terminated = sum(1 for _, pod in ended if workload_of(pod) == app.name)
        apps[app.name] = {
            "label": app.label,
            "healthy": app.healthy,
            "requests": sum(counts.values()) - counts.get("abandoned", 0),
            "failed": sum(counts.get(k, 0) for k in FAILURES),
            "failed_by_outcome": {k: counts.get(k, 0) for k in FAILURES},
            "answered": counts.get("ok", 0),
            "paused": len(paused),
            "paused_broken": sum(1 for r in paused if r.get("outcome") == "inflight_broken"),
            "terminated": terminated,
            "evicted": sum(1 for p in evicted if workload_of(p) == app.name),
            "container_restarts": restarts.get(app.name, 0),
            "leak_detected_events": named.get(app.name, 0),
        }
    healthy = [a for a in apps.values() if a["healthy"]]
    counted = [(t, n) for t, n, _ in run.samples if t0 <= t <= t1]
    in_tx = [(t, n) for t, _, n in run.samples if t0 <= t <= t1]
    refused_apps = sum(a["failed_by_outcome"]["refused"] for a in apps.values())
    return {
        "key": sc.key,
        "label": sc.label,
        "event": sc.event,
        "seconds": sc.seconds,
        "guard": sc.guard,
        "apps": apps,
        "healthy_requests": sum(a["requests"] for a in healthy),
        "healthy_terminated": sum(a["terminated"] for a in healthy),
        # A request of a healthy app failed because of the operator only if the operator ended
        # one of its connections: none terminated, none failed because of it.
        "healthy_failed": sum(a["failed"] for a in healthy),
        "healthy_failed_by_operator": sum(min(a["failed"], a["terminated"]) for a in healthy),
        "healthy_evicted": sum(a["evicted"] for a in healthy),
        "healthy_restarted": sum(a["container_restarts"] for a in healthy),
        "false_leak_events": sum(a["leak_detected_events"] for a in healthy),
        "refused": sum(1 for t, w in run.tries if t0 <= t <= t1 and w == "refused") + refused_apps,
        "peak": max((n for _, n in counted), default=0),
        "peak_in_transaction": max((n for _, n in in_tx), default=0),
        "crossed_budget": any(n > BUDGET for _, n in counted),
        "restart_cause": _restart_cause(kube, ns),
        "leak": apps.get(sc.leak) if sc.leak else None,
    }


# --- the phase ------------------------------------------------------------------------------------


def run_phase(
    sb: Sandbox,
    kube: Kube,
    *,
    quick: bool,
    out_dir: Path,
    only: Callable[[Scenario], bool] = lambda s: True,
) -> dict[str, Any]:
    """Every scenario, one after the other; a scenario that fails is reported, not fatal."""
    results: dict[str, Any] = {"scenarios": {}, "errors": {}}
    for sc in scenarios(quick):
        if not only(sc):
            continue
        say(f"harm {sc.key}: {sc.label} ({sc.seconds:.0f} s, {len(sc.apps)} workloads)")
        started = time.monotonic()
        try:
            got = play(sb, kube, sc, out_dir)
        except Exception as e:  # a scenario's failure is its result, the others still run
            results["errors"][sc.key] = f"{type(e).__name__}: {e}"
            say(f"harm {sc.key}: failed: {type(e).__name__}: {e}")
            continue
        got["wall_seconds"] = round(time.monotonic() - started, 1)
        results["scenarios"][sc.key] = got
        say(
            f"harm {sc.key}: healthy terminated {got['healthy_terminated']}, failed "
            f"{got['healthy_failed']} (by the operator {got['healthy_failed_by_operator']}), "
            f"evicted {got['healthy_evicted']}, restarted {got['healthy_restarted']}, false "
            f"LeakDetected {got['false_leak_events']}, refused {got['refused']}"
        )
    results["targets"] = verdicts(results["scenarios"])
    return results


def merge(previous: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    """The scenarios of an earlier run of this phase, with those just run in their place (each
    kept one marked with the run it came from), and the targets computed again."""
    scenarios = {
        k: v | {"from_run": True}
        for k, v in previous.get("scenarios", {}).items()
        if k not in found["scenarios"]
    }
    scenarios.update(found["scenarios"])
    errors = {k: v for k, v in previous.get("errors", {}).items() if k not in found["scenarios"]}
    errors.update(found.get("errors", {}))
    return {"scenarios": scenarios, "errors": errors, "targets": verdicts(scenarios)}


def verdicts(found: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(target, figure, met)`` for every target the issue sets, from the figures alone."""
    out: list[tuple[str, str, bool]] = []
    for key, s in found.items():
        if s["guard"] != "connbudget":
            continue
        harm = (
            s["healthy_terminated"],
            s["healthy_failed_by_operator"],
            s["healthy_evicted"] + s["healthy_restarted"],
            s["false_leak_events"],
        )
        out.append(
            (
                f"{key}: no harm to healthy apps",
                "terminated {}, failed {}, evicted or restarted {}, false LeakDetected {}".format(
                    *harm
                ),
                not any(harm),
            )
        )
        leak = s.get("leak")
        if leak is None:
            continue
        unguarded = found.get(f"{key}-none")
        if key.startswith("leak-") and unguarded is not None:
            # The fastest leak fills the server in seconds: a share of no guard's refusals.
            most = REFUSED_SHARE_AT_20 * unguarded["refused"]
            out.append(
                (
                    f"{key}: at most {REFUSED_SHARE_AT_20:.0%} of no guard's refusals, 0 paused "
                    "requests broken",
                    f"refused {s['refused']} (no guard {unguarded['refused']}), paused broken "
                    f"{leak['paused_broken']} of {leak['paused']}",
                    s["refused"] <= most and leak["paused_broken"] == 0,
                )
            )
        elif key.startswith("leak-"):
            out.append(
                (
                    f"{key}: 0 refused, 0 paused requests broken",
                    f"refused {s['refused']}, paused broken {leak['paused_broken']} of "
                    f"{leak['paused']}",
                    s["refused"] == 0 and leak["paused_broken"] == 0,
                )
            )
        elif key == "node-leak":
            share = leak["answered"] / leak["requests"] if leak["requests"] else 0.0
            ist = found.get("node-leak-ist10", {}).get("leak") or {}
            ist_share = ist["answered"] / ist["requests"] if ist.get("requests") else None
            out.append(
                (
                    f"{key}: at least {ANSWERED_TARGET:.0%} answered, the budget held",
                    f"{share:.1%} answered (idle_session_timeout 10 s: "
                    + (f"{ist_share:.1%}" if ist_share is not None else "not run")
                    + f"), refused {s['refused']}, container restarts "
                    f"{leak['container_restarts']}",
                    share >= ANSWERED_TARGET and s["refused"] == 0,
                )
            )
        elif key == "tx-leak":
            out.append(
                (
                    f"{key}: restarted before it crosses the budget",
                    f"peak {s['peak']} of {BUDGET} ({s['peak_in_transaction']} in a transaction),"
                    f" its pods evicted {leak['evicted']}, restarted {leak['container_restarts']}",
                    # Restarted (the audit log's evictions, the containers' restarts), not merely
                    # short of the budget: a leak too slow to get there proves nothing.
                    not s["crossed_budget"] and leak["evicted"] + leak["container_restarts"] > 0,
                )
            )
        else:
            out.append((f"{key}: 0 refused", f"refused {s['refused']}", s["refused"] == 0))
    return out
