"""Attribute PostgreSQL backends and PgBouncer clients to pods.

Pure: no I/O, no clock; all inputs are arguments.

A backend belongs to a pod when its client address is the pod's IP (and it started after the pod
did: a new pod may reuse a dead pod's IP, and the dead pod's backends must not be pinned on it), or
when its ``application_name`` is the pod's name. Backends coming from a pooler pod's address are
the pooler's server connections; the pooler's own clients are attributed to pods by address.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from connbudget.model.observations import (
    PROBE_APPLICATION_NAME,
    BackendGroup,
    PodInfo,
    PoolerClient,
)
from connbudget.model.spec import AttributionMode

# How far a backend may seem to predate its pod and still be the pod's: PostgreSQL's and the API
# server's clocks may differ a little; a dead pod's backends are older than this anyway, since the
# kernel closed them when its process died.
CLOCK_SKEW_TOLERANCE_SECONDS = 2.0


class Via(enum.StrEnum):
    CLIENT_ADDR = "ClientAddr"
    APPLICATION_NAME = "ApplicationName"
    POOLER = "Pooler"
    NONE = "None"


@dataclass(frozen=True, kw_only=True)
class Attributed:
    """A backend group and the pod it was attributed to (``None`` if none)."""

    group: BackendGroup
    pod: PodInfo | None
    via: Via


@dataclass(frozen=True, kw_only=True)
class PodIndex:
    """Pods of one namespace, looked up by IP and by name."""

    by_ip: Mapping[str, Sequence[PodInfo]]
    by_name: Mapping[str, PodInfo]

    @classmethod
    def build(cls, pods: Iterable[PodInfo]) -> PodIndex:
        by_ip: dict[str, list[PodInfo]] = {}
        by_name: dict[str, PodInfo] = {}
        for pod in pods:
            by_name[pod.name] = pod
            if pod.ip:
                by_ip.setdefault(pod.ip, []).append(pod)
        return cls(by_ip=by_ip, by_name=by_name)


def _pod_by_ip(index: PodIndex, addr: str, backend_start: float) -> PodInfo | None:
    """The pod that had ``addr`` when a backend started at ``backend_start``."""
    owners = [
        p
        for p in index.by_ip.get(addr, ())
        if p.started_at is None or p.started_at <= backend_start + CLOCK_SKEW_TOLERANCE_SECONDS
    ]
    # Pods sharing an address at the same time (hostNetwork pods, the node's IP) say nothing about
    # which of them holds the backend: leave it to application_name.
    if sum(1 for p in owners if not p.terminating) > 1:
        return None
    # Two pods can share an address over time; the backend belongs to the latest that predates it.
    return max(owners, key=lambda p: p.started_at or 0.0, default=None)


def attribute_backends(
    *,
    groups: Iterable[BackendGroup],
    index: PodIndex,
    mode: AttributionMode,
    pooler_ips: frozenset[str] = frozenset(),
) -> list[Attributed]:
    """Attribute each backend group to a pod, to the pooler, or to nobody.

    The operator's own probe connections are left out entirely.
    """
    out: list[Attributed] = []
    for g in groups:
        if g.application_name == PROBE_APPLICATION_NAME:
            continue
        if g.client_addr and g.client_addr in pooler_ips:
            out.append(
                Attributed(
                    group=g,
                    pod=_pod_by_ip(index, g.client_addr, g.oldest_backend_start),
                    via=Via.POOLER,
                )
            )
            continue
        pod: PodInfo | None = None
        via = Via.NONE
        if mode in (AttributionMode.AUTO, AttributionMode.CLIENT_ADDR) and g.client_addr:
            pod = _pod_by_ip(index, g.client_addr, g.oldest_backend_start)
            via = Via.CLIENT_ADDR if pod else Via.NONE
        if pod is None and mode in (AttributionMode.AUTO, AttributionMode.APPLICATION_NAME):
            pod = index.by_name.get(g.application_name)
            via = Via.APPLICATION_NAME if pod else Via.NONE
        out.append(Attributed(group=g, pod=pod, via=via))
    return out


def attribute_pooler_clients(
    *, clients: Iterable[PoolerClient], index: PodIndex
) -> dict[str, list[PoolerClient]]:
    """Group PgBouncer clients by the name of the pod at their address (unknown ones left out)."""
    out: dict[str, list[PoolerClient]] = {}
    for c in clients:
        pods = index.by_ip.get(c.addr or "", ())
        live = [p for p in pods if not p.terminating] or list(pods)
        if live:
            pod = max(live, key=lambda p: p.started_at or 0.0)
            out.setdefault(pod.name, []).append(c)
        elif c.application_name in index.by_name:
            out.setdefault(c.application_name, []).append(c)
    return out
