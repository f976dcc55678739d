"""Count connections against a budget, per scope, and summarise them per owning workload.

Pure: no I/O, no clock; all inputs are arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from connbudget.model.observations import PodInfo, PoolerClient, ServerSample
from connbudget.model.spec import BudgetSpec, LabelSelector, Scope
from connbudget.policy import evidence, forecast
from connbudget.policy.attribution import Attributed
from connbudget.policy.census import Census, OwnerCount, Totals, census_of
from connbudget.policy.evidence import OwnerEvidence
from connbudget.policy.occupancy import PerPodFigures

TOP_OWNERS = 10  # status.usage.byOwner keeps the ten biggest owners
# A server with no more free slots than this share of its usable ones (and at least
# NEAR_FULL_MIN_FREE) is nearly full: acted on at once, never held for a breach window.
NEAR_FULL_FREE_PERCENT = 5
NEAR_FULL_MIN_FREE = 2
# Usage forecast to reach the warning line within this many polls is pressure already.
PRESSURE_WITHIN_POLLS = 2


@dataclass(frozen=True, kw_only=True)
class OwnerUsage:
    owner: str  # Kind/name
    pods: int
    connections: int
    idle: int
    # abandoned connections and PgBouncer clients (evidence.count_abandoned_pooled)
    leaked: int
    pooled: int = 0  # clients this owner holds in PgBouncer (their server side is the pooler's)
    abandoned: int = 0  # its direct connections idle beyond abandon_after
    cls: str | None = None  # Leaking, Pooling or Steady (None: not governed, not judged)
    leak_rate: float = 0.0  # abandoned connections opened per second
    abandon_after: float | None = None  # idle seconds after which its connections are abandoned
    max_reuse_gap: float | None = None  # the longest idle gap seen before a connection's reuse
    per_pod: PerPodFigures | None = None  # connections per pod over the last hour (occupancy)


@dataclass(frozen=True, kw_only=True)
class Usage:
    connections: int  # counted against the budget, per scope
    budget: int
    warning_line: int  # connections at which the budget reports Warning
    server_max_connections: int
    reserved: int
    server_total: int  # every client backend on the server (but the probe's)
    # abandoned connections and PgBouncer clients of governed pods (see policy.evidence)
    leaked: int
    unattributed: int  # counted backends attributed to no pod
    by_owner: tuple[OwnerUsage, ...]
    by_state: Mapping[str, int] = field(default_factory=dict)  # counted backends, by state

    @property
    def percent(self) -> float:
        return 100.0 * self.connections / self.budget if self.budget else 0.0

    @property
    def usable_slots(self) -> int:
        """Slots a non-superuser can take: max_connections minus reserved ones."""
        return max(self.server_max_connections - self.reserved, 0)


@dataclass
class _OwnerTally:
    pods: set[str] = field(default_factory=set)
    connections: int = 0
    idle: int = 0
    leaked: int = 0
    pooled: int = 0
    pooled_leaked: int = 0


def _owner_usage(
    owner: str, t: _OwnerTally, ev: OwnerEvidence | None, per_pod: PerPodFigures | None
) -> OwnerUsage:
    return OwnerUsage(
        owner=owner,
        pods=len(t.pods),
        connections=t.connections,
        idle=t.idle,
        leaked=t.leaked + t.pooled_leaked,
        pooled=t.pooled,
        abandoned=t.leaked,
        cls=ev.cls.value if ev is not None else None,
        leak_rate=ev.leak_rate if ev is not None else 0.0,
        abandon_after=ev.abandon_after if ev is not None else None,
        max_reuse_gap=ev.max_gap if ev is not None else None,
        per_pod=per_pod,
    )


def is_governed(pod: PodInfo | None, selector: LabelSelector, namespace: str) -> bool:
    """Tell whether the budget may act on ``pod``: same namespace, matched by the selector."""
    return pod is not None and pod.namespace == namespace and selector.matches(pod.labels)


def _scope_totals(
    spec: BudgetSpec, sample: ServerSample, found: Census, governed: Sequence[str]
) -> Totals:
    """What the budget's scope counts: the whole server, its database, or its pods' backends.

    Scope Selected also counts, as unattributed, the backends no pod could be told from that its
    pods may hold (at a governed pod's shared address or its node's, or naming a governed pod
    from an address that cannot vouch for it: ``policy.attribution``). Left out, a workload
    sharing its address and sending no ``application_name`` would fill the database while its
    budget counted nothing; counted, the level and the pressure see it. Nothing acts on them:
    only attributed groups of governed pods are ever terminated.
    """
    scope = spec.budget.scope
    if scope is Scope.SERVER:
        return found.server
    if scope is Scope.DATABASE:
        return found.by_database.get(sample.database, Totals())
    by_state: dict[str, int] = {}
    unattributed = found.claimed_by(governed)
    for a in (*found.slice(governed), *unattributed):
        state = a.group.state or "unknown"
        by_state[state] = by_state.get(state, 0) + a.group.count
    return Totals(
        connections=sum(by_state.values()),
        unattributed=sum(a.group.count for a in unattributed),
        by_state=by_state,
    )


def compute_usage(
    *,
    spec: BudgetSpec,
    namespace: str,
    sample: ServerSample,
    attributed: Sequence[Attributed] = (),
    census: Census | None = None,
    governed: Sequence[str] | None = None,
    pooled: Mapping[str, Sequence[PoolerClient]] | None = None,
    pods: Mapping[str, PodInfo] | None = None,
    owners: Mapping[str, OwnerEvidence] | None = None,
    per_pod: Mapping[str, PerPodFigures] | None = None,
) -> Usage:
    """Count what the budget counts, and who holds it.

    ``census`` is the sample counted once for every budget (``attributed``, counted here, when
    none is given); ``governed`` names the budget's pods (found in the census when not given).
    ``pooled`` maps pod names to their PgBouncer clients, so a leak through the pooler shows up
    under the pod's own workload, not only under the pooler's. ``owners`` is the evidence of the
    governed owners: their abandoned connections are the leaked ones, and their class and leak
    rate go with them; ``per_pod`` gives their connections per pod (``policy.occupancy``). The
    work is the budget's own pods and owners, plus the census's biggest owners: not every backend
    of the server.
    """
    owners = owners or {}
    found = census if census is not None else census_of(attributed, namespace=namespace)
    if governed is None:
        governed = [
            name
            for name, groups in found.by_pod.items()
            if is_governed(groups[0].pod, spec.selector, namespace)
        ]
        # Governed pods whose only backends are ones no pod could be told from.
        governed += {
            c.name: None
            for groups in found.claimed.values()
            for a in groups
            for c in a.claimants
            if c.name not in found.by_pod and is_governed(c, spec.selector, namespace)
        }
    budget = spec.budget.resolve(
        server_max_connections=sample.max_connections, reserved=sample.reserved
    )
    counted = _scope_totals(spec, sample, found, governed)
    # The biggest owners on the server, and every owner this budget's evidence or pooler clients
    # concern: nobody else can make the top (a budget only adds to its own owners' figures).
    tallies: dict[str, _OwnerTally] = {}
    for oc in found.owners[:TOP_OWNERS]:
        tallies[oc.owner] = _tally_of(oc)
    for name, ev in owners.items():
        tally = tallies.get(name) or _tally_of(found.owner(name))
        tallies[name] = tally
        tally.leaked += ev.abandoned
    pooled_leaked = 0
    for pod_name, clients in (pooled or {}).items():
        pod = (pods or {}).get(pod_name)
        if pod is None:
            continue
        tally = tallies.get(pod.owner) or _tally_of(found.owner(pod.owner))
        tallies[pod.owner] = tally
        tally.pods.add(pod.name)
        tally.pooled += len(clients)
        # Never leaked by idle age alone (the rule plan's restarts follow too).
        if is_governed(pod, spec.selector, namespace):
            n = evidence.count_abandoned_pooled(clients, owners.get(pod.owner))
            tally.pooled_leaked += n
            pooled_leaked += n
    by_owner = sorted(
        (_owner_usage(k, t, owners.get(k), (per_pod or {}).get(k)) for k, t in tallies.items()),
        key=lambda u: (-u.leak_rate, -(u.connections + u.pooled), u.owner),
    )[:TOP_OWNERS]
    return Usage(
        connections=counted.connections,
        budget=budget,
        warning_line=warning_line(spec, budget),
        server_max_connections=sample.max_connections,
        reserved=sample.reserved,
        server_total=found.server.connections,
        leaked=sum(ev.abandoned for ev in owners.values()) + pooled_leaked,
        unattributed=counted.unattributed,
        by_owner=tuple(by_owner),
        by_state=counted.by_state,
    )


def nearly_full(*, usable_slots: int, server_total: int) -> bool:
    """Tell whether the server has (almost) no usable slot left for anyone."""
    free = usable_slots - server_total
    margin = max(NEAR_FULL_MIN_FREE, -(-usable_slots * NEAR_FULL_FREE_PERCENT // 100))
    return free <= margin


def warning_line(spec: BudgetSpec, budget: int) -> int:
    """The connections at which the budget reports Warning."""
    return max(budget * spec.budget.warning_percent // 100, 1)


def under_pressure(
    *,
    spec: BudgetSpec,
    sample: ServerSample,
    census: Census,
    governed: Sequence[str],
    history: Sequence[tuple[float, int]],
) -> bool:
    """``is_pressured`` for a sample and its census, before the usage is counted in full (the
    evidence needs to know, and the usage needs the evidence)."""
    budget = spec.budget.resolve(
        server_max_connections=sample.max_connections, reserved=sample.reserved
    )
    return is_pressured(
        connections=_scope_totals(spec, sample, census, governed).connections,
        warning_line=warning_line(spec, budget),
        usable_slots=max(sample.max_connections - sample.reserved, 0),
        server_total=census.server.connections,
        growth_rate=forecast.growth_rate(history),
        poll_seconds=float(spec.poll_seconds),
    )


def is_pressured(
    *,
    connections: int,
    warning_line: int,
    usable_slots: int,
    server_total: int,
    growth_rate: float | None,
    poll_seconds: float,
) -> bool:
    """Whether a budget is under pressure: usage at the warning line, the server nearly full, or
    the recent growth reaching the warning line within ``PRESSURE_WITHIN_POLLS`` polls.

    Pressure is what lets the evidence name a leak on less evidence, and what lets terminations
    reach beyond a proven, sustained leak (``policy.evidence``, ``policy.plan``): without it
    nothing but a sustained leak's abandoned connections is ever terminated.
    """
    if connections >= warning_line:
        return True
    if nearly_full(usable_slots=usable_slots, server_total=server_total):
        return True
    return (
        growth_rate is not None
        and connections + growth_rate * PRESSURE_WITHIN_POLLS * poll_seconds >= warning_line
    )


def _tally_of(oc: OwnerCount | None) -> _OwnerTally:
    if oc is None:
        return _OwnerTally()
    return _OwnerTally(pods=set(oc.pods), connections=oc.connections, idle=oc.idle)
