"""Shards end to end: two real replicas against the sandbox's API server and PostgreSQL.

Budgets over four database Secrets, split into two shards: each shard's Lease is held by one
replica, each budget is probed by the replica holding its shard and by no other, and when that
replica is killed (SIGKILL: no hand-over), the other takes its shard over and probes its budgets
again within the shard Lease and a few attempts.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from bench.common import metric_samples
from connbudget.kube.lease import RETRY_SECONDS, SHARD_LEASE_SECONDS
from connbudget.policy.shards import shard_of
from e2e.conftest import Budgets, Operator, start_operator, wait_until
from e2e.reliability import budget_spec
from sandbox.core import Sandbox

pytestmark = pytest.mark.sandbox

SHARDS = 2
SECRETS = ("pg-a", "pg-b", "pg-c", "pg-d", "pg-e", "pg-f")
# A dead replica's shard: its Lease and its member Lease expire on the survivor's own clock,
# then the survivor's next attempt takes it and its next poll writes the status.
TAKEOVER_BOUND = SHARD_LEASE_SECONDS + 3 * RETRY_SECONDS + 2


def probe_counts(op: Operator, namespace: str) -> dict[str, float]:
    """How many probes this replica timed, per budget (its own metrics)."""
    return {
        labels["budget"]: n
        for labels, n in metric_samples(op.metrics(), "connbudget_probe_duration_seconds_count")
        if labels.get("namespace") == namespace
    }


def probed_in(ops: list[Operator], namespace: str, seconds: float) -> list[set[str]]:
    """The budgets each replica probed within the next ``seconds``."""
    before = [probe_counts(op, namespace) for op in ops]
    time.sleep(seconds)
    after = [probe_counts(op, namespace) for op in ops]
    return [
        {b for b, n in a.items() if n > b0.get(b, 0.0)} for a, b0 in zip(after, before, strict=True)
    ]


def holders(api: kubernetes.client.ApiClient, namespace: str) -> dict[int, str]:
    coord = kubernetes.client.CoordinationV1Api(api)
    out = {}
    for s in range(SHARDS):
        try:
            lease = coord.read_namespaced_lease(f"connbudget-operator-shard-{s}", namespace)
        except kubernetes.client.ApiException:
            continue
        if lease.spec.holder_identity:
            out[s] = str(lease.spec.holder_identity)
    return out


@pytest.fixture
def replicas(
    sandbox: Sandbox, namespace: str, budgets: Budgets, tmp_path: Path
) -> Iterator[list[Operator]]:
    ops = [
        start_operator(
            sandbox,
            namespace,
            tmp_path / f"replica-{i}.log",
            standalone=False,
            env={"CONNBUDGET_SHARDS": str(SHARDS)},
        )
        for i in range(2)
    ]
    yield ops
    for op in ops:
        op.stop()


def test_each_shard_is_one_replicas_and_a_dead_replicas_shard_is_taken_over(
    sandbox: Sandbox,
    namespace: str,
    budgets: Budgets,
    kube_api: kubernetes.client.ApiClient,
    replicas: list[Operator],
) -> None:
    by_shard: dict[int, list[str]] = {}
    for secret in SECRETS:
        budgets.secret(secret, sandbox.db.monitor_dsn)
        name = f"b-{secret}"
        budgets.create(name, budget_spec("nothing", database={"secretRef": {"name": secret}}))
        by_shard.setdefault(shard_of(namespace, secret, SHARDS), []).append(name)
    assert sorted(by_shard) == [0, 1], "the Secrets' names should spread over both shards"

    # Both shards held, by different replicas (each joined the other: rendezvous hashing).
    held = wait_until(
        lambda: (h := holders(kube_api, namespace)) and len(set(h.values())) == SHARDS and h,
        60,
        "each shard held by its own replica",
    )
    every = {n for names in by_shard.values() for n in names}
    wait_until(
        lambda: all(budgets.status(n).get("lastProbeTime") for n in every),
        60,
        "every budget probed",
    )
    # Each replica probes exactly the budgets of the shards it holds, and no budget is probed
    # by both (counted over a few polls once the shards have settled).
    seen = probed_in(replicas, namespace, 3 * RETRY_SECONDS)
    assert not (seen[0] & seen[1]), f"budgets probed by both replicas: {seen[0] & seen[1]}"
    assert seen[0] | seen[1] == every
    identities = {}
    for op, mine in zip(replicas, seen, strict=True):
        (shard,) = {s for s, names in by_shard.items() if set(names) == mine}
        identities[held[shard]] = op
    assert len(identities) == SHARDS

    # The holder of shard 0 dies without a word; the other takes shard 0 over.
    victim = identities[held[0]]
    survivor = next(op for op in replicas if op is not victim)
    before = {n: budgets.status(n).get("lastProbeTime") for n in by_shard[0]}
    victim.stop(signal.SIGKILL)
    killed = time.monotonic()
    survivor_id = held[1]
    wait_until(
        lambda: holders(kube_api, namespace).get(0) == survivor_id,
        TAKEOVER_BOUND + 10,
        "shard 0 taken over",
    )
    taken = time.monotonic() - killed
    assert taken <= TAKEOVER_BOUND, f"shard 0 taken over after {taken:.1f}s"
    # Its budgets are probed again by the survivor (the first status it writes for each: a
    # status that changes only in lastProbeTime is written again only at the heartbeat).
    wait_until(
        lambda: all(budgets.status(n).get("lastProbeTime") != before[n] for n in by_shard[0]),
        30,
        "shard 0's budgets probed by the survivor",
    )
    (now_seen,) = probed_in([survivor], namespace, 2 * RETRY_SECONDS)
    assert now_seen == every
