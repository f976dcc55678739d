"""A sample counted once for every budget (policy.census) counts what each budget counted alone.

The oracle is the plain way: every group of the sample, budget by budget, sorted whole. The
census reads a budget's slice and the server's biggest owners instead; for any fleet of pods,
owners, states, databases and evidence, the usage must be the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from connbudget.cycle import Censuses
from connbudget.model.observations import BackendGroup, PodInfo, ServerSample
from connbudget.model.spec import AttributionMode, BudgetSpec, Scope
from connbudget.policy import attribution, census, usage
from connbudget.policy.attribution import Attributed, PodIndex, Via
from connbudget.policy.evidence import OwnerEvidence
from unit.builders import NOW, NS, leaking, pod, pooling, spec

STATES = ("idle", "active", "idle in transaction", None)


def naive_usage(
    s: BudgetSpec,
    smp: ServerSample,
    attributed: Sequence[Attributed],
    owners: Mapping[str, OwnerEvidence],
) -> tuple[int, int, int, int, list[tuple[str, int, int, int, int]], dict[str, int]]:
    """What the budget counts, computed from every group (no pooler clients here)."""

    def counts(a: Attributed) -> bool:
        if s.budget.scope is Scope.SERVER:
            return True
        if s.budget.scope is Scope.DATABASE:
            return a.group.database == smp.database
        if a.via is Via.POOLER:
            return False
        if a.pod is None:  # no pod could be told: counted if a governed pod may hold it
            return any(usage.is_governed(c, s.selector, NS) for c in a.claimants)
        return usage.is_governed(a.pod, s.selector, NS)

    counted = [a for a in attributed if counts(a)]
    tallies: dict[str, list[int]] = {}
    pods: dict[str, set[str]] = {}
    for a in attributed:
        if a.pod is None:
            continue
        key = a.pod.owner if a.pod.namespace == NS else f"{a.pod.namespace}/{a.pod.owner}"
        t = tallies.setdefault(key, [0, 0, 0])
        pods.setdefault(key, set()).add(a.pod.name)
        t[0] += a.group.count
        t[1] += a.group.count if a.group.state == "idle" else 0
    for name, ev in owners.items():
        tallies.setdefault(name, [0, 0, 0])[2] += ev.abandoned
    rows = sorted(
        (
            (-(owners[k].leak_rate if k in owners else 0.0), -t[0], k, len(pods.get(k, ())), t)
            for k, t in tallies.items()
        ),
    )[: usage.TOP_OWNERS]
    by_state: dict[str, int] = {}
    for a in counted:
        by_state[a.group.state or "unknown"] = by_state.get(a.group.state or "unknown", 0) + (
            a.group.count
        )
    return (
        sum(a.group.count for a in counted),
        sum(a.group.count for a in attributed),
        sum(a.group.count for a in counted if a.pod is None),
        sum(ev.abandoned for ev in owners.values()),
        [(k, n, t[0], t[1], t[2]) for _, _, k, n, t in rows],
        by_state,
    )


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[PodInfo], ServerSample, dict[str, OwnerEvidence]]:
    n_pods = draw(st.integers(0, 25))
    pods = [
        pod(
            f"p{i}",
            f"10.0.0.{draw(st.sampled_from([i, i, 99]))}",  # .99: shared (hostNetwork)
            app=draw(st.sampled_from(["web", "api"])),
            owner=f"o{draw(st.integers(0, 14))}",
            namespace=draw(st.sampled_from([NS, NS, "other"])),
        )
        for i in range(n_pods)
    ]
    groups = []
    for i in range(draw(st.integers(0, 40))):
        addr = draw(st.sampled_from([f"10.0.0.{j}" for j in [*range(30), 99]] + [None]))
        groups.append(
            BackendGroup(
                database=draw(st.sampled_from(["app", "other"])),
                user="app",
                application_name=f"p{draw(st.integers(0, 30))}",
                client_addr=addr,
                state=draw(st.sampled_from(STATES)),
                count=draw(st.integers(1, 9)),
                max_idle_seconds=0.0,
                oldest_backend_start=NOW - 10,
                backends=(),
            )
        )
        del i
    smp = ServerSample(
        sampled_at=NOW, database="app", max_connections=200, reserved=3, groups=tuple(groups)
    )
    owners: dict[str, OwnerEvidence] = {}
    for k in draw(st.sets(st.integers(0, 16), max_size=4)):
        ev = (
            leaking(f"Deployment/o{k}", rate=draw(st.floats(0.1, 5.0)))
            if draw(st.booleans())
            else pooling(f"Deployment/o{k}")
        )
        owners[ev.owner] = ev
    return pods, smp, owners


@settings(max_examples=300, deadline=None)
@given(fleet=fleets(), scope=st.sampled_from(list(Scope)))
def test_the_census_counts_what_every_group_counted(
    fleet: tuple[list[PodInfo], ServerSample, dict[str, OwnerEvidence]], scope: Scope
) -> None:
    pods, smp, owners = fleet
    s = spec(budget__scope=scope.value)
    index = PodIndex.build(pods, namespace=NS)
    attributed = attribution.attribute_backends(
        groups=smp.groups, index=index, mode=AttributionMode.AUTO
    )
    counted = census.take_census(sample=smp, index=index, mode=AttributionMode.AUTO)
    governed = [p.name for p in pods if usage.is_governed(p, s.selector, NS)]
    u = usage.compute_usage(
        spec=s, namespace=NS, sample=smp, census=counted, governed=governed, owners=owners
    )
    connections, total, unattributed, leaked, by_owner, by_state = naive_usage(
        s, smp, attributed, owners
    )
    assert (u.connections, u.server_total, u.unattributed, u.leaked) == (
        connections,
        total,
        unattributed,
        leaked,
    )
    assert [(o.owner, o.pods, o.connections, o.idle, o.abandoned) for o in u.by_owner] == by_owner
    assert dict(u.by_state) == by_state
    # The budget's slice is its governed pods' direct groups, and nothing else.
    assert sorted(id(a) for a in counted.slice(governed)) == sorted(
        id(a)
        for a in counted.attributed
        if a.via is not Via.POOLER
        and a.pod is not None
        and a.pod.name in governed
        and a.pod.namespace == NS
    )


def test_budgets_sharing_a_sample_and_pods_share_one_census() -> None:
    web = pod("web-1", "10.0.0.1")
    smp = ServerSample(sampled_at=NOW, database="app", max_connections=100, reserved=3, groups=())
    index = PodIndex.build([web], namespace=NS)
    clock = [0.0]
    taken = Censuses(keep_seconds=2.0, monotonic=lambda: clock[0])
    first = taken.take(sample=smp, index=index, mode=AttributionMode.AUTO)
    clock[0] = 1.0
    assert taken.take(sample=smp, index=index, mode=AttributionMode.AUTO) is first
    # Another mode, other pods or another sample: another census.
    assert taken.take(sample=smp, index=index, mode=AttributionMode.CLIENT_ADDR) is not first
    other = PodIndex.build([web], namespace=NS)
    assert taken.take(sample=smp, index=other, mode=AttributionMode.AUTO) is not first
    assert len(taken) == 3
    # Kept only a moment: a census (and the sample it holds) is dropped once nobody will ask.
    clock[0] = 10.0
    assert taken.take(sample=smp, index=index, mode=AttributionMode.AUTO) is not first
    assert len(taken) == 1
