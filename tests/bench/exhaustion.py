"""Benchmark 1: the exhaustion scenario, the same workload under each strategy.

Each strategy gets its own PostgreSQL 15 (max_connections 100, 3 superuser-reserved slots) inside
one sandbox, and all strategies play at the same time, so they share the machine's conditions and
their ratios come from the same run. In each lane:

- a leaky app: 3 pods, each opening ``LEAK_RATE`` connections per second and never closing them
  (the sandbox's ``leaky-app``);
- a well-behaved app: one pod with a pool of persistent connections, each reused every few seconds,
  with no reconnect-on-error logic (the sandbox's ``steady-app`` with ``RECONNECT=0``), whose every
  failed query is counted as collateral damage;
- a probe client (in this process) that opens a fresh connection several times a second and
  records every ``too many clients`` refusal;
- a sampler (in this process, superuser over the Unix socket, so never refused) that counts client
  backends several times a second.

Strategies: no guard; PostgreSQL's server-wide ``idle_session_timeout`` at 60 s and at 2 s;
connbudget with the spec's defaults (poll every 10 s) and with ``pollSeconds: 1``. The
ConnectionBudget governs both apps (``tier: shop``): the operator must tell the leak from the
reused pool by itself.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    BENCH_APP,
    Kube,
    Operator,
    Server,
    Spread,
    Ticker,
    is_refusal,
    json_lines,
    parse_time,
    say,
)
from sandbox.core import Sandbox
from sandbox.demo import Timeline, chart
from sandbox.fixtures import STEADY_IMAGE, Workloads

MAX_CONNECTIONS = 100
BUDGET = 80
LEAKY_PODS = 3
LEAK_RATE = 1.5  # connections per second and pod: 4.5/s in all, the server is full in ~20 s
STEADY_POOL = 5
STEADY_INTERVAL = 0.6  # seconds between queries, round-robin: each connection reused every 3 s
PROBE_INTERVAL = 0.25  # the probe client tries a fresh connection 4 times a second
SAMPLE_INTERVAL = 0.25
CONNECT_TIMEOUT = 2
TERMINATED_RE = re.compile(r"terminated (\d+) idle backends")
IDLE_TIMEOUT_LINE = "terminating connection due to idle-session timeout"
RESTART_ACTIONS = ("RestartPods",)


@dataclass(frozen=True)
class Strategy:
    key: str
    label: str
    idle_session_timeout: int | None = None
    connbudget: bool = False
    poll_seconds: int | None = None  # None: the spec's default


STRATEGIES = (
    Strategy("none", "no guard"),
    Strategy("ist60", "idle_session_timeout 60 s", idle_session_timeout=60),
    Strategy("ist2", "idle_session_timeout 2 s", idle_session_timeout=2),
    Strategy("cb10", "connbudget, default poll (10 s)", connbudget=True),
    Strategy("cb1", "connbudget, 1 s poll", connbudget=True, poll_seconds=1),
)


def budget_spec(poll_seconds: int | None) -> dict[str, Any]:
    """The ConnectionBudget: the spec's defaults, a budget of 80, both apps governed."""
    spec: dict[str, Any] = {
        "database": {"secretRef": {"name": "pg-monitor"}},
        "budget": {"maxConnections": BUDGET, "scope": "Database"},
        "selector": {"matchLabels": {"tier": "shop"}},
    }
    if poll_seconds is not None:
        spec["pollSeconds"] = poll_seconds
    return spec


@dataclass
class RunResult:
    """What one strategy did in one repeat."""

    strategy: str
    refused: int
    attempts: int
    other_errors: int
    peak: int
    seconds_over_budget: float
    breach_to_recovery: float | None  # None: never back within the budget in the window
    first_breach: float | None
    collateral_errors: int
    pods_restarted: int
    backends_terminated: int
    window: float


@dataclass
class Lane:
    """One strategy's server, namespace and measurements in one repeat."""

    strategy: Strategy
    server: Server
    namespace: str
    timeline: Timeline = field(default_factory=lambda: Timeline(t0=0.0))
    tries: list[tuple[float, str]] = field(default_factory=list)  # (time, ok|refused|error)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sampler_conn: psycopg.Connection[tuple[Any, ...]] | None = None
    idle_timeouts_before: int = 0

    def sample(self) -> None:
        assert self.sampler_conn is not None
        row = self.sampler_conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE datname = 'app') FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND usename <> 'postgres' "
            f"AND application_name NOT IN ('{BENCH_APP}', 'connbudget-probe')"
        ).fetchone()
        assert row is not None
        with self.lock:
            self.timeline.samples.append((time.time(), int(row[0]), int(row[1]), ""))

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

    def refusals(self, t1: float = math.inf) -> list[float]:
        return [t for t, what in self.tries if what == "refused" and self.timeline.t0 <= t <= t1]

    def idle_timeouts(self) -> int:
        text = self.server.log.read_text(errors="replace") if self.server.log.exists() else ""
        return text.count(IDLE_TIMEOUT_LINE)


def _steady_errors(sb: Sandbox, namespace: str, t0: float, t1: float) -> int:
    pods_dir = sb.state_dir / "pods" / namespace
    n = 0
    for log in pods_dir.glob("steady-*/app.log"):
        for rec in json_lines(log):
            if rec.get("event") == "query_failed" and t0 <= parse_time(str(rec["time"])) <= t1:
                n += 1
    return n


def _summarise(
    lane: Lane, sb: Sandbox, actions: Sequence[dict[str, Any]], window: float
) -> RunResult:
    """The lane's figures over its own window, from its leak's start."""
    tl = lane.timeline
    t1 = tl.t0 + window
    tl.samples = sorted(x for x in tl.samples if tl.t0 <= x[0] <= t1)
    tries = [(t, what) for t, what in lane.tries if tl.t0 <= t <= t1]
    tl.attempts = len(tries)
    tl.refused = sum(1 for _, what in tries if what == "refused")
    actions = [a for a in actions if parse_time(str(a["time"])) <= t1]
    samples = tl.samples
    peak = max((c for _, _, c, _ in samples), default=0)
    over = 0.0
    first_breach: float | None = None
    recovered: float | None = None
    for (t, _, c, _), nxt in zip(samples, [*samples[1:], None], strict=True):
        dt_ = (nxt[0] - t) if nxt else SAMPLE_INTERVAL
        if c > BUDGET:
            over += dt_
            if first_breach is None:
                first_breach = t
        elif first_breach is not None and recovered is None:
            recovered = t
    budget_id = f"{lane.namespace}/"
    mine = [a for a in actions if str(a.get("budget", "")).startswith(budget_id)]
    ok = [a for a in mine if a.get("result") == "Succeeded"]
    terminated = sum(
        int(m.group(1))
        for a in ok
        if a.get("action") == "TerminateIdle" and (m := TERMINATED_RE.search(str(a.get("detail"))))
    )
    if lane.strategy.idle_session_timeout is not None:
        terminated = lane.idle_timeouts() - lane.idle_timeouts_before
    return RunResult(
        strategy=lane.strategy.key,
        refused=tl.refused,
        attempts=tl.attempts,
        other_errors=sum(1 for _, what in tries if what == "error"),
        peak=peak,
        seconds_over_budget=round(over, 2),
        breach_to_recovery=(recovered - first_breach) if first_breach and recovered else None,
        first_breach=(first_breach - tl.t0) if first_breach else None,
        collateral_errors=_steady_errors(sb, lane.namespace, tl.t0, t1),
        pods_restarted=sum(1 for a in ok if a.get("action") in RESTART_ACTIONS),
        backends_terminated=terminated,
        window=t1 - tl.t0,
    )


def play_repeat(
    sb: Sandbox,
    kube: Kube,
    servers: dict[str, Server],
    repeat: int,
    window: float,
    out_dir: Path,
) -> tuple[list[RunResult], dict[str, Lane], list[dict[str, Any]]]:
    """Play every strategy at once for ``window`` seconds; return results, lanes and actions."""
    wl = Workloads(sandbox=sb, api=kube.api)
    lanes = {
        s.key: Lane(strategy=s, server=servers[s.key], namespace=f"ex{repeat}-{s.key}")
        for s in STRATEGIES
    }
    for lane in lanes.values():
        lane.server.set_idle_session_timeout(lane.strategy.idle_session_timeout)
        lane.idle_timeouts_before = lane.idle_timeouts()
        kube.namespace(lane.namespace)
        kube.secret(lane.namespace, "pg-monitor", {"dsn": lane.server.monitor_dsn()})
        wl.deploy(
            lane.namespace,
            "steady",
            image=STEADY_IMAGE,
            replicas=1,
            labels={"tier": "shop"},
            env={
                "POOL_SIZE": str(STEADY_POOL),
                "QUERY_INTERVAL": str(STEADY_INTERVAL),
                "RECONNECT": "0",
            },
            database_url=lane.server.app_dsn(),
            wait=False,
        )
    cb = [lane for lane in lanes.values() if lane.strategy.connbudget]
    op = Operator.start(sb, [lane.namespace for lane in cb], out_dir / f"operator-{repeat}.log")
    try:
        for lane in cb:
            kube.budget(lane.namespace, "shop", budget_spec(lane.strategy.poll_seconds))
        for lane in lanes.values():
            wl.wait_available(lane.namespace, "steady", 1)
            deadline = time.monotonic() + 30
            while (
                lane.server.client_backends("datname = 'app'") < STEADY_POOL
                and time.monotonic() < deadline
            ):
                time.sleep(0.3)
        _wait_probed(kube, [lane.namespace for lane in cb])
        tickers: list[Ticker] = []
        t0 = time.time()
        for lane in lanes.values():
            lane.timeline = Timeline(t0=t0)
            lane.sampler_conn = lane.server.superuser()
            tickers.append(Ticker(lane.sample, interval=SAMPLE_INTERVAL, limit=window + 60).start())
            tickers.append(Ticker(lane.probe, interval=PROBE_INTERVAL, limit=window + 60).start())
        # Each lane's window opens when its leaky Deployment is created (one after the other).
        for lane in lanes.values():
            lane.timeline.t0 = time.time()
            wl.deploy(
                lane.namespace,
                "leaky",
                replicas=LEAKY_PODS,
                labels={"tier": "shop"},
                env={"LEAK_RATE": str(LEAK_RATE)},
                database_url=lane.server.app_dsn(),
                wait=False,
            )
        end = max(lane.timeline.t0 for lane in lanes.values()) + window
        next_print = t0 + 5
        while time.time() < end:
            time.sleep(min(0.5, max(0.0, end - time.time())))
            if time.time() >= next_print:
                next_print += 5
                say(
                    f"  t={time.time() - t0:4.0f}s  "
                    + "  ".join(
                        f"{k}: {_last(lane)}/{BUDGET} refused {len(lane.refusals())}"
                        for k, lane in lanes.items()
                    )
                )
        for tk in tickers:
            tk.stop()
        for lane in lanes.values():
            if lane.sampler_conn is not None:
                lane.sampler_conn.close()
        actions = op.actions()
        for lane in cb:
            # The actions go on the charts as markers, at the time each call returned.
            for a in actions:
                if str(a.get("budget", "")).startswith(lane.namespace + "/"):
                    lane.timeline.events.append(
                        (parse_time(str(a["time"])), _reason(str(a["action"])), "")
                    )
        results = [_summarise(lane, sb, actions, window) for lane in lanes.values()]
    finally:
        op.stop()
        kube.delete_namespaces([lane.namespace for lane in lanes.values()])
    return results, lanes, actions


def _reason(action: str) -> str:
    return {"TerminateIdle": "IdleConnectionsTerminated", "RestartPods": "PodEvicted"}.get(
        action, action
    )


def _last(lane: Lane) -> int:
    with lane.lock:
        return lane.timeline.samples[-1][2] if lane.timeline.samples else 0


def _wait_probed(kube: Kube, namespaces: Sequence[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = [b for b in kube.budgets() if b["metadata"]["namespace"] in namespaces]
        if len(items) == len(namespaces) and all(
            (b.get("status") or {}).get("lastProbeTime") for b in items
        ):
            return
        time.sleep(0.5)
    raise RuntimeError("the ConnectionBudgets were not probed within 60s")


def _drain(servers: dict[str, Server], timeout: float = 90) -> None:
    """Wait until no app backend is left on any lane's server (pods stopped, leaks closed)."""
    deadline = time.monotonic() + timeout
    for s in servers.values():
        s.wait_backends("datname = 'app'", at_most=0, timeout=max(0.0, deadline - time.monotonic()))


def run(
    sb: Sandbox, kube: Kube, *, repeats: int, window: float, out_dir: Path, charts: Path
) -> dict[str, Any]:
    """Play the scenario ``repeats`` times; print and return every figure, draw the charts."""
    say(
        f"\n== 1. exhaustion: max_connections {MAX_CONNECTIONS}, budget {BUDGET}, leaky app "
        f"{LEAKY_PODS} pods x {LEAK_RATE}/s, well-behaved pool of {STEADY_POOL} (each reused every "
        f"{STEADY_POOL * STEADY_INTERVAL:.0f}s, no reconnect), probe client every "
        f"{PROBE_INTERVAL}s; {len(STRATEGIES)} strategies at once, {repeats} repeats of "
        f"{window:.0f}s"
    )
    servers = {
        s.key: Server.start(sb, f"ex-{s.key}", max_connections=MAX_CONNECTIONS) for s in STRATEGIES
    }
    runs: list[list[RunResult]] = []
    try:
        for r in range(repeats):
            say(f" repeat {r + 1}/{repeats}")
            results, lanes, _ = play_repeat(sb, kube, servers, r, window, out_dir)
            runs.append(results)
            for res in results:
                say("   " + _line(res))
            if r == 0:
                for key, lane in lanes.items():
                    chart(
                        lane.timeline,
                        MAX_CONNECTIONS - 3,
                        charts / f"exhaustion-{key}.png",
                        budget=BUDGET,
                        title=f"Exhaustion scenario: {lane.strategy.label}",
                        refusals=lane.refusals(lane.timeline.t0 + window),
                    )
            _drain(servers)
    finally:
        for s in servers.values():
            s.stop()
    return _table(runs)


def _line(r: RunResult) -> str:
    rec = f"{r.breach_to_recovery:.1f}s" if r.breach_to_recovery is not None else "never"
    return (
        f"{r.strategy:<6} refused {r.refused}/{r.attempts}  peak {r.peak}  over budget "
        f"{r.seconds_over_budget:.1f}s  breach->recovery {rec}  collateral errors "
        f"{r.collateral_errors}  pods restarted {r.pods_restarted}  backends terminated "
        f"{r.backends_terminated}"
    )


def _table(runs: list[list[RunResult]]) -> dict[str, Any]:
    by: dict[str, list[RunResult]] = {}
    for results in runs:
        for res in results:
            by.setdefault(res.strategy, []).append(res)
    # The no-guard lane's refusals in each repeat, to compare each strategy with in that repeat.
    none_refused = {
        i: next((r.refused for r in results if r.strategy == "none"), 0)
        for i, results in enumerate(runs)
    }
    table: dict[str, Any] = {}
    for s in STRATEGIES:
        rs = by.get(s.key, [])
        ratios = [r.refused / none_refused[i] for i, r in enumerate(rs) if none_refused.get(i)]
        table[s.key] = {
            "label": s.label,
            "refused": Spread.of(r.refused for r in rs),
            "refused_vs_none": Spread.of(ratios),
            "attempts": Spread.of(r.attempts for r in rs),
            "peak": Spread.of(r.peak for r in rs),
            "over_budget": Spread.of(r.seconds_over_budget for r in rs),
            "recovery": Spread.of(
                r.breach_to_recovery for r in rs if r.breach_to_recovery is not None
            ),
            "never_recovered": sum(
                1 for r in rs if r.breach_to_recovery is None and r.first_breach is not None
            ),
            "never_breached": sum(1 for r in rs if r.first_breach is None),
            "collateral": Spread.of(r.collateral_errors for r in rs),
            "restarted": Spread.of(r.pods_restarted for r in rs),
            "terminated": Spread.of(r.backends_terminated for r in rs),
            "other_errors": sum(r.other_errors for r in rs),
            "runs": [r.__dict__ for r in rs],
        }
    return table
