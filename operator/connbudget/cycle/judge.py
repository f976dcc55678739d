"""Judge: who leaks and who pools, where the leak is, and what the budget counts.

The pure policy does the judging (``policy.evidence``, ``culprits``, ``usage``, ``hints``); this
step feeds it the observation and the budget's memory, and asks the database for the last
statement of leaked connections not asked about before (the only I/O here).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from connbudget.cycle.deps import MonitorLike, Runtime
from connbudget.cycle.observe import Observation
from connbudget.model.spec import BudgetSpec
from connbudget.policy import attribution, culprits, evidence, forecast, hints, occupancy, usage
from connbudget.probe.errors import ProbeError

log = logging.getLogger("connbudget.cycle")


@dataclass(frozen=True, kw_only=True)
class Judgement:
    """What the evidence says of each owner, where leaks are, and the budget's usage."""

    owners: Mapping[str, evidence.OwnerEvidence]
    shapes: Mapping[str, tuple[culprits.LeakShape, ...]]
    usage: usage.Usage
    hints: Mapping[str, str]


async def judge(seen: Observation, spec: BudgetSpec, namespace: str, runtime: Runtime) -> Judgement:
    """Follow the governed backends one more poll, classify their owners, count the budget."""
    sample = seen.sample
    floor = float(spec.remediation.terminate_idle.min_idle_seconds)
    governed = [p.name for p in seen.governed]
    mine = frozenset(governed)
    runtime.evidence.observe(
        at=sample.sampled_at,
        seen=[
            *evidence.seen_backends(
                attributed=seen.governed_groups, sampled_at=sample.sampled_at, governed=mine
            ),
            # PgBouncer clients are judged by evidence as direct backends are.
            *evidence.seen_pooled(
                clients=seen.pooler_clients,
                pods=seen.index.by_name,
                sampled_at=sample.sampled_at,
                governed=mine,
            ),
        ],
        floor=floor,
    )
    # Under pressure a leak is named on less evidence (waiting would let it fill the server).
    pressure = usage.under_pressure(
        spec=spec,
        sample=sample,
        census=seen.census,
        governed=governed,
        history=runtime.history,
    )
    owners = runtime.evidence.judge(
        at=sample.sampled_at,
        floor=floor,
        idle_seconds=spec.leak_idle_seconds,
        pressure=pressure,
        urgent=usage.nearly_full(
            usable_slots=max(sample.max_connections - sample.reserved, 0),
            server_total=seen.census.server.connections,
        ),
    )
    runtime.occupancy.observe(
        at=sample.sampled_at,
        counts=occupancy.pod_counts(governed=seen.governed, attributed=seen.governed_groups),
    )
    shapes = await _where_leaks(seen.monitor, runtime, owners, seen.index, at=sample.sampled_at)
    use = usage.compute_usage(
        spec=spec,
        namespace=namespace,
        sample=sample,
        census=seen.census,
        governed=governed,
        pooled=seen.pooler_clients,
        pods=seen.index.by_name,
        owners=owners,
        per_pod=runtime.occupancy.figures(at=sample.sampled_at),
    )
    runtime.history.append((sample.sampled_at, use.server_total + runtime.removed))
    # The forecast reads the last FORECAST_WINDOW_SECONDS: older samples are only memory.
    while runtime.history[0][0] < sample.sampled_at - forecast.FORECAST_WINDOW_SECONDS:
        runtime.history.popleft()
    owner_hints = hints.hints_of(
        hints.owner_facts(
            owners=owners,
            attributed=seen.governed_groups,
            shapes=shapes,
            budget=use.budget,
            fragile=runtime.remedy.dies_on_termination(),
        )
    )
    return Judgement(owners=owners, shapes=shapes, usage=use, hints=owner_hints)


async def _where_leaks(
    monitor: MonitorLike,
    runtime: Runtime,
    owners: Mapping[str, evidence.OwnerEvidence],
    index: attribution.PodIndex,
    *,
    at: float,
) -> dict[str, tuple[culprits.LeakShape, ...]]:
    """What leaking owners' abandoned connections last ran: asked of the server only for
    connections not asked about before. A failed ask costs the detail, never the cycle."""
    ask = runtime.culprits.ask(owners, index.by_name, at=at)
    if ask.backends:
        try:
            found = await monitor.statements(ask.backends)
        except ProbeError as e:
            log.warning("reading leaked connections' statements failed", extra={"error": str(e)})
        else:
            runtime.culprits.record(at=at, ask=ask, found=found)
    leaking = [o for o, ev in owners.items() if ev.cls is evidence.OwnerClass.LEAKING]
    shapes = runtime.culprits.shapes(at=at, leaking=leaking)
    return culprits.with_rollouts(shapes, index.by_name.values()) if shapes else shapes
