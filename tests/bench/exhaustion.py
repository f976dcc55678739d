"""Benchmark 1: the exhaustion scenario, a real leak beside real pools, under each strategy.

For each leak rate (about 1, 7 and 20 leaked connections a second, one after the other), every
strategy gets its own PostgreSQL 15 (``max_connections`` 100, 3 superuser-reserved slots) inside
one sandbox, and the strategies play at the same time, so they share the machine's conditions and
their ratios come from the same run. In each strategy's namespace, all labelled ``tier: shop``:

- the leak: Django 5.0.1 under uvicorn (``sandbox.apps``' ``leak`` kind), its driver abandoning
  ``rate`` requests a second mid-request, each of which leaks its connection (ticket #35059);
- healthy pools, without pre-ping or health checks, each connection reused after a gap drawn
  between 5 s and 2 minutes, a share of their requests idle 1-3 s between two queries: Django
  5.0.2 under gunicorn with ``CONN_MAX_AGE``, a psycopg_pool app and a SQLAlchemy ``QueuePool``
  app, each driven by one closed-loop lane per connection;
- a probe client (in this process) that opens a fresh connection 4 times a second and records
  every refusal;
- a sampler (in this process, superuser over the Unix socket, so never refused) that counts the
  client backends per workload 4 times a second.

Strategies: no guard; PostgreSQL's server-wide ``idle_session_timeout`` at 10 s and at 60 s;
connbudget with a ConnectionBudget naming only ``database``, ``budget`` (80) and ``selector``.
The healthy pools play alone for a warm-up first; each lane's window opens when its leak's
driver starts sending. Damage is counted from the workloads' own logs (the apps' request lines,
the drivers' sent lines), PostgreSQL's log (which backend was terminated or timed out, by its
``application_name``: the pod) and the sampler, never from the operator; the operator's status is
read only for its leak-rate estimate.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from kubernetes.client.rest import ApiException

from bench.common import (
    BENCH_APP,
    GROUP,
    PLURAL,
    VERSION,
    Kube,
    Operator,
    Server,
    Ticker,
    busy_fraction,
    cpu_times,
    is_refusal,
    parse_terminations,
    parse_time,
    say,
    workload_of,
)
from sandbox.apps.deploy import deploy_app, leak_settings, pool_settings
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads
from sandbox.postgres import DatabaseInfo
from sandbox.workloads.outcomes import FAILURES, OUTCOMES, request_lines

MAX_CONNECTIONS = 100
USABLE = MAX_CONNECTIONS - 3  # superuser_reserved_connections
BUDGET = 80
RATES = (1.0, 7.0, 20.0)  # leaked connections per second
LEAK_POD_RATE = 10.0  # at most this many per leaking pod (one uvicorn process each)
SATURATED = 0.95  # a second with the machine's cores at least this busy is saturated
PROBE_INTERVAL = 0.25  # the probe client tries a fresh connection 4 times a second
SAMPLE_INTERVAL = 0.25
STATUS_INTERVAL = 1.0  # the ConnectionBudget's status is read once a second
CONNECT_TIMEOUT = 2
RATE_TOLERANCE = 0.2  # the leak-rate target: within 20 % of the driven rate...
RATE_WITHIN = 30.0  # ...within 30 s of the leak starting
BREACH_WITHIN = 2.0  # each breach back within the budget within 2 s
REFUSED_SHARE_AT_20 = 0.01  # at 20/s, at most 1 % of no guard's refusals
INFLIGHT = {"INFLIGHT_FRACTION": "0.3", "INFLIGHT_IDLE_MIN": "1", "INFLIGHT_IDLE_MAX": "3"}
LEAK = "leak"


@dataclass(frozen=True)
class Strategy:
    key: str
    label: str
    idle_session_timeout: int | None = None
    connbudget: bool = False


STRATEGIES = (
    Strategy("none", "no guard"),
    Strategy("ist10", "idle_session_timeout 10 s", idle_session_timeout=10),
    Strategy("ist60", "idle_session_timeout 60 s", idle_session_timeout=60),
    Strategy("cb", "connbudget (database, budget, selector)", connbudget=True),
)


@dataclass(frozen=True)
class Pool:
    """A healthy app: ``lanes`` connections, each reused after a gap drawn from ``gap``."""

    name: str
    kind: str
    lanes: int
    gap: tuple[float, float]
    label: str


HEALTHY = (
    Pool("django", "django", 3, (5.0, 30.0), "Django 5.0.2, gunicorn, CONN_MAX_AGE"),
    Pool("psycopg", "psycopg", 4, (5.0, 60.0), "psycopg_pool, check=None"),
    Pool("sqlalchemy", "sqlalchemy", 3, (30.0, 120.0), "SQLAlchemy QueuePool, no pre-ping"),
)


def budget_spec() -> dict[str, Any]:
    """The ConnectionBudget: the three fields a new user writes, every other one defaulted."""
    return {
        "database": {"secretRef": {"name": "pg-monitor"}},
        "budget": {"maxConnections": BUDGET},
        "selector": {"matchLabels": {"tier": "shop"}},
    }


def leak_pods(rate: float) -> int:
    return max(1, math.ceil(rate / LEAK_POD_RATE))


def rate_key(rate: float) -> str:
    return f"{rate:g}"


# --- pure arithmetic over the samples (unit-tested) ---------------------------------------------


def breaches(
    samples: Sequence[tuple[float, int]], limit: int, *, end: float
) -> list[tuple[float, float]]:
    """``(start, seconds)`` of each run of samples above ``limit``, from the first sample over it
    to the first back within it (to ``end`` if it never came back)."""
    found: list[tuple[float, float]] = []
    since: float | None = None
    for t, value in samples:
        if value > limit and since is None:
            since = t
        elif value <= limit and since is not None:
            found.append((since, t - since))
            since = None
    if since is not None:
        found.append((since, max(0.0, end - since)))
    return found


def seconds_at_least(samples: Sequence[tuple[float, int]], level: int, *, end: float) -> float:
    """Seconds during which the value was at least ``level`` (each sample holds until the next,
    the last until ``end``)."""
    total = 0.0
    for i, (t, value) in enumerate(samples):
        until = samples[i + 1][0] if i + 1 < len(samples) else max(t, end)
        if value >= level:
            total += until - t
    return total


def first_within(
    series: Iterable[tuple[float, float | None]], target: float, tolerance: float, *, since: float
) -> float | None:
    """Seconds from ``since`` to the first value within ``tolerance`` (a share) of ``target``."""
    for t, value in series:
        if t >= since and value is not None and abs(value - target) <= tolerance * target:
            return t - since
    return None


def in_window(records: Iterable[dict[str, Any]], t0: float, t1: float) -> list[dict[str, Any]]:
    """The log records whose ``time`` falls within ``[t0, t1]``."""
    return [r for r in records if "time" in r and t0 <= parse_time(str(r["time"])) <= t1]


def outcome_counts(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(str(r.get("outcome")) for r in records)
    return {name: counts.get(name, 0) for name in OUTCOMES} | dict(counts)


def failed(counts: dict[str, int]) -> int:
    return sum(counts.get(name, 0) for name in FAILURES)


# --- a lane: one strategy's server, namespace and measurements ----------------------------------


class _LaneSandbox(Sandbox):
    """The sandbox, with the lane's server as its database: ``deploy_app`` gives its pods the
    DSN of ``Sandbox.db``, and each lane's pods must reach their own server."""

    def __init__(self, sb: Sandbox, info: DatabaseInfo) -> None:
        super().__init__(sb.state_dir)
        self._info = info

    @property
    def db(self) -> DatabaseInfo:
        return self._info


@dataclass
class Lane:
    strategy: Strategy
    server: Server
    namespace: str
    # (time, client backends in all (this sampler's too: a refusal comes when they fill every slot
    # but the reserved ones), counted against the budget, the leak's, the healthy pools')
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    tries: list[tuple[float, str]] = field(default_factory=list)  # (time, ok|refused|error)
    status: list[tuple[float, float | None, str | None]] = field(default_factory=list)
    # (time, workload -> its byOwner entry) from the same reads: how the operator judged each
    owners: list[tuple[float, dict[str, dict[str, Any]]]] = field(default_factory=list)
    t0: float | None = None  # when the leak's driver started sending
    lock: threading.Lock = field(default_factory=threading.Lock)
    conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def sample(self) -> None:
        if self.conn is None:
            self.conn = self.server.superuser()
        rows = self.conn.execute(
            "SELECT application_name, datname, count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' GROUP BY 1, 2"
        ).fetchall()
        total = counted = leak = healthy = 0
        for app, db, n in rows:
            total += n
            if db == "app" and app not in ("connbudget-probe", BENCH_APP):
                counted += n
            workload = workload_of(str(app or ""))
            if workload == LEAK:
                leak += n
            elif workload in {p.name for p in HEALTHY}:
                healthy += n
        with self.lock:
            self.samples.append((time.time(), total, counted, leak, healthy))

    def probe(self) -> None:
        t = time.time()
        try:
            psycopg.connect(
                self.server.app_dsn(), connect_timeout=CONNECT_TIMEOUT, application_name="probe"
            ).close()
        except psycopg.OperationalError as e:
            self.tries.append((t, "refused" if is_refusal(e) else "error"))
        else:
            self.tries.append((t, "ok"))

    def last(self) -> int:
        with self.lock:
            return self.samples[-1][2] if self.samples else 0


def _pods(sb: Sandbox, namespace: str) -> dict[str, list[str]]:
    """Every pod that ever ran in ``namespace`` (the kubelet's folders), by workload."""
    by: dict[str, list[str]] = {}
    folder = sb.state_dir / "pods" / namespace
    for pod in sorted(p.name for p in folder.glob("*") if p.is_dir()) if folder.exists() else []:
        by.setdefault(workload_of(pod), []).append(pod)
    return by


def _records(
    sb: Sandbox, namespace: str, pods: Sequence[str], container: str, event: str
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for pod in pods:
        found += request_lines(sb.pod_log(namespace, pod, container), event)
    return found


def _leak_start(sb: Sandbox, lane: Lane) -> float | None:
    """When the first of the leak's drivers started sending (its ``target_ready`` line)."""
    starts = []
    for pod in _pods(sb, lane.namespace).get(LEAK, []):
        for line in sb.pod_log(lane.namespace, pod, "driver").splitlines():
            if '"target_ready"' in line:
                starts.append(parse_time(line.split('"time": "', 1)[1].split('"', 1)[0]))
                break
    return min(starts) if starts else None


def _drivers_ready(sb: Sandbox, lanes: Iterable[Lane]) -> bool:
    for lane in lanes:
        pods = _pods(sb, lane.namespace)
        for pool in HEALTHY:
            names = pods.get(pool.name, [])
            if not names or not all(
                '"target_ready"' in sb.pod_log(lane.namespace, p, "driver") for p in names
            ):
                return False
    return True


def _read_status(kube: Kube, lane: Lane) -> None:
    """The operator's leak-rate estimate for the leak (connections per second), and its class."""
    try:
        obj = kube.custom.get_namespaced_custom_object(
            GROUP, VERSION, lane.namespace, PLURAL, "shop"
        )
    except ApiException:
        return
    owners = ((obj.get("status") or {}).get("usage") or {}).get("byOwner") or []
    by = {str(o.get("owner", "")).split("/")[-1]: o for o in owners}
    lane.owners.append((time.time(), by))
    mine = by.get(LEAK)
    rate = mine.get("leakRatePerMinute") if mine else None
    lane.status.append(
        (
            time.time(),
            float(rate) / 60 if rate is not None else None,
            str(mine.get("class")) if mine and mine.get("class") else None,
        )
    )


def _restarted(kube: Kube, namespace: str, pods: dict[str, list[str]]) -> dict[str, int]:
    """Pods replaced (more pods than replicas ever ran) plus container restarts, by workload."""
    replicas: dict[str, int] = {}
    restarts: Counter[str] = Counter()
    try:
        for d in kube.apps.list_namespaced_deployment(namespace).items:
            replicas[d.metadata.name] = d.spec.replicas or 0
        for p in kube.core.list_namespaced_pod(namespace).items:
            for c in p.status.container_statuses or []:
                restarts[workload_of(p.metadata.name)] += c.restart_count or 0
    except ApiException:
        pass
    return {
        w: max(0, len(names) - replicas.get(w, len(names))) + restarts[w]
        for w, names in pods.items()
    }


def _summarise(
    sb: Sandbox, kube: Kube, lane: Lane, rate: float, window: float, log_before: int
) -> dict[str, Any]:
    """The lane's figures over its own window, from its leak's start."""
    assert lane.t0 is not None
    t0, t1 = lane.t0, lane.t0 + window
    pods = _pods(sb, lane.namespace)
    ns = lane.namespace
    leak_app = in_window(_records(sb, ns, pods.get(LEAK, []), "app", "request"), t0, t1)
    leak_sent = in_window(_records(sb, ns, pods.get(LEAK, []), "driver", "sent"), t0, t1)
    healthy: dict[str, Any] = {}
    inflight = outcome_counts(leak_app)["inflight_broken"]
    app_refused = outcome_counts(leak_app)["refused"]
    for pool in HEALTHY:
        sent = outcome_counts(
            in_window(_records(sb, ns, pods.get(pool.name, []), "driver", "sent"), t0, t1)
        )
        app = outcome_counts(
            in_window(_records(sb, ns, pods.get(pool.name, []), "app", "request"), t0, t1)
        )
        healthy[pool.name] = {
            "requests": sum(sent[k] for k in OUTCOMES),
            "failed": failed(sent),
            "outcomes": sent,
            "app_outcomes": app,
        }
        inflight += app["inflight_broken"]
        app_refused += app["refused"]
    tries = [(t, what) for t, what in lane.tries if t0 <= t <= t1]
    probe_refused = sum(1 for _, what in tries if what == "refused")
    samples = sorted(s for s in lane.samples if t0 <= s[0] <= t1)
    counted = [(t, c) for t, _, c, _, _ in samples]
    total = [(t, n) for t, n, _, _, _ in samples]
    over = breaches(counted, BUDGET, end=t1)
    ended: dict[str, Counter[str]] = {}
    for t, app_name, cause in parse_terminations(lane.server.log_text()[log_before:]):
        if t0 <= t <= t1:
            ended.setdefault(workload_of(app_name) or "(unnamed)", Counter())[cause] += 1
    estimate = [(t, r) for t, r, _ in lane.status if t0 <= t <= t1]
    driven = rate
    last_est = next((r for _, r in reversed(estimate) if r is not None), None)
    judged: dict[str, dict[str, Any]] = {}
    for t, by in lane.owners:
        if not t0 <= t <= t1:
            continue
        for workload, o in by.items():
            j = judged.setdefault(workload, {"classes": Counter()})
            if o.get("class"):
                j["classes"][str(o["class"])] += 1
            j["abandon_after"] = o.get("abandonAfterSeconds")
            j["max_reuse_gap"] = o.get("maxReuseGapSeconds")
    classes = Counter(c for t, _, c in lane.status if t0 <= t <= t1 and c)
    return {
        "strategy": lane.strategy.key,
        "label": lane.strategy.label,
        "rate": rate,
        "window": window,
        "leak_pods": leak_pods(rate),
        "leak_sent_per_second": round(len(leak_sent) / window, 2),
        "refused": {
            "probe": probe_refused,
            "apps": app_refused,
            "total": probe_refused + app_refused,
        },
        "probe_attempts": len(tries),
        "probe_errors": sum(1 for _, what in tries if what == "error"),
        "healthy": healthy,
        "healthy_requests": sum(h["requests"] for h in healthy.values()),
        "healthy_failed": sum(h["failed"] for h in healthy.values()),
        "healthy_failed_by_outcome": {
            k: sum(h["outcomes"][k] for h in healthy.values()) for k in FAILURES
        },
        "inflight_broken": inflight,
        "peak": max((c for _, c in counted), default=0),
        "peak_server": max((n for _, n in total), default=0),
        "seconds_over_budget": round(sum(d for _, d in over), 2),
        "seconds_full": round(seconds_at_least(total, USABLE, end=t1), 2),
        "breaches": len(over),
        "longest_breach": round(max((d for _, d in over), default=0.0), 2),
        "backends_ended": {w: dict(c) for w, c in sorted(ended.items())},
        "pods_restarted": _restarted(kube, ns, pods),
        "leak_estimate": {
            "driven": driven,
            "first_within": first_within(estimate, driven, RATE_TOLERANCE, since=t0),
            "end": last_est,
            "classes": dict(classes),
            # Per workload: seconds read as each class, and the last abandon age and longest
            # reuse gap the operator reported for it.
            "owners": {w: j | {"classes": dict(j["classes"])} for w, j in sorted(judged.items())},
            "series": [(round(t - t0, 1), r) for t, r in estimate],
        }
        if lane.strategy.connbudget
        else None,
    }


# --- one rate: every strategy at once -----------------------------------------------------------


def _deploy_lane(sb: Sandbox, kube: Kube, lane: Lane, *, warmup: float, window: float) -> Workloads:
    kube.namespace(lane.namespace)
    kube.secret(lane.namespace, "pg-monitor", {"dsn": lane.server.monitor_dsn()})
    wl = Workloads(sandbox=_LaneSandbox(sb, lane.server.info), api=kube.api)
    for pool in HEALTHY:
        deploy_app(
            wl,
            lane.namespace,
            pool.name,
            kind=pool.kind,
            driver_env=pool_settings(pool.lanes, pool.gap, warmup + window + 120, **INFLIGHT),
            labels={"tier": "shop"},
            wait=False,
        )
    return wl


def play_rate(
    sb: Sandbox,
    kube: Kube,
    servers: dict[str, Server],
    rate: float,
    *,
    warmup: float,
    window: float,
    out_dir: Path,
) -> tuple[dict[str, Any], dict[str, Lane]]:
    """Play every strategy at once against a leak of ``rate`` per second."""
    tag = rate_key(rate).replace(".", "p")
    lanes = {s.key: Lane(s, servers[s.key], f"ex{tag}-{s.key}") for s in STRATEGIES}
    log_before: dict[str, int] = {}
    for lane in lanes.values():
        lane.server.set_idle_session_timeout(lane.strategy.idle_session_timeout)
        log_before[lane.strategy.key] = len(lane.server.log_text())
    workloads = {
        k: _deploy_lane(sb, kube, lane, warmup=warmup, window=window) for k, lane in lanes.items()
    }
    cb = [lane for lane in lanes.values() if lane.strategy.connbudget]
    op = Operator.start(sb, [lane.namespace for lane in cb], out_dir / f"operator-{tag}.log")
    tickers: list[Ticker] = []
    try:
        for lane in cb:
            kube.budget(lane.namespace, "shop", budget_spec())
        deadline = time.monotonic() + 180
        while not _drivers_ready(sb, lanes.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("the healthy apps' drivers did not start within 180 s")
            time.sleep(1)
        limit = warmup + window + 240
        for lane in lanes.values():
            tickers.append(Ticker(lane.sample, interval=SAMPLE_INTERVAL, limit=limit).start())
            tickers.append(Ticker(lane.probe, interval=PROBE_INTERVAL, limit=limit).start())
        for lane in cb:
            read = functools.partial(_read_status, kube, lane)
            tickers.append(Ticker(read, interval=STATUS_INTERVAL, limit=limit).start())
        say(f"  healthy pools warming up for {warmup:.0f}s")
        time.sleep(warmup)
        for k, lane in lanes.items():
            deploy_app(
                workloads[k],
                lane.namespace,
                LEAK,
                kind="leak",
                driver_env=leak_settings(rate / leak_pods(rate), window + 30, **INFLIGHT),
                replicas=leak_pods(rate),
                labels={"tier": "shop"},
                wait=False,
            )
        started = time.time()
        next_print = started + 5
        cpu: list[float] = []
        cpu_start: tuple[float, float] | None = None
        prev = cpu_times()
        hard_end = time.monotonic() + window + 180
        while time.monotonic() < hard_end:
            time.sleep(1.0)
            now_cpu = cpu_times()
            if all(lane.t0 is not None for lane in lanes.values()):
                cpu.append(busy_fraction(prev, now_cpu))
            prev = now_cpu
            for lane in lanes.values():
                if lane.t0 is None:
                    lane.t0 = _leak_start(sb, lane)
            if cpu_start is None and all(lane.t0 is not None for lane in lanes.values()):
                cpu_start = now_cpu
            t0s = [lane.t0 for lane in lanes.values()]
            if (
                all(t is not None for t in t0s)
                and time.time() >= max(t for t in t0s if t is not None) + window
            ):
                break
            if time.time() >= next_print:
                next_print += 5
                say(
                    f"  t={time.time() - started:4.0f}s  "
                    + "  ".join(
                        f"{k}: {lane.last()}/{BUDGET} refused "
                        f"{sum(1 for _, w in lane.tries if w == 'refused')}"
                        for k, lane in lanes.items()
                    )
                )
        missing = [k for k, lane in lanes.items() if lane.t0 is None]
        if missing:
            raise RuntimeError(f"the leak never started in {missing}")
        for tk in tickers:
            tk.stop()
        tickers = []
        busy = busy_fraction(cpu_start, cpu_times()) if cpu_start else math.nan
        lanes_out = {
            k: _summarise(sb, kube, lane, rate, window, log_before[k]) for k, lane in lanes.items()
        }
        for lane in cb:
            reasons: Counter[str] = Counter()
            for ev in kube.events(lane.namespace):
                if ev.involved_object and ev.involved_object.kind == "ConnectionBudget":
                    reasons[str(ev.reason)] += int(ev.count or 1)
            lanes_out[lane.strategy.key]["operator_events"] = dict(reasons)
            lanes_out[lane.strategy.key]["operator_problems"] = len(op.problems())
        result = {
            "rate": rate,
            "leak_pods": leak_pods(rate),
            "cpu_busy": round(busy, 3),
            "cpu_saturated_seconds": sum(1 for c in cpu if c >= SATURATED),
            "cpu_seconds": len(cpu),
            "lanes": lanes_out,
        }
    finally:
        for tk in tickers:
            tk.stop()
        for lane in lanes.values():
            if lane.conn is not None:
                lane.conn.close()
        op.stop()
        kube.delete_namespaces([lane.namespace for lane in lanes.values()], wait=60)
    return result, lanes


def _drain(servers: dict[str, Server], timeout: float = 90) -> None:
    """Wait until no app backend is left on any lane's server (pods stopped, leaks closed)."""
    deadline = time.monotonic() + timeout
    for s in servers.values():
        s.wait_backends("datname = 'app'", at_most=0, timeout=max(0.0, deadline - time.monotonic()))


def run(
    sb: Sandbox,
    kube: Kube,
    *,
    window: float,
    warmup: float,
    out_dir: Path,
    charts: Path,
    rates: Sequence[float] = RATES,
) -> dict[str, Any]:
    """Play each rate in turn; print and return every figure, draw one chart per rate."""
    say(
        f"\n== 1. exhaustion: max_connections {MAX_CONNECTIONS}, budget {BUDGET}; Django 5.0.1 "
        f"leaking at {', '.join(rate_key(r) for r in rates)}/s (one rate after another) beside "
        f"{', '.join(p.name for p in HEALTHY)} pools; {len(STRATEGIES)} strategies at once; "
        f"{warmup:.0f}s warm-up, {window:.0f}s window per rate"
    )
    began = time.time()
    servers: dict[str, Server] = {}
    out: dict[str, Any] = {
        "window": window,
        "warmup": warmup,
        "setup": {
            "max_connections": MAX_CONNECTIONS,
            "usable": USABLE,
            "budget": BUDGET,
            "spec": budget_spec(),
            "probe_interval": PROBE_INTERVAL,
            "sample_interval": SAMPLE_INTERVAL,
            "leak_pod_rate": LEAK_POD_RATE,
            "inflight": INFLIGHT,
            "healthy": [
                {"name": p.name, "label": p.label, "connections": p.lanes, "gap": list(p.gap)}
                for p in HEALTHY
            ],
            "strategies": {s.key: s.label for s in STRATEGIES},
            "targets": {
                "rate_tolerance": RATE_TOLERANCE,
                "rate_within": RATE_WITHIN,
                "breach_within": BREACH_WITHIN,
                "refused_share_at_20": REFUSED_SHARE_AT_20,
            },
        },
        "rates": {},
    }
    try:
        for strategy in STRATEGIES:
            key = strategy.key
            servers[key] = Server.start(sb, f"ex-{key}", max_connections=MAX_CONNECTIONS)
            servers[key].log_backends()
        for rate in rates:
            say(f" leak of {rate_key(rate)}/s")
            res, lanes = play_rate(
                sb, kube, servers, rate, warmup=warmup, window=window, out_dir=out_dir
            )
            out["rates"][rate_key(rate)] = res
            say(f"   CPU busy {res['cpu_busy']:.0%} of both cores over the window")
            for row in res["lanes"].values():
                say("   " + _line(row))
            chart(lanes, rate, window, charts / f"exhaustion-{rate_key(rate)}.png")
            _drain(servers)
    finally:
        for server in servers.values():
            server.stop()
    out["seconds"] = round(time.time() - began)
    return out


def _line(r: dict[str, Any]) -> str:
    est = r["leak_estimate"]
    est_s = ""
    if est:
        fw = est["first_within"]
        est_s = (
            f"  leak estimate: within 20% after {fw:.0f}s" if fw is not None else "  never within"
        ) + f", end {est['end']}"
    return (
        f"{r['strategy']:<6} refused {r['refused']['total']} (probe {r['refused']['probe']}/"
        f"{r['probe_attempts']})  healthy failed {r['healthy_failed']}/{r['healthy_requests']} "
        f"{r['healthy_failed_by_outcome']}  in-flight broken {r['inflight_broken']}  peak "
        f"{r['peak']}  over budget {r['seconds_over_budget']:.1f}s (longest "
        f"{r['longest_breach']:.1f}s)  full {r['seconds_full']:.1f}s  ended "
        f"{r['backends_ended']}  restarted {r['pods_restarted']}" + est_s
    )


def chart(lanes: dict[str, Lane], rate: float, window: float, path: Path) -> None:
    """Connections over time in each strategy's lane, with the budget and the full server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8), dpi=100, sharex=True, sharey=True)
    for ax, lane in zip(axes.flat, lanes.values(), strict=False):
        t0 = lane.t0 or 0.0
        samples = sorted(s for s in lane.samples if t0 <= s[0] <= t0 + window)
        ts = [s[0] - t0 for s in samples]
        ax.plot(
            ts, [s[1] for s in samples], label="client backends (all slots)", color="#1f77b4", lw=2
        )
        ax.plot(
            ts,
            [s[2] for s in samples],
            label="counted against the budget",
            color="#ff7f0e",
            lw=1.2,
            ls="--",
        )
        ax.plot(ts, [s[3] for s in samples], label="the leak's", color="#9467bd", lw=1)
        ax.plot(ts, [s[4] for s in samples], label="the healthy pools'", color="#2ca02c", lw=1)
        ax.axhline(BUDGET, color="#d62728", label=f"budget ({BUDGET})")
        ax.axhline(USABLE, color="black", ls="-.", label=f"server full ({USABLE} usable)")
        refused = [t - t0 for t, w in lane.tries if w == "refused" and t0 <= t <= t0 + window]
        if refused:
            ax.plot(
                refused,
                [USABLE + 5] * len(refused),
                ls="none",
                marker="|",
                ms=8,
                color="#d62728",
                label=f"probe refused ({len(refused)})",
            )
        ax.set_title(lane.strategy.label, fontsize=10)
        ax.set_ylim(0, USABLE + 10)
        ax.grid(alpha=0.3)
        ax.legend(loc="center right", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the leak began")
    for ax in axes[:, 0]:
        ax.set_ylabel("connections")
    fig.suptitle(f"Exhaustion: a Django 5.0.1 leak of {rate_key(rate)} connections/s")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
