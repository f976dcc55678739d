"""Shards held by exactly one replica each, handed over when a replica joins, taken over when
one dies (handlers.election.Shards against an in-memory Lease API; no cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from connbudget.handlers.election import ORPHAN_GRACE_SECONDS, Shards
from connbudget.kube.api import KubeError
from connbudget.kube.lease import RETRY_SECONDS, SHARD_LEASE_SECONDS
from connbudget.policy.shards import plan_shards
from unit.test_lease import stored_lease

SHARDS = 6


class Leases:
    """Leases in memory, with the API server's optimistic concurrency, labels and listing."""

    def __init__(self) -> None:
        self.leases: dict[str, Any] = {}
        self.version = 0

    def _stored(self, body: dict[str, Any]) -> Any:
        self.version += 1
        return stored_lease(body, self.version)

    def read_namespaced_lease(self, name: str, namespace: str) -> Any:
        if name not in self.leases:
            raise KubeError(404, "not found")
        return self.leases[name]

    def create_namespaced_lease(self, namespace: str, body: dict[str, Any]) -> Any:
        name = body["metadata"]["name"]
        if name in self.leases:
            raise KubeError(409, "exists")
        self.leases[name] = self._stored(body)
        return self.leases[name]

    def replace_namespaced_lease(self, name: str, namespace: str, body: dict[str, Any]) -> Any:
        if body["metadata"]["resourceVersion"] != self.leases[name].metadata.resource_version:
            raise KubeError(409, "conflict")
        self.leases[name] = self._stored(body)
        return self.leases[name]

    def list_namespaced_lease(self, namespace: str, label_selector: str = "") -> Any:
        key, _, value = label_selector.partition("=")
        return SimpleNamespace(
            items=[v for v in self.leases.values() if v.metadata.labels.get(key) == value]
        )

    def delete_namespaced_lease(self, name: str, namespace: str) -> Any:
        if self.leases.pop(name, None) is None:
            raise KubeError(404, "not found")

    def holders(self) -> dict[str, str]:
        return {k: v.spec.holder_identity or "" for k, v in self.leases.items() if "-shard-" in k}


class CallingKube:
    async def call_lease(self, fn: Callable[..., Any], *args: object, **kwargs: object) -> Any:
        return fn(*args, **kwargs)


class Replica:
    """A replica's election against the shared Leases, on its own monotonic clock, and what it
    leads (as the reconciler would)."""

    def __init__(self, leases: Leases, identity: str, clock: list[float]) -> None:
        self.identity = identity
        self.shards = Shards(
            CallingKube(),  # type: ignore[arg-type]
            namespace="ops",
            identity=identity,
            shards=SHARDS,
            coord=leases,
            monotonic=lambda: clock[0],
        )
        self.held: dict[int, Callable[[], bool]] = {}
        self.standby: frozenset[int] | None = None

    def lead(self, shard: int | None = None, may_act: Callable[[], bool] | None = None) -> None:
        assert shard is not None
        assert may_act is not None
        self.held[shard] = may_act

    async def follow(self, shard: int | None = None) -> None:
        for s in range(SHARDS) if shard is None else (shard,):
            self.held.pop(s, None)

    def stand_by(self, shards: frozenset[int] | None) -> None:
        self.standby = shards

    def acting(self) -> set[int]:
        return {s for s, act in self.held.items() if act()}

    def step(self) -> None:
        asyncio.run(self.shards.step(self))


def run(replicas: list[Replica], clocks: list[list[float]], seconds: float) -> None:
    """Every live replica steps every RETRY_SECONDS for ``seconds``; after each round no shard
    is acted on by two replicas."""
    t = 0.0
    while t < seconds:
        for r, c in zip(replicas, clocks, strict=True):
            c[0] += RETRY_SECONDS
            r.step()
        acting = [r.acting() for r in replicas]
        for i, a in enumerate(acting):
            for b in acting[i + 1 :]:
                assert not (a & b), f"shards acted on twice: {a & b}"
        t += RETRY_SECONDS


def test_a_joining_replica_gets_its_shards_and_none_is_held_twice() -> None:
    leases = Leases()
    ca, cb = [0.0], [1000.0]  # the clocks need not agree
    a = Replica(leases, "a", ca)
    run([a], [ca], 6)
    assert a.acting() == set(range(SHARDS))  # alone: every shard
    b = Replica(leases, "b", cb)
    # Handed over, not waited out: b acts on its shards within two attempts of joining, far
    # sooner than a Lease could expire.
    run([a, b], [ca, cb], 2 * RETRY_SECONDS)
    assert 2 * RETRY_SECONDS < SHARD_LEASE_SECONDS
    plan_a = plan_shards(shards=SHARDS, members={"a", "b"}, me="a")
    plan_b = plan_shards(shards=SHARDS, members={"a", "b"}, me="b")
    assert a.acting() == plan_a.owned
    assert b.acting() == plan_b.owned
    assert a.acting() | b.acting() == set(range(SHARDS))
    assert b.standby == plan_b.standby  # b stands by for a's shards


def test_a_dead_replicas_shards_are_taken_over_within_a_lease_and_a_few_attempts() -> None:
    leases = Leases()
    ca, cb = [0.0], [0.0]
    a, b = Replica(leases, "a", ca), Replica(leases, "b", cb)
    run([a, b], [ca, cb], 12)
    lost = a.acting()
    assert lost
    # a dies: it never steps again. b takes its shards once their Leases (and a's member Lease)
    # have stayed unchanged a whole Lease on b's own clock.
    taken_after = None
    for i in range(1, 20):
        cb[0] += RETRY_SECONDS
        b.step()
        if lost <= b.acting():
            taken_after = i * RETRY_SECONDS
            break
    assert taken_after is not None
    assert taken_after <= SHARD_LEASE_SECONDS + ORPHAN_GRACE_SECONDS + 2 * RETRY_SECONDS
    assert b.acting() == set(range(SHARDS))


def test_a_replica_that_stops_hands_its_shards_over_at_once() -> None:
    leases = Leases()
    ca, cb = [0.0], [0.0]
    a, b = Replica(leases, "a", ca), Replica(leases, "b", cb)
    run([a, b], [ca, cb], 12)
    asyncio.run(a.shards.leave(a))
    assert not a.acting()
    assert "connbudget-member-a" not in leases.leases
    cb[0] += RETRY_SECONDS
    b.step()
    cb[0] += RETRY_SECONDS
    b.step()
    assert b.acting() == set(range(SHARDS))  # released Leases need no expiry


def test_a_shard_its_replica_does_not_take_is_kept_by_another_not_left_alone() -> None:
    """b is alive (it renews its member Lease) but never takes its shards: a takes them once
    they have been free a while, and keeps them a good while before offering them back."""
    from connbudget.handlers.election import ORPHAN_KEEP_SECONDS

    leases = Leases()
    ca, cb = [0.0], [0.0]
    a, b = Replica(leases, "a", ca), Replica(leases, "b", cb)
    mine = plan_shards(shards=SHARDS, members={"a", "b"}, me="b").owned
    assert mine
    t, unattended = 0.0, 0.0
    while t < 2 * ORPHAN_KEEP_SECONDS:
        ca[0] += RETRY_SECONDS
        cb[0] += RETRY_SECONDS
        asyncio.run(b.shards.membership.live(cb[0]))  # alive, but takes nothing
        a.step()
        t += RETRY_SECONDS
        if t > SHARD_LEASE_SECONDS and not mine <= a.acting():
            unattended += RETRY_SECONDS
    # Left alone at most the grace and an attempt at a time, about once per keep period.
    assert unattended <= 2 * (ORPHAN_GRACE_SECONDS + 2 * RETRY_SECONDS)


class SlowShardKube:
    """Lease calls answered at once, except reading shard 0's Lease: that answer comes only once
    every other shard is led (a busy API server slow on one Lease), or never."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    async def call_lease(self, fn: Callable[..., Any], *args: object, **kwargs: object) -> Any:
        if fn.__name__ == "read_namespaced_lease" and str(args[0]).endswith("-shard-0"):
            for _ in range(1000):  # bounded: the step's own timeout fails the test first
                if set(self.replica.held) == set(range(1, SHARDS)):
                    break
                await asyncio.sleep(0.01)
        return fn(*args, **kwargs)


def test_a_slow_answer_for_one_shard_holds_back_no_other_shard() -> None:
    """The shards of a step are attempted at once: the other five are taken and led while the
    read of shard 0's Lease is still waiting (one after the other, the step would never end)."""
    leases = Leases()
    a = Replica(leases, "a", [0.0])
    a.shards = Shards(
        SlowShardKube(a),  # type: ignore[arg-type]
        namespace="ops",
        identity="a",
        shards=SHARDS,
        coord=leases,
        monotonic=lambda: 0.0,
    )

    async def step() -> None:
        await asyncio.wait_for(a.shards.step(a), timeout=10)

    asyncio.run(step())
    assert a.acting() == set(range(SHARDS))
