"""Leader election with a coordination.k8s.io/v1 Lease, so that of several replicas one acts.

Follows client-go's leader election (``tools/leaderelection``):

- **No clock is compared across machines.** Whether another replica's Lease has expired is told
  by how long *this* process has seen the same record (holder and ``renewTime``) unchanged: at
  least ``leaseDurationSeconds`` on this process's monotonic clock. A replica whose clock is ahead
  or behind neither steals a live Lease nor waits forever for a dead one.
- **A renew deadline shorter than the Lease.** The holder keeps leading only while its last
  successful renewal is younger than ``RENEW_DEADLINE_SECONDS`` (10 s of a 15 s Lease): past it
  the replica stops acting at once, terminations included, well before another may take over.
  Every API call has its own timeout (``kube.api``), so a hung renewal is a failed one, and
  goes through a client of its own (``Kube.call_lease``), so it never waits behind status writes.
- **Races lose cleanly.** Updates carry the resourceVersion they read: two replicas racing for an
  expired Lease cannot both win (the API server refuses the second with a conflict).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import kubernetes

from connbudget.kube.api import Kube, KubeError
from connbudget.model import timestamps

log = logging.getLogger("connbudget.lease")
# The Lease API, as the election above this layer names it without importing the client.
Coordination: TypeAlias = kubernetes.client.CoordinationV1Api


def coordination(kube: Kube) -> Coordination:
    """The Lease API on the operator's client for Leases (``Kube.lease_api``: its own
    connections and threads, outside the token bucket)."""
    api: Coordination = kubernetes.client.CoordinationV1Api(kube.lease_api)
    return api


LEASE_SECONDS = 15  # a dead leader's budgets wait at most about this long for a new one
RENEW_DEADLINE_SECONDS = 10.0  # the holder stops acting when it has not renewed for this long
RETRY_SECONDS = 2.0  # how often every replica tries to take or renew the Lease
# Shards (and the member Leases that say which replicas are alive) use shorter Leases: a dead
# replica's shards are taken over within about SHARD_LEASE_SECONDS plus an attempt or two.
SHARD_LEASE_SECONDS = 10
SHARD_RENEW_DEADLINE_SECONDS = 7.0


def _micro_time(t: float) -> str:
    """A Lease's ``MicroTime`` as the API server expects it."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class _Record:
    """What identifies one renewal of a Lease: its holder and its renewTime, as written."""

    holder: str
    renew_time: str
    duration: float


def _record_of(lease: kubernetes.client.V1Lease, default_duration: float) -> _Record:
    """The record of a Lease read from the API server."""
    return _Record(
        holder=lease.spec.holder_identity or "",
        renew_time=str(lease.spec.renew_time),
        duration=float(lease.spec.lease_duration_seconds or default_duration),
    )


class LeaseElector:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        identity: str,
        coord: kubernetes.client.CoordinationV1Api | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        duration: int = LEASE_SECONDS,
        renew_deadline: float = RENEW_DEADLINE_SECONDS,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.coord = coord or coordination(kube)
        self.monotonic = monotonic
        self.duration = duration
        self.renew_deadline = renew_deadline
        self._missing_since: float | None = None  # when this process first found no Lease
        self._observed: _Record | None = None
        self._observed_at = 0.0  # when (monotonic) this process first saw that record
        self._renewed_at: float | None = None  # when (monotonic) this replica last renewed

    def may_act(self) -> bool:
        """Whether this replica holds the Lease for sure: renewed within the renew deadline."""
        return (
            self._renewed_at is not None
            and self.monotonic() - self._renewed_at < self.renew_deadline
        )

    def free_for(self) -> float:
        """How long the Lease has been free as this process saw it (its own clock): missing, with
        no holder, or its record unchanged past its duration; 0 while someone holds it."""
        now = self.monotonic()
        record = self._observed
        if record is None:
            return 0.0 if self._missing_since is None else now - self._missing_since
        if not record.holder:
            return now - self._observed_at
        return max(0.0, now - self._observed_at - record.duration)

    async def _read(self) -> kubernetes.client.V1Lease | None:
        """The Lease as the API server has it (None: there is none)."""
        try:
            lease: kubernetes.client.V1Lease = await self.kube.call_lease(
                self.coord.read_namespaced_lease, self.name, self.namespace
            )
        except KubeError as e:
            if e.status == 404:
                return None
            raise
        return lease

    async def observe(self) -> None:
        """Read the Lease and note its record, without writing (for ``free_for``)."""
        lease = await self._read()
        if lease is None:
            if self._missing_since is None:
                self._missing_since = self.monotonic()
            self._observed = None
            return
        self._missing_since = None
        self._observe(_record_of(lease, self.duration))

    def _observe(self, record: _Record) -> None:
        if record != self._observed:
            self._observed = record
            self._observed_at = self.monotonic()

    def _expired(self) -> bool:
        """Whether the record seen has stayed unchanged a whole Lease duration, by this clock."""
        record = self._observed
        return record is not None and self.monotonic() - self._observed_at >= record.duration

    async def try_acquire(self, now: float, *, labels: dict[str, str] | None = None) -> bool:
        """Take or renew the Lease; return whether this replica holds it now.

        ``now`` is only written into the Lease (``renewTime``, for people and tools to read);
        no decision compares it with another replica's clock. ``labels`` go on a Lease created.
        """
        started = self.monotonic()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "renewTime": _micro_time(now),
        }
        lease = await self._read()
        if lease is None:
            body = {
                "metadata": {
                    "name": self.name,
                    "namespace": self.namespace,
                    **({"labels": labels} if labels else {}),
                },
                "spec": {**spec, "acquireTime": spec["renewTime"], "leaseTransitions": 0},
            }
            try:
                await self.kube.call_lease(self.coord.create_namespaced_lease, self.namespace, body)
            except KubeError as err:
                if err.status == 409:
                    return False
                raise
            self._renewed_at = started
            return True
        holder = lease.spec.holder_identity or ""
        self._missing_since = None
        self._observe(_record_of(lease, self.duration))
        if holder not in (self.identity, "") and not self._expired():
            self._renewed_at = None
            return False
        new_spec: dict[str, object] = dict(spec)
        if holder != self.identity:
            new_spec["acquireTime"] = spec["renewTime"]
            new_spec["leaseTransitions"] = (lease.spec.lease_transitions or 0) + 1
            log.info("taking over the lease", extra={"from": holder, "to": self.identity})
        else:
            # A renewal replaces the whole spec: keep when it was acquired and how many times it
            # changed hands, or they would vanish at the first renewal.
            new_spec["leaseTransitions"] = lease.spec.lease_transitions or 0
            acquired = timestamps.parse_timestamp(lease.spec.acquire_time)
            if acquired is not None:
                new_spec["acquireTime"] = _micro_time(acquired)
        # A replace writes the whole object: keep its labels (a member Lease is found by one).
        kept = {**(getattr(lease.metadata, "labels", None) or {}), **(labels or {})}
        body = {
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease.metadata.resource_version,
                **({"labels": kept} if kept else {}),
            },
            "spec": new_spec,
        }
        try:
            await self.kube.call_lease(
                self.coord.replace_namespaced_lease, self.name, self.namespace, body
            )
        except KubeError as e:
            if e.status == 409:
                return False
            raise
        # Held from when this attempt began: the renew deadline counts from the earliest moment
        # the Lease could have been written.
        self._renewed_at = started
        return True

    async def release(self, now: float) -> None:
        """Give the Lease up (a shard handed to the replica that should hold it): stop acting
        first, then write it free, so the next holder need not wait for it to expire.

        As client-go releases: no holder, a one-second duration. A Lease another replica holds
        by now is left alone (the write carries the version read).
        """
        self._renewed_at = None
        lease = await self._read()
        if lease is None or (lease.spec.holder_identity or "") != self.identity:
            return
        body = {
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease.metadata.resource_version,
            },
            "spec": {
                "holderIdentity": None,
                "leaseDurationSeconds": 1,
                "renewTime": _micro_time(now),
                "leaseTransitions": lease.spec.lease_transitions or 0,
            },
        }
        try:
            await self.kube.call_lease(
                self.coord.replace_namespaced_lease, self.name, self.namespace, body
            )
        except KubeError as e:
            if e.status != 409:
                raise


MEMBER_LABEL = "connbudget.io/member"


class Membership:
    """The replicas alive now, each known by a member Lease it renews (sharding).

    A replica renews its own member Lease every attempt and lists the others'. As for the shard
    Leases, another replica is alive while its record (holder and ``renewTime``) has changed
    within its duration on *this* process's clock: no clock is compared across machines. A
    member Lease left by a replica that died is deleted by any other once it has been stale for
    ``PRUNE_AFTER`` durations; a replica that stops deletes its own.
    """

    PRUNE_AFTER = 20

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        identity: str,
        coord: kubernetes.client.CoordinationV1Api | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        duration: int = LEASE_SECONDS,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.identity = identity
        self.coord = coord or coordination(kube)
        self.monotonic = monotonic
        self.own = LeaseElector(
            kube,
            namespace=namespace,
            name=member_lease_name(identity),
            identity=identity,
            coord=self.coord,
            monotonic=monotonic,
            duration=duration,
        )
        self._seen: dict[str, tuple[_Record, float]] = {}  # lease name -> record, first seen

    async def live(self, now: float) -> set[str]:
        """Renew this replica's member Lease; return the identities alive (this one included)."""
        await self.own.try_acquire(now, labels={MEMBER_LABEL: "true"})
        leases = await self.kube.call_lease(
            self.coord.list_namespaced_lease,
            self.namespace,
            label_selector=f"{MEMBER_LABEL}=true",
        )
        alive = {self.identity}
        listed = set()
        for lease in leases.items:
            name = lease.metadata.name
            listed.add(name)
            record = _record_of(lease, self.own.duration)
            seen = self._seen.get(name)
            if seen is None or seen[0] != record:
                self._seen[name] = seen = (record, self.monotonic())
            stale = self.monotonic() - seen[1]
            if record.holder and stale < record.duration:
                alive.add(record.holder)
            elif stale >= self.PRUNE_AFTER * record.duration and record.holder != self.identity:
                await self._delete(name)
        for name in set(self._seen) - listed:
            del self._seen[name]
        return alive

    async def leave(self) -> None:
        """Delete this replica's member Lease (it stops)."""
        await self._delete(member_lease_name(self.identity))

    async def _delete(self, name: str) -> None:
        try:
            await self.kube.call_lease(self.coord.delete_namespaced_lease, name, self.namespace)
        except KubeError as e:
            if e.status != 404:
                raise


def member_lease_name(identity: str) -> str:
    """The member Lease of the replica ``identity`` (a DNS name: lower case, at most 253)."""
    return f"connbudget-member-{identity.lower()}"[:253]


def shard_lease_name(base: str, shard: int, shards: int) -> str:
    """The Lease of ``shard``: the operator's one Lease when there is a single shard."""
    return base if shards <= 1 else f"{base}-shard-{shard}"
