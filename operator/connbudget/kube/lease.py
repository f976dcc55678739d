"""Leader election with a coordination.k8s.io/v1 Lease, so that of several replicas one acts.

Follows client-go's leader election (``tools/leaderelection``):

- **No clock is compared across machines.** Whether another replica's Lease has expired is told
  by how long *this* process has seen the same record (holder and ``renewTime``) unchanged: at
  least ``leaseDurationSeconds`` on this process's monotonic clock. A replica whose clock is ahead
  or behind neither steals a live Lease nor waits forever for a dead one.
- **A renew deadline shorter than the Lease.** The holder keeps leading only while its last
  successful renewal is younger than ``RENEW_DEADLINE_SECONDS`` (10 s of a 15 s Lease): past it
  the replica stops acting at once, terminations included, well before another may take over.
  Every API call has its own timeout (``kube.api``), so a hung renewal is a failed one.
- **Races lose cleanly.** Updates carry the resourceVersion they read: two replicas racing for an
  expired Lease cannot both win (the API server refuses the second with a conflict).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import kubernetes

from connbudget.kube.api import Kube, KubeError

log = logging.getLogger("connbudget.lease")
LEASE_SECONDS = 15  # a dead leader's budgets wait at most about this long for a new one
RENEW_DEADLINE_SECONDS = 10.0  # the holder stops acting when it has not renewed for this long
RETRY_SECONDS = 2.0  # how often every replica tries to take or renew the Lease


def _micro_time(t: float) -> str:
    """A Lease's ``MicroTime`` as the API server expects it."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: object) -> float | None:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return None


@dataclass(frozen=True)
class _Record:
    """What identifies one renewal of a Lease: its holder and its renewTime, as written."""

    holder: str
    renew_time: str
    duration: float


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
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.coord = coord or kubernetes.client.CoordinationV1Api(kube.api)
        self.monotonic = monotonic
        self._observed: _Record | None = None
        self._observed_at = 0.0  # when (monotonic) this process first saw that record
        self._renewed_at: float | None = None  # when (monotonic) this replica last renewed

    def may_act(self) -> bool:
        """Whether this replica holds the Lease for sure: renewed within the renew deadline."""
        return (
            self._renewed_at is not None
            and self.monotonic() - self._renewed_at < RENEW_DEADLINE_SECONDS
        )

    def _observe(self, record: _Record) -> None:
        if record != self._observed:
            self._observed = record
            self._observed_at = self.monotonic()

    def _expired(self) -> bool:
        """Whether the record seen has stayed unchanged a whole Lease duration, by this clock."""
        record = self._observed
        return record is not None and self.monotonic() - self._observed_at >= record.duration

    async def try_acquire(self, now: float) -> bool:
        """Take or renew the Lease; return whether this replica holds it now.

        ``now`` is only written into the Lease (``renewTime``, for people and tools to read);
        no decision compares it with another replica's clock.
        """
        started = self.monotonic()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": _micro_time(now),
        }
        try:
            lease = await self.kube.call(
                self.coord.read_namespaced_lease, self.name, self.namespace
            )
        except KubeError as e:
            if e.status != 404:
                raise
            body = {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": spec["renewTime"], "leaseTransitions": 0},
            }
            try:
                await self.kube.call(self.coord.create_namespaced_lease, self.namespace, body)
            except KubeError as err:
                if err.status == 409:
                    return False
                raise
            self._renewed_at = started
            return True
        holder = lease.spec.holder_identity or ""
        self._observe(
            _Record(
                holder=holder,
                renew_time=str(lease.spec.renew_time),
                duration=float(lease.spec.lease_duration_seconds or LEASE_SECONDS),
            )
        )
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
            acquired = _parse(lease.spec.acquire_time)
            if acquired is not None:
                new_spec["acquireTime"] = _micro_time(acquired)
        body = {
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease.metadata.resource_version,
            },
            "spec": new_spec,
        }
        try:
            await self.kube.call(
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
