"""Leader election with a coordination.k8s.io/v1 Lease, so that of several replicas one acts.

The holder renews the Lease every third of its duration; another replica takes it over only after
it has expired. Updates carry the resourceVersion they read, so two replicas racing for an expired
Lease cannot both win (the API server refuses the second with a conflict).
"""

from __future__ import annotations

import datetime as dt
import logging

import kubernetes

from connbudget.kube.api import Kube, KubeError

log = logging.getLogger("connbudget.lease")
LEASE_SECONDS = 15  # a dead leader's budgets wait at most this long for a new one


def _micro_time(t: float) -> str:
    """A Lease's ``MicroTime`` as the API server expects it."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: object) -> float | None:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return None


class LeaseElector:
    def __init__(self, kube: Kube, *, namespace: str, name: str, identity: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.coord = kubernetes.client.CoordinationV1Api(kube.api)

    async def try_acquire(self, now: float) -> bool:
        """Take or renew the Lease; return whether this replica holds it now."""
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
            return True
        holder = lease.spec.holder_identity
        renewed = _parse(lease.spec.renew_time) or 0.0
        duration = lease.spec.lease_duration_seconds or LEASE_SECONDS
        if holder not in (self.identity, None, "") and now < renewed + duration:
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
        return True
