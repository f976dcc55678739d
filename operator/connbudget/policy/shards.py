"""Sharding: which replica keeps which budgets, when one replica is not enough.

Pure: no I/O, no clock; all inputs are arguments.

Budgets are split into ``shards`` by a stable hash of the database Secret each names (its
namespace and name): the budgets of one database, through one Secret, are in one shard, so the
database is sampled by one replica. Each shard is held through its own Lease; which live replica
should hold it is decided by rendezvous hashing over the live replicas (each replica keeps a
member Lease), capped at a fair share each: every replica computes the same answer from the same
members, shards spread evenly, a replica that joins or leaves moves few shards besides its own,
and the runner-up of each shard keeps a standby connection to its databases for a quick
takeover.
"""

from __future__ import annotations

import hashlib
import math
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


def owners(shards: int, members: Collection[str]) -> list[str]:
    """Which of the live ``members`` should hold each shard, the same in every replica.

    Each shard goes to the first replica in its rendezvous ranking that holds fewer than its
    fair share (``ceil(shards / members)``) of the shards before it: balanced (a pure ranking may
    give every shard of a few to one replica), and still mostly where the ranking puts them.
    """
    cap = math.ceil(shards / len(members))
    held = dict.fromkeys(members, 0)
    out = []
    for s in range(shards):
        owner = next(m for m in ranking(s, members) if held[m] < cap)
        held[owner] += 1
        out.append(owner)
    return out


def plan_shards(*, shards: int, members: Collection[str], me: str) -> ShardPlan:
    """Which shards ``me`` should hold and stand by for, among the live ``members``."""
    everyone = set(members) | {me}
    owned, standby = set(), set()
    for s, owner in enumerate(owners(shards, everyone)):
        if owner == me:
            owned.add(s)
        elif next(m for m in ranking(s, everyone) if m != owner) == me:
            standby.add(s)
    return ShardPlan(owned=frozenset(owned), standby=frozenset(standby))
