"""ConnectionBudget handlers: a timer that runs the cycle, and forgetting a deleted budget."""

from __future__ import annotations

import time
from collections.abc import Sequence

import kopf

from connbudget import cycle
from connbudget.config import TICK_SECONDS
from connbudget.model.observations import PodInfo, PoolerSample
from connbudget.model.spec import GROUP, PLURAL, VERSION
from connbudget.probe.pgbouncer import sample_poolers
from connbudget.probe.postgres import MonitorPool


def _deps(memo: kopf.Memo, body: kopf.Body, pods: kopf.Index[str, PodInfo]) -> cycle.Deps:
    def post_event(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)

    def pods_of(namespace: str) -> Sequence[PodInfo]:
        return list(pods.get(namespace, ()))

    async def bind(budget: str, dsn: str) -> cycle.MonitorLike:
        monitors: MonitorPool = memo.monitors
        return await monitors.bind(budget, dsn)

    async def poolers(template: str, hosts: Sequence[str], replicas: int) -> PoolerSample:
        return await sample_poolers(template, hosts, replicas=replicas)

    return cycle.Deps(
        kube=memo.kube,
        bind_monitor=bind,
        sample_poolers=poolers,
        pods=pods_of,
        post_event=post_event,
        metrics=memo.metrics,
        now=time.time,
    )


@kopf.timer(GROUP, VERSION, PLURAL, id="reconcile", interval=TICK_SECONDS)
async def budget_reconcile(
    body: kopf.Body,
    meta: kopf.Meta,
    spec: kopf.Spec,
    status: kopf.Status,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    patch: kopf.Patch,
    pods: kopf.Index[str, PodInfo] | None = None,
    **_: object,
) -> None:
    assert namespace is not None  # ConnectionBudgets are namespaced
    assert pods is not None  # kopf passes every index to every handler
    if "runtime" not in memo:
        memo.runtime = cycle.Runtime()
    new_status = await cycle.run_cycle(
        namespace=namespace,
        name=name,
        generation=int(meta.get("generation") or 0),
        spec_raw=dict(spec),
        annotations=dict(meta.annotations),
        old_status=dict(status),
        runtime=memo.runtime,
        deps=_deps(memo, body, pods),
    )
    if new_status is not None:
        patch.status.update(new_status)
    memo.metrics.db_connections.set(memo.monitors.open_connections)


@kopf.on.event(GROUP, VERSION, PLURAL, id="forget")
async def budget_forget(
    type: str | None, namespace: str | None, name: str, memo: kopf.Memo, **_: object
) -> None:
    """On deletion, release the budget's monitoring connection and drop its metric series."""
    if type != "DELETED":
        return
    namespace = namespace or ""
    await memo.monitors.unbind(f"{namespace}/{name}")
    memo.metrics.forget(namespace, name)
