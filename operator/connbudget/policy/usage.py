"""Count connections against a budget, per scope, and summarise them per owning workload.

Pure: no I/O, no clock; all inputs are arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from connbudget.model.observations import PodInfo, PoolerClient, ServerSample
from connbudget.model.spec import BudgetSpec, LabelSelector, Scope
from connbudget.policy.attribution import Attributed, Via

TOP_OWNERS = 10  # status.usage.byOwner keeps the ten biggest owners


@dataclass(frozen=True, kw_only=True)
class OwnerUsage:
    owner: str  # Kind/name
    pods: int
    connections: int
    idle: int
    leaked: int
    pooled: int = 0  # clients this owner holds in PgBouncer (their server side is the pooler's)


@dataclass(frozen=True, kw_only=True)
class Usage:
    connections: int  # counted against the budget, per scope
    budget: int
    warning_line: int  # connections at which the budget reports Warning
    server_max_connections: int
    reserved: int
    server_total: int  # every client backend on the server (but the probe's)
    leaked: int  # idle backends of governed pods idle longer than leakDetection.idleSeconds
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
) -> Usage:
    """Count what the budget counts, and who holds it.

    ``pooled`` maps pod names to their PgBouncer clients, so a leak through the pooler shows up
    under the pod's own workload, not only under the pooler's.
    """
    budget = spec.budget.resolve(
        server_max_connections=sample.max_connections, reserved=sample.reserved
    )
    counted = [a for a in attributed if _counts_in_scope(a, spec, sample, namespace)]
    leak_after = spec.leak_idle_seconds
    leaked = sum(
        sum(1 for _, idle_s, _ in a.group.idle if idle_s > leak_after)
        for a in attributed
        if a.via is not Via.POOLER and is_governed(a.pod, spec.selector, namespace)
    )
    owners: dict[str, _OwnerTally] = {}
    for a in attributed:
        if a.pod is None:
            continue
        tally = owners.setdefault(a.pod.owner, _OwnerTally())
        tally.pods.add(a.pod.name)
        tally.connections += a.group.count
        if a.group.state == "idle":
            tally.idle += a.group.count
            tally.leaked += sum(1 for _, s, _ in a.group.idle if s > leak_after)
    for pod_name, clients in (pooled or {}).items():
        pod = (pods or {}).get(pod_name)
        if pod is None:
            continue
        tally = owners.setdefault(pod.owner, _OwnerTally())
        tally.pods.add(pod.name)
        tally.pooled += len(clients)
        tally.leaked += sum(1 for c in clients if c.idle_seconds > leak_after)
    by_owner = sorted(
        (
            OwnerUsage(
                owner=k,
                pods=len(t.pods),
                connections=t.connections,
                idle=t.idle,
                leaked=t.leaked,
                pooled=t.pooled,
            )
            for k, t in owners.items()
        ),
        key=lambda u: (-(u.connections + u.pooled), u.owner),
    )[:TOP_OWNERS]
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
