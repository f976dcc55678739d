"""Sharding: which replica keeps which budgets, when one replica is not enough.

Pure: no I/O, no clock; all inputs are arguments.

Budgets are split into ``shards`` by a stable hash of the database Secret each names (its
namespace and name): the budgets of one database, through one Secret, are in one shard, so the
database is sampled by one replica. Each shard is held through its own Lease; which live replica
should hold it is decided by rendezvous hashing over the live replicas (each replica keeps a
member Lease): every replica computes the same answer from the same members, a replica that
joins or leaves moves only the shards it gains or held, and the runner-up of each shard keeps a
standby connection to its databases for a quick takeover.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Collection
from dataclasses import dataclass


def shard_of(namespace: str, secret: str, shards: int) -> int:
    """The shard of a budget in ``namespace`` naming the database Secret ``secret``."""
    if shards <= 1:
        return 0
    return zlib.crc32(f"{namespace}/{secret}".encode()) % shards


def ranking(shard: int, members: Collection[str]) -> list[str]:
    """The live replicas in the order they should hold ``shard`` (rendezvous hashing)."""
    return sorted(
        members,
        key=lambda m: (hashlib.sha256(f"{shard}/{m}".encode()).digest(), m),
        reverse=True,
    )


@dataclass(frozen=True)
class ShardPlan:
    """What one replica should do with each shard."""

    owned: frozenset[int]  # shards it should hold
    standby: frozenset[int]  # shards it is the runner-up of: keep their connections open


def plan_shards(*, shards: int, members: Collection[str], me: str) -> ShardPlan:
    """Which shards ``me`` should hold and stand by for, among the live ``members``."""
    everyone = set(members) | {me}
    owned, standby = set(), set()
    for s in range(shards):
        order = ranking(s, everyone)
        if order[0] == me:
            owned.add(s)
        elif len(order) > 1 and order[1] == me:
            standby.add(s)
    return ShardPlan(owned=frozenset(owned), standby=frozenset(standby))
