"""Builders of policy inputs for unit tests: pods, backend groups, samples, specs."""

from __future__ import annotations

from typing import Any

from connbudget.model.observations import BackendGroup, PodInfo, ServerSample
from connbudget.model.spec import BudgetSpec, parse_spec
from connbudget.policy import attribution, usage
from connbudget.policy.attribution import PodIndex
from connbudget.policy.evidence import POOL_GAP_FACTOR, OwnerClass, OwnerEvidence
from connbudget.policy.plan import Decision, Memory, decide

NS = "shop"
NOW = 1_800_000_000.0


def spec(**overrides: Any) -> BudgetSpec:
    raw: dict[str, Any] = {
        "database": {"secretRef": {"name": "pg"}},
        "budget": {"maxConnections": 80},
        "selector": {"matchLabels": {"app": "web"}},
    }
    for path, value in overrides.items():
        node = raw
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return parse_spec(raw)


def pod(
    name: str,
    ip: str,
    *,
    app: str = "web",
    age: float = 3600.0,
    owner: str = "web",
    terminating: bool = False,
    namespace: str = NS,
) -> PodInfo:
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=f"uid-{name}",
        ip=ip,
        labels={"app": app},
        owner_kind="Deployment",
        owner_name=owner,
        started_at=NOW - age,
        created_at=NOW - age,
        terminating=terminating,
    )


def idle_group(
    p: PodInfo, idles: list[float], *, database: str = "app", start_age: float = 600.0
) -> BackendGroup:
    """A group of idle backends of pod ``p`` with the given idle seconds."""
    pid0 = abs(hash(p.name)) % 10_000 * 100
    return BackendGroup(
        database=database,
        user="app",
        application_name=p.name,
        client_addr=p.ip,
        state="idle",
        count=len(idles),
        max_idle_seconds=max(idles, default=0.0),
        oldest_backend_start=NOW - start_age,
        backends=tuple(
            sorted(
                ((pid0 + i, s, NOW - start_age) for i, s in enumerate(idles)), key=lambda t: -t[1]
            )
        ),
    )


def leak_group(
    p: PodInfo, n: int, *, state: str = "idle", newest: float = 5.0, every: float = 0.5
) -> BackendGroup:
    """``n`` backends of pod ``p`` opened one every ``every`` seconds up to ``newest`` seconds
    ago, each used once and left in ``state`` since: a leak, as a single poll sees it."""
    pid0 = abs(hash((p.name, state))) % 10_000 * 100
    starts = [NOW - newest - i * every for i in range(n)]
    return BackendGroup(
        database="app",
        user="app",
        application_name=p.name,
        client_addr=p.ip,
        state=state,
        count=n,
        max_idle_seconds=NOW - min(starts) - 0.05 if state == "idle" else 0.0,
        oldest_backend_start=min(starts),
        backends=tuple((pid0 + i, NOW - t - 0.05, t) for i, t in enumerate(starts)),
    )


def active_group(
    p: PodInfo, n: int, *, state: str = "active", in_state: float = 0.5
) -> BackendGroup:
    """``n`` backends of pod ``p`` in ``state`` for ``in_state`` seconds."""
    pid0 = abs(hash(p.name)) % 10_000 * 100 + 50
    return BackendGroup(
        database="app",
        user="app",
        application_name=p.name,
        client_addr=p.ip,
        state=state,
        count=n,
        max_idle_seconds=0.0,
        oldest_backend_start=NOW - 600,
        backends=tuple((pid0 + i, in_state, NOW - 600) for i in range(n)),
    )


def sample(
    groups: list[BackendGroup], *, max_connections: int = 100, reserved: int = 3
) -> ServerSample:
    return ServerSample(
        sampled_at=NOW,
        database="app",
        max_connections=max_connections,
        reserved=reserved,
        groups=tuple(groups),
    )


def leaking(
    owner: str = "Deployment/web",
    *,
    abandoned: dict[str, int] | None = None,
    in_transaction: dict[str, int] | None = None,
    after: float = 3.0,
    rate: float = 5.0,
    sustained: bool = True,
) -> OwnerEvidence:
    """The evidence of a leaking owner, its abandoned connections per pod (``sustained``: on
    the evidence a calm budget asks for, else named under pressure only)."""
    by_pod = dict(abandoned or {})
    for name, n in (in_transaction or {}).items():
        by_pod[name] = by_pod.get(name, 0) + n
    return OwnerEvidence(
        owner=owner,
        cls=OwnerClass.LEAKING,
        leak_rate=rate,
        abandoned=sum(by_pod.values()),
        abandoned_in_transaction=sum((in_transaction or {}).values()),
        abandon_after=after,
        terminate_after=after,
        max_gap=None,
        reuses=0,
        connections=sum(by_pod.values()),
        abandoned_by_pod=by_pod,
        in_transaction_by_pod=dict(in_transaction or {}),
        sustained=sustained,
    )


def pooling(owner: str, *, max_gap: float = 60.0, idle_seconds: int = 300) -> OwnerEvidence:
    """The evidence of a pooling owner whose connections wait up to ``max_gap`` for reuse."""
    return OwnerEvidence(
        owner=owner,
        cls=OwnerClass.POOLING,
        leak_rate=0.0,
        abandoned=0,
        abandoned_in_transaction=0,
        abandon_after=1.5 * max_gap + 1,
        terminate_after=max(float(idle_seconds), POOL_GAP_FACTOR * max_gap),
        max_gap=max_gap,
        reuses=10,
        connections=5,
    )


def run(
    s: BudgetSpec,
    pods: list[PodInfo],
    groups: list[BackendGroup],
    *,
    memory: Memory | None = None,
    now: float = NOW,
    paused: bool = False,
    history: list[tuple[float, int]] | None = None,
    owners: list[OwnerEvidence] | None = None,
    termination_possible: bool = True,
    blocked: str | None = None,
    fragile: frozenset[str] = frozenset(),
    not_signalable: frozenset[tuple[int, float]] = frozenset(),
) -> Decision:
    """Attribute, count and decide, as the cycle does (``owners``: the evidence, given)."""
    smp = sample(groups)
    idx = PodIndex.build(pods, namespace=NS)
    attributed = attribution.attribute_backends(groups=smp.groups, index=idx, mode=s.attribution)
    judged = {o.owner: o for o in owners or []}
    u = usage.compute_usage(spec=s, namespace=NS, sample=smp, attributed=attributed, owners=judged)
    return decide(
        spec=s,
        namespace=NS,
        now=now,
        usage=u,
        attributed=attributed,
        pods=pods,
        pooler=None,
        pooler_clients={},
        history=history or [],
        memory=memory or Memory(),
        paused=paused,
        owners=judged,
        termination_possible=termination_possible,
        blocked=blocked,
        sampled_at=smp.sampled_at,
        fragile=fragile,
        not_signalable=not_signalable,
    )
