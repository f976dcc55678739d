"""Leader election as client-go does it: no clock compared across machines, a renew deadline."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from connbudget.kube.api import KubeError
from connbudget.kube.lease import LEASE_SECONDS, RENEW_DEADLINE_SECONDS, LeaseElector


def stored_lease(body: dict[str, Any], version: int) -> Any:
    """A Lease as the API server returns it after storing ``body`` (the client's object)."""
    spec, meta = body["spec"], body["metadata"]

    def t(key: str) -> dt.datetime | None:
        v = spec.get(key)
        return (
            dt.datetime.strptime(v, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC) if v else None
        )

    return SimpleNamespace(
        metadata=SimpleNamespace(
            name=meta.get("name"),
            resource_version=str(version),
            labels=dict(meta.get("labels") or {}),
        ),
        spec=SimpleNamespace(
            holder_identity=spec.get("holderIdentity"),
            renew_time=t("renewTime"),
            acquire_time=t("acquireTime"),
            lease_duration_seconds=spec.get("leaseDurationSeconds"),
            lease_transitions=spec.get("leaseTransitions"),
        ),
    )


class FakeCoord:
    """One Lease in memory, with optimistic concurrency like the API server's."""

    def __init__(self) -> None:
        self.lease: Any = None
        self.version = 0
        self.hang = False

    def _stored(self, body: dict[str, Any]) -> Any:
        self.version += 1
        return stored_lease(body, self.version)

    def read_namespaced_lease(self, name: str, namespace: str) -> Any:
        if self.hang:
            raise KubeError(504, "no answer from the API server in time")
        if self.lease is None:
            raise KubeError(404, "not found")
        return self.lease

    def create_namespaced_lease(self, namespace: str, body: dict[str, Any]) -> Any:
        if self.lease is not None:
            raise KubeError(409, "exists")
        self.lease = self._stored(body)
        return self.lease

    def replace_namespaced_lease(self, name: str, namespace: str, body: dict[str, Any]) -> Any:
        if body["metadata"]["resourceVersion"] != self.lease.metadata.resource_version:
            raise KubeError(409, "conflict")
        self.lease = self._stored(body)
        return self.lease


class CallingKube:
    async def call_lease(self, fn: Callable[..., Any], *args: object, **kwargs: object) -> Any:
        return fn(*args)


def elector(coord: FakeCoord, identity: str, clock: list[float]) -> LeaseElector:
    return LeaseElector(
        CallingKube(),  # type: ignore[arg-type]
        namespace="ops",
        name="lease",
        identity=identity,
        coord=coord,
        monotonic=lambda: clock[0],
    )


def acquire(e: LeaseElector, wall: float) -> bool:
    return asyncio.run(e.try_acquire(wall))


@pytest.mark.parametrize("skew", [-3600.0, 0.0, 3600.0], ids=["behind", "same", "ahead"])
def test_expiry_is_judged_by_this_replicas_own_clock_whatever_the_others_say(skew: float) -> None:
    coord = FakeCoord()
    a_clock, b_clock = [0.0], [0.0]
    a, b = elector(coord, "a", a_clock), elector(coord, "b", b_clock)
    assert acquire(a, 1_000_000.0)
    # b's wall clock is an hour off: it must neither steal a live Lease nor wait forever.
    assert not acquire(b, 1_000_000.0 + skew)
    b_clock[0] = LEASE_SECONDS - 1
    assert not acquire(b, 1_000_000.0 + skew + LEASE_SECONDS - 1)
    a_clock[0] = 5.0
    assert acquire(a, 1_000_005.0)  # a renews: a new record, b starts counting again
    b_clock[0] = LEASE_SECONDS + 1
    assert not acquire(b, 1_000_000.0 + skew + LEASE_SECONDS + 1)
    # a dies: after a whole Lease of an unchanged record on b's own clock, b takes over.
    b_clock[0] = 2 * LEASE_SECONDS + 2
    assert acquire(b, 1_000_000.0 + skew + 2 * LEASE_SECONDS + 2)
    assert coord.lease.spec.holder_identity == "b"
    assert coord.lease.spec.lease_transitions == 1


def test_a_holder_whose_renewal_hangs_stops_acting_at_its_renew_deadline() -> None:
    coord = FakeCoord()
    clock = [0.0]
    a = elector(coord, "a", clock)
    assert acquire(a, 1_000_000.0)
    assert a.may_act()
    coord.hang = True
    clock[0] = 3.0
    with pytest.raises(KubeError):
        acquire(a, 1_000_003.0)
    assert a.may_act()  # renewed 3 s ago: within the deadline
    clock[0] = RENEW_DEADLINE_SECONDS + 0.1
    assert not a.may_act()  # nothing is done any more, terminations included
    assert RENEW_DEADLINE_SECONDS < LEASE_SECONDS  # before anyone else may take over


def test_an_action_is_skipped_when_leadership_is_uncertain() -> None:
    import dataclasses

    from unit import test_cycle as tc

    kube, monitor = tc.FakeKube(), tc.FakeMonitor(tc.leaking())
    deps, _ = tc.make_deps(kube, monitor, [tc.WEB1, tc.WEB2])
    deps = dataclasses.replace(deps, may_act=lambda: False)
    tc.run_cycle(deps, old_status=tc.OVER_STATUS)
    assert monitor.terminated == []
    assert kube.calls == []
