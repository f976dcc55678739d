"""Benchmark 2: reaction latency, over many leak episodes, for two poll intervals.

Each episode has its own namespace, its own ConnectionBudget (``scope: Selected``, so episodes
that overlap in time do not count each other's connections) and one leaky pod that opens
connections until it holds ``CAP``, above the budget, and then stops. The episodes of one poll
interval play at the same time against one server, each starting at a random moment, so the
breach falls at a random point of the budget's poll cycle.

A sampler in this process reads ``pg_stat_activity`` (superuser, 5 times a second) and attributes
backends to episodes by the pod's address. For each episode:

- the breach is the first sample over the budget; it is *sustained* ``breachSeconds`` later (the
  spec's definition);
- the reaction is from that moment to the operator's first remediation call (the time of its
  ``action`` log record, written when the call returned);
- the recovery is from that moment to the first sample back within the budget.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_APP,
    Kube,
    Operator,
    Server,
    Spread,
    Ticker,
    parse_time,
    percentile,
    say,
)
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads

BUDGET = 10
CAP = 16  # the leaky pod stops here: 6 over the budget
LEAK_RATE = 2.0  # connections per second: over the budget ~5 s after the pod starts
BREACH_SECONDS = 10  # a multiple of both poll intervals, so "sustained" means the same for both
POLLS = (10, 1)  # the default poll interval and a fast one
SAMPLE_INTERVAL = 0.2
EPISODE_LIMIT = 120.0  # seconds an episode may take from its start before it counts as lost


def budget_spec(poll: int) -> dict[str, Any]:
    return {
        "database": {"secretRef": {"name": "pg-monitor"}},
        "budget": {"maxConnections": BUDGET, "scope": "Selected"},
        "selector": {"matchLabels": {"app": "leaky"}},
        "pollSeconds": poll,
        "remediation": {"breachSeconds": BREACH_SECONDS, "steps": ["TerminateIdle"]},
    }


@dataclass
class Episode:
    namespace: str
    start_delay: float
    ips: set[str] = field(default_factory=set)
    counts: list[tuple[float, int]] = field(default_factory=list)
    action_at: float | None = None

    def breach(self) -> float | None:
        return next((t for t, n in self.counts if n > BUDGET), None)

    def recovered(self) -> float | None:
        if self.action_at is None:
            return None
        return next((t for t, n in self.counts if t >= self.action_at and n <= BUDGET), None)


def _play(
    sb: Sandbox, kube: Kube, server: Server, poll: int, n: int, out_dir: Path
) -> list[Episode]:
    wl = Workloads(sandbox=sb, api=kube.api)
    rnd = random.Random(poll * 1000 + n)  # reproducible starts
    eps = [
        Episode(namespace=f"lat{poll}-{i}", start_delay=rnd.uniform(0, 2 * poll)) for i in range(n)
    ]
    for ep in eps:
        kube.namespace(ep.namespace)
        kube.secret(ep.namespace, "pg-monitor", {"dsn": server.monitor_dsn()})
        kube.budget(ep.namespace, "leaky", budget_spec(poll))
    op = Operator.start(sb, [e.namespace for e in eps], out_dir / f"operator-latency-{poll}.log")
    lock = threading.Lock()
    conn = server.superuser()

    def sample() -> None:
        rows = conn.execute(
            "SELECT host(client_addr), count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND datname = 'app' "
            f"AND application_name NOT IN ('{BENCH_APP}', 'connbudget-probe') GROUP BY 1"
        ).fetchall()
        now = time.time()
        seen = {str(ip): int(c) for ip, c in rows if ip}
        with lock:
            for ep in eps:
                if ep.ips:
                    ep.counts.append((now, sum(seen.get(ip, 0) for ip in ep.ips)))

    by_ns = {ep.namespace: ep for ep in eps}

    def learn_ips() -> None:
        # A pod is Running (with its address) once its process starts, before it connects.
        pods = kube.core.list_pod_for_all_namespaces(label_selector="bench=latency").items
        with lock:
            for p in pods:
                ep = by_ns.get(p.metadata.namespace)
                if ep is not None and p.status.pod_ip:
                    ep.ips.add(p.status.pod_ip)

    ticker: Ticker | None = None
    learner: Ticker | None = None
    try:
        # Every budget probed once, so its poll cycle has begun before its leak starts.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            items = [
                b for b in kube.budgets() if b["metadata"]["namespace"].startswith(f"lat{poll}-")
            ]
            if len(items) == n and all((b.get("status") or {}).get("lastProbeTime") for b in items):
                break
            time.sleep(0.5)
        limit = EPISODE_LIMIT + 4 * poll + 60
        learner = Ticker(learn_ips, interval=0.25, limit=limit).start()
        ticker = Ticker(sample, interval=SAMPLE_INTERVAL, limit=limit).start()
        t0 = time.monotonic()
        pending = sorted(eps, key=lambda e: e.start_delay)
        for ep in pending:
            time.sleep(max(0.0, t0 + ep.start_delay - time.monotonic()))
            wl.deploy(
                ep.namespace,
                "leaky",
                replicas=1,
                labels={"bench": "latency"},
                env={"LEAK_RATE": str(LEAK_RATE), "LEAK_MAX": str(CAP)},
                database_url=server.app_dsn(),
                wait=False,
            )
        # Wait for every episode to act and recover.
        end = time.monotonic() + EPISODE_LIMIT
        while time.monotonic() < end:
            acted = {
                str(a.get("budget")): parse_time(str(a["time"])) for a in reversed(op.actions())
            }
            for ep in eps:
                ep.action_at = acted.get(f"{ep.namespace}/leaky")
            if all(ep.recovered() is not None for ep in eps):
                break
            time.sleep(1.0)
    finally:
        for t in (ticker, learner):
            if t is not None:
                t.stop()
        conn.close()
        op.stop()
        kube.delete_namespaces([e.namespace for e in eps])
    return eps


def run(
    sb: Sandbox, kube: Kube, server: Server, *, episodes: int, out_dir: Path, charts: Path
) -> dict[str, Any]:
    say(
        f"\n== 2. reaction latency: {episodes} episodes per poll interval, budget {BUDGET} "
        f"(scope Selected), leak {LEAK_RATE}/s up to {CAP}, breachSeconds {BREACH_SECONDS}"
    )
    out: dict[str, Any] = {}
    for poll in POLLS:
        eps = _play(sb, kube, server, poll, episodes, out_dir)
        reactions: list[float] = []
        recoveries: list[float] = []
        lost = 0
        for ep in eps:
            b, rec = ep.breach(), ep.recovered()
            unseen_start = not ep.counts or ep.counts[0][1] > BUDGET
            if b is None or ep.action_at is None or rec is None or unseen_start:
                lost += 1
                continue
            sustained = b + BREACH_SECONDS
            reactions.append(ep.action_at - sustained)
            recoveries.append(rec - sustained)
        details = [
            {
                "namespace": ep.namespace,
                "breach": ep.breach(),
                "action": ep.action_at,
                "recovered": ep.recovered(),
                "peak": max((c for _, c in ep.counts), default=0),
                "samples": len(ep.counts),
            }
            for ep in eps
        ]
        res = {
            "poll": poll,
            "episodes": len(eps),
            "measured": len(reactions),
            "lost": lost,
            "reaction_p50": percentile(reactions, 50),
            "reaction_p99": percentile(reactions, 99),
            "reaction": Spread.of(reactions),
            "recovery_p50": percentile(recoveries, 50),
            "recovery_p99": percentile(recoveries, 99),
            "target": poll + 1.0,
            "reactions": [round(r, 3) for r in reactions],
            "recoveries": [round(r, 3) for r in recoveries],
            "details": details,
        }
        out[f"poll{poll}"] = res
        say(
            f"  poll {poll:>2}s: {len(reactions)}/{len(eps)} episodes; reaction p50 "
            f"{res['reaction_p50']:.2f}s p99 {res['reaction_p99']:.2f}s (target <= "
            f"{poll + 1}s); recovery p50 {res['recovery_p50']:.2f}s p99 "
            f"{res['recovery_p99']:.2f}s" + (f"; {lost} episodes lost" if lost else "")
        )
    _chart(out, charts / "latency.png")
    # The episodes' pods are stopping: wait until their connections are gone.
    left = server.wait_backends("datname = 'app'", at_most=0, timeout=120)
    if left:
        say(f"  warning: {left} client backends still open after the episodes")
    return out


def _chart(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(out), figsize=(11, 4.5), dpi=110, squeeze=False)
    for ax, res in zip(axes[0], out.values(), strict=True):
        data: Sequence[Sequence[float]] = [res["reactions"], res["recoveries"]]
        ax.boxplot(data, tick_labels=["first action", "back within budget"], whis=(0, 100))
        for i, vs in enumerate(data, start=1):
            ax.scatter([i] * len(vs), vs, s=10, alpha=0.5, color="#1f77b4")
        ax.axhline(res["target"], color="#d62728", linestyle="--", label="target: poll + 1 s")
        ax.set_title(f"pollSeconds {res['poll']} ({res['measured']} episodes)")
        ax.set_ylabel("seconds after the breach was sustained")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Reaction latency: from a sustained breach to remediation and recovery")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
