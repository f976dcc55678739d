"""Benchmark 5: a fleet larger than one replica, split over shards.

``BUDGETS`` ConnectionBudgets over the footprint's fleet (pods without processes, several budgets
per pod, ``DATABASES`` databases of one server, one Secret per database and namespace), run by
``REPLICAS`` replicas with ``SHARDS`` shards. Once every budget has been probed and the shards have
settled: each replica's resident memory and CPU over a window, every budget's probes in it
(summed over the replicas: the cadence), budgets probed by two replicas in the window (must be
none), and which replica holds which shard's Lease. Then the replica holding shard 0 is killed
(SIGKILL: no hand-over) and the survivors are timed: until they hold its shards' Leases, and until
each of its budgets has been probed again.
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import kubernetes

from bench.common import (
    Kube,
    Operator,
    Server,
    Spread,
    cpu_seconds,
    metric_samples,
    probe_counts,
    rss_mb,
    say,
)
from bench.footprint import POLL, SETTLE_SECONDS, Fleet, _wait_all_probed, expected_probes
from connbudget.policy.shards import shard_of
from sandbox.core import Sandbox

# The 5,000. Before the client paced its calls (``kube.flow``) and shared its Secret reads,
# 5,000 budgets saturated this machine's single API server (2 cores, built from source) before
# every budget had been probed once: every budget writes its status at its first probe, and each
# write is a watch event for every replica.
BUDGETS = 5000
FIRST_PROBE_TIMEOUT = 600.0
REPLICAS = 2
SHARDS = 4
WINDOW_SECONDS = 60.0
LEASE = "connbudget-operator-shard-{}"
FAILOVER_TIMEOUT = 120.0


def _holders(kube: Kube, namespace: str, shards: int) -> dict[int, str]:
    coord = kubernetes.client.CoordinationV1Api(kube.api)
    out = {}
    for s in range(shards):
        try:
            lease = coord.read_namespaced_lease(LEASE.format(s), namespace)
        except kubernetes.client.ApiException:
            continue
        if lease.spec.holder_identity:
            out[s] = str(lease.spec.holder_identity)
    return out


def _identity(op: Operator) -> str:
    """The replica's identity (it logs it when the sharded election starts)."""
    import json

    for line in op.log.read_text(errors="replace").splitlines():
        if '"sharded election"' in line:
            return str(json.loads(line)["identity"])
    raise RuntimeError(f"no identity in {op.log}")


def run(
    sb: Sandbox,
    kube: Kube,
    server: Server,
    *,
    budgets: int = BUDGETS,
    replicas: int = REPLICAS,
    shards: int = SHARDS,
    window: float = WINDOW_SECONDS,
    out_dir: Path,
) -> dict[str, Any]:
    fleet = Fleet(kube=kube, server=server)
    say(
        f"\n== 5. shards: {budgets} budgets over {fleet.pods} pods, {replicas} replicas, "
        f"{shards} shards; a {window:.0f}s window, then the holder of shard 0 killed"
    )
    t = time.monotonic()
    fleet.create()
    fleet.scale_budgets(budgets)
    say(f"  fleet and budgets up in {time.monotonic() - t:.0f}s")
    lease_ns = fleet.ns(0)  # the first namespace watched: where the Leases are
    namespaces = [fleet.ns(k) for k in range(fleet.namespaces)]
    ops: list[Operator] = []
    try:
        since = time.time()
        ops = [
            Operator.start(sb, namespaces, out_dir / f"operator-shard-{i}.log", shards=shards)
            for i in range(replicas)
        ]
        try:
            took: float | None = _wait_all_probed(kube, fleet, since, timeout=FIRST_PROBE_TIMEOUT)
        except RuntimeError:
            took = None  # reported, and measured as it stands
            say(f"  not every budget probed within {FIRST_PROBE_TIMEOUT:.0f}s")
        time.sleep(SETTLE_SECONDS)
        ids = [_identity(op) for op in ops]
        m0 = [probe_counts(op.metrics()) for op in ops]
        c0, t0 = [cpu_seconds(op.pid) for op in ops], time.monotonic()
        rss: list[list[float]] = [[] for _ in ops]
        while time.monotonic() - t0 < window:
            for i, op in enumerate(ops):
                rss[i].append(rss_mb(op.pid))
            time.sleep(2.0)
        c1, t1 = [cpu_seconds(op.pid) for op in ops], time.monotonic()
        texts = [op.metrics() for op in ops]
        m1 = [probe_counts(text) for text in texts]
        throttled = [
            metric_samples(text, "connbudget_kube_throttled_seconds_total") for text in texts
        ]
        per_replica = [
            {k: n - m0[i].get(k, (0.0, 0.0))[0] for k, (n, _) in m1[i].items()}
            for i in range(len(ops))
        ]
        probed = [{k for k, n in p.items() if n > 0} for p in per_replica]
        twice = set.intersection(*probed) if len(probed) > 1 else set()
        totals: dict[str, float] = {}
        for p in per_replica:
            for k, n in p.items():
                totals[k] = totals.get(k, 0.0) + n
        counts = [totals.get(f"{ns}/{name}", 0.0) for ns, name in fleet.budgets]
        expected = expected_probes(t1 - t0, POLL)
        holders = _holders(kube, lease_ns, shards)
        held = [sorted(s for s, h in holders.items() if h == ident) for ident in ids]
        row: dict[str, Any] = {
            "budgets": budgets,
            "replicas": replicas,
            "shards": shards,
            "pods": fleet.pods,
            "databases": fleet.databases_used(),
            "first_probe_all_seconds": None if took is None else round(took, 1),
            "window_seconds": t1 - t0,
            "rss_mb": [max(r) for r in rss],
            "cpu_percent": [100 * (b - a) / (t1 - t0) for a, b in zip(c0, c1, strict=True)],
            "budgets_per_replica": [len(p) for p in probed],
            "shards_held": held,
            "probed_twice": len(twice),
            "probes_per_budget": Spread.of(counts),
            "expected_probes_min": expected,
            "cadence_kept": bool(counts) and min(counts) >= expected,
            # Seconds the replica's API calls waited for its token bucket since it started.
            "throttled_seconds": [s[0][1] if s else None for s in throttled],
        }
        say(
            f"  every budget probed {took or math.nan:.0f}s after the start; per replica: budgets "
            f"{row['budgets_per_replica']}, shards {held}, RSS "
            + ", ".join(f"{m:.1f} MB" for m in row["rss_mb"])
            + ", CPU "
            + ", ".join(f"{c:.1f}%" for c in row["cpu_percent"])
            + f"; probes per budget {row['probes_per_budget'].show('{:.0f}')} (at least "
            f"{expected}, cadence {'kept' if row['cadence_kept'] else 'MISSED'}); probed by two "
            f"replicas: {len(twice)}"
        )
        # Kill the holder of shard 0; time the takeover of its shards and its budgets' probes.
        victim = next(i for i, ident in enumerate(ids) if ident == holders.get(0))
        lost = set(held[victim])
        lost_budgets = [
            f"{ns}/{name}"
            for ns, name in fleet.budgets
            if shard_of(ns, f"pg-{fleet.database(int(ns.rsplit('-', 1)[1]))}", shards) in lost
        ]
        survivors = [op for i, op in enumerate(ops) if i != victim]
        before = [probe_counts(op.metrics()) for op in survivors]
        ops[victim].proc.send_signal(signal.SIGKILL)
        ops[victim].proc.wait(timeout=10)
        killed = time.monotonic()
        taken_at = probed_at = None
        while time.monotonic() - killed < FAILOVER_TIMEOUT and probed_at is None:
            now_holders = _holders(kube, lease_ns, shards)
            if taken_at is None and all(
                now_holders.get(s) not in (None, ids[victim]) for s in lost
            ):
                taken_at = time.monotonic() - killed
            after = [probe_counts(op.metrics()) for op in survivors]
            again = {
                k
                for b, a in zip(before, after, strict=True)
                for k, (n, _) in a.items()
                if n > b.get(k, (0.0, 0.0))[0]
            }
            if taken_at is not None and set(lost_budgets) <= again:
                probed_at = time.monotonic() - killed
            time.sleep(0.5)
        row |= {
            "failover_shards": sorted(lost),
            "failover_budgets": len(lost_budgets),
            "failover_lease_seconds": taken_at,
            "failover_probed_seconds": probed_at,
        }
        say(
            f"  killed the holder of shards {sorted(lost)} ({len(lost_budgets)} budgets): its "
            f"Leases taken after "
            + (f"{taken_at:.1f}s" if taken_at is not None else "NEVER")
            + ", every one of its budgets probed again after "
            + (f"{probed_at:.1f}s" if probed_at is not None else "NEVER")
        )
        row["rss_mb_median"] = statistics.median(row["rss_mb"])
        return row
    finally:
        for op in ops:
            op.stop()
        fleet.delete()
