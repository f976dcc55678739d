"""Which replica acts: one Lease for the whole operator, or one per shard.

With one shard, every replica tries for the operator's Lease every ``RETRY_SECONDS`` and the one
holding it leads every budget (the others keep standby connections). With several, each replica
renews a member Lease, computes from the live members which shards it should hold
(``policy.shards``: rendezvous hashing, the same answer in every replica), tries for those
shards' Leases, hands over a shard it holds but should not (its workers stopped first, then the
Lease released, so the other need not wait for it to expire), and takes a shard it should not
hold only when the shard's Lease has been free a while (its rightful replica is not taking it).
Between attempts every action asks the shard's elector itself: a replica whose renewal hangs
stops acting at its renew deadline, not at its next attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from connbudget.kube.api import Kube
from connbudget.kube.lease import (
    RETRY_SECONDS,
    SHARD_LEASE_SECONDS,
    SHARD_RENEW_DEADLINE_SECONDS,
    Coordination,
    LeaseElector,
    Membership,
    coordination,
    shard_lease_name,
)
from connbudget.policy.shards import plan_shards

log = logging.getLogger("connbudget.election")


class Leader(Protocol):
    """What the election drives (``Reconciler``): which shards this replica acts on."""

    def lead(self, shard: int | None = None, may_act: Callable[[], bool] | None = None) -> None: ...

    async def follow(self, shard: int | None = None) -> None: ...

    def stand_by(self, shards: frozenset[int] | None) -> None: ...


LEASE_NAME = "connbudget-operator"
# A shard whose rightful replica has not taken it this long after its Lease expired is taken by
# any replica (it may be stuck, or its members' view differs for a moment).
ORPHAN_GRACE_SECONDS = 2 * RETRY_SECONDS
# ... and kept this long before it is handed to that replica again.
ORPHAN_KEEP_SECONDS = 3 * SHARD_LEASE_SECONDS


async def elect(reconciler: Leader, elector: LeaseElector | None) -> None:
    """One Lease for every budget: take or renew it every ``RETRY_SECONDS``; lead while it is
    held for sure (without an elector, a single replica: lead at once)."""
    if elector is None:
        reconciler.lead()
        return
    while True:
        try:
            await elector.try_acquire(time.time())
        except Exception as e:
            log.warning("leader election failed", extra={"error": str(e)})
        if elector.may_act():
            reconciler.lead(0, elector.may_act)
        else:
            await reconciler.follow(0)
        await asyncio.sleep(RETRY_SECONDS)


class Shards:
    """This replica's view of the shards: their electors and its membership."""

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        identity: str,
        shards: int,
        coord: Coordination | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self.shards = shards
        coord = coord or coordination(kube)
        self.membership = Membership(
            kube,
            namespace=namespace,
            identity=identity,
            coord=coord,
            monotonic=monotonic,
            duration=SHARD_LEASE_SECONDS,
        )
        self.electors = [
            LeaseElector(
                kube,
                namespace=namespace,
                name=shard_lease_name(LEASE_NAME, s, shards),
                identity=identity,
                coord=coord,
                monotonic=monotonic,
                duration=SHARD_LEASE_SECONDS,
                renew_deadline=SHARD_RENEW_DEADLINE_SECONDS,
            )
            for s in range(shards)
        ]
        self.monotonic = monotonic
        # Shards taken because nobody took them, not because this replica should hold them, and
        # when: kept a while (not handed back and forth with a replica that does not take them),
        # then handed to the replica that should hold them; no longer orphans once they are its.
        self.orphans: dict[int, float] = {}

    async def step(self, reconciler: Leader) -> None:
        """One attempt: renew membership, take or renew the shards this replica should hold,
        hand over the others, and lead exactly the shards held for sure.

        The shards are attempted all at once: one slow answer (a busy API server) must not hold
        back the other shards' renewals past their renew deadline, nor a dead replica's shards
        behind the living ones'."""
        now = time.time()
        members = await self.membership.live(now)
        plan = plan_shards(shards=self.shards, members=members, me=self.identity)
        for s in plan.owned:
            self.orphans.pop(s, None)
        results = await asyncio.gather(
            *(self._attempt(s, reconciler, plan.owned, now) for s in range(self.shards)),
            return_exceptions=True,
        )
        for s, result in enumerate(results):
            if isinstance(result, Exception):
                log.warning(
                    "shard election failed",
                    extra={"shard": s, "lease": self.electors[s].name, "error": str(result)},
                )
            elif isinstance(result, BaseException):
                raise result  # cancelled: stop the election
        reconciler.stand_by(plan.standby)

    async def _attempt(self, s: int, reconciler: Leader, owned: frozenset[int], now: float) -> None:
        """One shard's part of a step."""
        elector = self.electors[s]
        kept = s in self.orphans and self.monotonic() - self.orphans[s] < ORPHAN_KEEP_SECONDS
        if s in owned or kept:
            await _try(elector, now)
        elif elector.may_act():
            # Another live replica should hold it (it joined, or this one kept an orphan long
            # enough): stop acting, then give it up.
            self.orphans.pop(s, None)
            await reconciler.follow(s)
            await elector.release(time.time())
            log.info("shard handed over", extra={"shard": s, "lease": elector.name})
            return
        else:
            await elector.observe()
            if elector.free_for() >= ORPHAN_GRACE_SECONDS:
                log.warning(
                    "taking a shard nobody takes", extra={"shard": s, "lease": elector.name}
                )
                self.orphans[s] = self.monotonic()
                await _try(elector, now)
        if elector.may_act():
            reconciler.lead(s, elector.may_act)
        else:
            self.orphans.pop(s, None)
            await reconciler.follow(s)

    async def leave(self, reconciler: Leader) -> None:
        """Stop: follow every shard, release the Leases held, delete the member Lease."""
        held = [e for e in self.electors if e.may_act()]
        await reconciler.follow()
        for elector in held:
            await elector.release(time.time())
        await self.membership.leave()


async def _try(elector: LeaseElector, now: float) -> None:
    try:
        await elector.try_acquire(now)
    except Exception as e:
        log.warning("shard election failed", extra={"lease": elector.name, "error": str(e)})


async def elect_shards(reconciler: Leader, shards: Shards) -> None:
    """Run the sharded election every ``RETRY_SECONDS`` until cancelled."""
    log.info(
        "sharded election",
        extra={"shards": shards.shards, "identity": shards.identity},
    )
    try:
        while True:
            try:
                await shards.step(reconciler)
            except Exception as e:
                log.warning("sharded election failed", extra={"error": str(e)})
            await asyncio.sleep(RETRY_SECONDS)
    finally:
        try:
            await asyncio.wait_for(shards.leave(reconciler), timeout=5)
        except Exception as e:  # the API server may be gone: the Leases expire by themselves
            log.warning("leaving the shards failed", extra={"error": str(e)})
