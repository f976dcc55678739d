"""Count connections against a budget, per scope, and summarise them per owning workload.

Pure: no I/O, no clock; all inputs are arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from connbudget.model.observations import PodInfo, PoolerClient, ServerSample
from connbudget.model.spec import BudgetSpec, LabelSelector, Scope
from connbudget.policy.attribution import Attributed, Via
from connbudget.policy.evidence import OwnerEvidence, abandon_after

TOP_OWNERS = 10  # status.usage.byOwner keeps the ten biggest owners


@dataclass(frozen=True, kw_only=True)
class OwnerUsage:
    owner: str  # Kind/name
    pods: int
    connections: int
    idle: int
    leaked: int  # abandoned connections (policy.evidence) and PgBouncer clients idle as long
    pooled: int = 0  # clients this owner holds in PgBouncer (their server side is the pooler's)
    abandoned: int = 0  # its direct connections idle beyond abandon_after
    cls: str | None = None  # Leaking, Pooling or Steady (None: not governed, not judged)
    leak_rate: float = 0.0  # abandoned connections opened per second
    abandon_after: float | None = None  # idle seconds after which its connections are abandoned
    max_reuse_gap: float | None = None  # the longest idle gap seen before a connection's reuse


@dataclass(frozen=True, kw_only=True)
class Usage:
    connections: int  # counted against the budget, per scope
    budget: int
    warning_line: int  # connections at which the budget reports Warning
    server_max_connections: int
    reserved: int
    server_total: int  # every client backend on the server (but the probe's)
    leaked: int  # abandoned connections of governed pods (see policy.evidence)
    unattributed: int  # counted backends attributed to no pod
    by_owner: tuple[OwnerUsage, ...]

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


def _owner_usage(owner: str, t: _OwnerTally, ev: OwnerEvidence | None) -> OwnerUsage:
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
    )


def is_governed(pod: PodInfo | None, selector: LabelSelector, namespace: str) -> bool:
    """Tell whether the budget may act on ``pod``: same namespace, matched by the selector."""
    return pod is not None and pod.namespace == namespace and selector.matches(pod.labels)


def _counts_in_scope(a: Attributed, spec: BudgetSpec, sample: ServerSample, namespace: str) -> bool:
    scope = spec.budget.scope
    if scope is Scope.SERVER:
        return True
    if scope is Scope.DATABASE:
        return a.group.database == sample.database
    return a.via is not Via.POOLER and is_governed(a.pod, spec.selector, namespace)


def compute_usage(
    *,
    spec: BudgetSpec,
    namespace: str,
    sample: ServerSample,
    attributed: Sequence[Attributed],
    pooled: Mapping[str, Sequence[PoolerClient]] | None = None,
    pods: Mapping[str, PodInfo] | None = None,
    owners: Mapping[str, OwnerEvidence] | None = None,
) -> Usage:
    """Count what the budget counts, and who holds it.

    ``pooled`` maps pod names to their PgBouncer clients, so a leak through the pooler shows up
    under the pod's own workload, not only under the pooler's. ``owners`` is the evidence of the
    governed owners: their abandoned connections are the leaked ones, and their class and leak
    rate go with them.
    """
    owners = owners or {}
    floor = float(spec.remediation.terminate_idle.min_idle_seconds)
    budget = spec.budget.resolve(
        server_max_connections=sample.max_connections, reserved=sample.reserved
    )
    counted = [a for a in attributed if _counts_in_scope(a, spec, sample, namespace)]
    tallies: dict[str, _OwnerTally] = {}
    for a in attributed:
        if a.pod is None:
            continue
        # A workload of another namespace is named with it: Deployment/web here is not there.
        key = a.pod.owner if a.pod.namespace == namespace else f"{a.pod.namespace}/{a.pod.owner}"
        tally = tallies.setdefault(key, _OwnerTally())
        tally.pods.add(a.pod.name)
        tally.connections += a.group.count
        if a.group.state == "idle":
            tally.idle += a.group.count
    for name, ev in owners.items():
        tallies.setdefault(name, _OwnerTally()).leaked += ev.abandoned
    for pod_name, clients in (pooled or {}).items():
        pod = (pods or {}).get(pod_name)
        if pod is None:
            continue
        tally = tallies.setdefault(pod.owner, _OwnerTally())
        tally.pods.add(pod.name)
        tally.pooled += len(clients)
        judged = owners.get(pod.owner)
        after = judged.abandon_after if judged is not None else abandon_after(None, floor=floor)
        if is_governed(pod, spec.selector, namespace):
            tally.pooled_leaked += sum(1 for c in clients if c.idle_seconds >= after)
    by_owner = sorted(
        (_owner_usage(k, t, owners.get(k)) for k, t in tallies.items()),
        key=lambda u: (-u.leak_rate, -(u.connections + u.pooled), u.owner),
    )[:TOP_OWNERS]
    leaked = sum(ev.abandoned for ev in owners.values()) + sum(
        t.pooled_leaked for t in tallies.values()
    )
    return Usage(
        connections=sum(a.group.count for a in counted),
        budget=budget,
        warning_line=max(budget * spec.budget.warning_percent // 100, 1),
        server_max_connections=sample.max_connections,
        reserved=sample.reserved,
        server_total=sum(a.group.count for a in attributed),
        leaked=leaked,
        unattributed=sum(a.group.count for a in counted if a.pod is None),
        by_owner=tuple(by_owner),
    )
