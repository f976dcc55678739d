"""Builders of policy inputs for unit tests: pods, backend groups, samples, specs."""

from __future__ import annotations

from typing import Any

from connbudget.model.observations import BackendGroup, PodInfo, ServerSample
from connbudget.model.spec import BudgetSpec, parse_spec
from connbudget.policy import attribution, usage
from connbudget.policy.attribution import PodIndex
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
        idle=tuple(
            sorted(
                ((pid0 + i, s, NOW - start_age) for i, s in enumerate(idles)), key=lambda t: -t[1]
            )
        ),
    )


def active_group(p: PodInfo, n: int, *, state: str = "active") -> BackendGroup:
    return BackendGroup(
        database="app",
        user="app",
        application_name=p.name,
        client_addr=p.ip,
        state=state,
        count=n,
        max_idle_seconds=0.0,
        oldest_backend_start=NOW - 600,
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


def run(
    s: BudgetSpec,
    pods: list[PodInfo],
    groups: list[BackendGroup],
    *,
    memory: Memory | None = None,
    now: float = NOW,
    paused: bool = False,
    history: list[tuple[float, int]] | None = None,
) -> Decision:
    """Attribute, count and decide, as the cycle does."""
    smp = sample(groups)
    idx = PodIndex.build(pods)
    attributed = attribution.attribute_backends(groups=smp.groups, index=idx, mode=s.attribution)
    u = usage.compute_usage(spec=s, namespace=NS, sample=smp, attributed=attributed)
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
    )
