"""PgBouncer clients are judged by evidence as direct backends are, never leaked by age alone.

Measured before (simulated with the operator's own code): a healthy app reaching the database
only through PgBouncer, whose clients sit idle 20 s, had a pod evicted (``PooledClients``) in a
breach another workload caused, every cooldown.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from connbudget.model.observations import PoolerClient
from connbudget.policy import plan, usage
from connbudget.policy.evidence import (
    Evidence,
    OwnerClass,
    OwnerEvidence,
    count_abandoned_pooled,
    seen_pooled,
)
from unit.builders import NOW, NS, leaking, pod, pooling, sample, spec

WEB1 = pod("web-1", "10.0.0.1")
PODS = {WEB1.name: WEB1}


def client(port: int, *, connected: float, last_request: float, at: float) -> PoolerClient:
    return PoolerClient(
        addr="10.0.0.1",
        user="app",
        database="app",
        state="active",
        idle_seconds=max(at - last_request, 0.0),
        connected_at=connected,
        port=port,
    )


def judge_every_second(
    clients_at: list[list[PoolerClient]], *, pressure: bool
) -> list[dict[str, OwnerClass]]:
    ev = Evidence()
    out = []
    for i, clients in enumerate(clients_at):
        at = NOW + i
        seen = seen_pooled(
            clients={"web-1": clients}, pods=PODS, sampled_at=at, governed=frozenset({"web-1"})
        )
        ev.observe(at=at, seen=seen, floor=3.0)
        out.append(
            {
                o: e.cls
                for o, e in ev.judge(at=at, floor=3.0, idle_seconds=300, pressure=pressure).items()
            }
        )
    return out


def test_pooled_clients_reused_every_20_s_are_a_pool_never_a_leak() -> None:
    timeline = []
    for i in range(120):
        at = NOW + i
        timeline.append(
            [
                client(
                    40_000 + k, connected=NOW, last_request=NOW + 20 * ((i - k) // 20) + k, at=at
                )
                for k in range(8)
            ]
        )
    classes = judge_every_second(timeline, pressure=True)
    assert all(c.get("Deployment/web") is not OwnerClass.LEAKING for c in classes)
    assert classes[-1]["Deployment/web"] is OwnerClass.POOLING


def test_a_leak_through_pgbouncer_is_told_by_its_arrivals() -> None:
    timeline = []
    for i in range(30):
        at = NOW + i
        # A new client every second, one request, never used again.
        timeline.append(
            [
                client(50_000 + k, connected=NOW + k, last_request=NOW + k, at=at)
                for k in range(i + 1)
            ]
        )
    classes = judge_every_second(timeline, pressure=True)
    assert classes[-1]["Deployment/web"] is OwnerClass.LEAKING


def test_pooled_clients_of_an_owner_not_leaking_are_never_counted_leaked() -> None:
    s = spec()
    idle = [
        client(60_000 + k, connected=NOW - 600, last_request=NOW - 400, at=NOW) for k in range(5)
    ]
    for owner, leaked in ((pooling("Deployment/web"), 0), (leaking(), 5)):
        u = usage.compute_usage(
            spec=s,
            namespace=NS,
            sample=sample([]),
            pooled={"web-1": idle},
            pods=PODS,
            owners={owner.owner: owner},
        )
        assert u.leaked == leaked + owner.abandoned


@pytest.mark.parametrize(
    "owner",
    [
        pytest.param(leaking(after=3.0), id="leaking"),
        # A pool whose abandon age the clients are past: counted leaked by the budget once
        # (usage.py), while plan.py would never restart a pod for them.
        pytest.param(replace(pooling("Deployment/web"), abandon_after=3.0), id="pooling"),
        pytest.param(replace(leaking(after=3.0), cls=OwnerClass.STEADY), id="steady"),
    ],
)
def test_the_budgets_count_and_the_restarts_follow_one_rule_for_pooled_clients(
    owner: OwnerEvidence,
) -> None:
    idle = [
        client(61_000 + k, connected=NOW - 600, last_request=NOW - age, at=NOW)
        for k, age in enumerate((0.0, 2.0, 3.0, 10.0, 400.0))
    ]
    u = usage.compute_usage(
        spec=spec(),
        namespace=NS,
        sample=sample([]),
        pooled={"web-1": idle},
        pods=PODS,
        owners={owner.owner: owner},
    )
    (web,) = (o for o in u.by_owner if o.owner == owner.owner)
    counted = web.leaked - web.abandoned
    # The pods plan.py would restart for their pooled clients, and how many each holds.
    offenders = plan._pooled_offenders(
        pods=[WEB1], pooler_clients={"web-1": idle}, owners={owner.owner: owner}
    )
    assert counted == sum(offenders.values())
    assert counted == (3 if owner.cls is OwnerClass.LEAKING else 0)


def test_a_client_waiting_for_a_server_is_never_abandoned() -> None:
    # Both clients' last request is older than the leaking owner's abandon age; one of them has
    # sent a request since and waits for a server (the pool is full): it is in use.
    waiting = [
        replace(client(62_000 + k, connected=NOW - 600, last_request=NOW - 10, at=NOW), state=st)
        for k, st in enumerate(("waiting", "active"))
    ]
    owner = leaking(after=3.0)
    assert count_abandoned_pooled(waiting, owner) == 1
    u = usage.compute_usage(
        spec=spec(),
        namespace=NS,
        sample=sample([]),
        pooled={"web-1": waiting},
        pods=PODS,
        owners={owner.owner: owner},
    )
    assert u.leaked == 1 + owner.abandoned
