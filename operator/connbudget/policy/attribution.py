"""Attribute PostgreSQL backends and PgBouncer clients to pods.

Pure: no I/O, no clock; all inputs are arguments.

A backend belongs to a pod when its client address is the pod's IP (and it started after the pod
did: a new pod may reuse a dead pod's IP, and the dead pod's backends must not be pinned on it).
Addresses are matched against every pod the operator sees, in every namespace: a pod of another
namespace is still a known address, never a stranger whose ``application_name`` decides.

``application_name`` (the pod's name, which the app sets; nothing stops it from sending another)
decides only where the address says nothing: an address no known pod has (a NAT, a proxy,
loopback), or one that several live pods share (hostNetwork). Even then the named pod must be of
the budget's namespace, must have started before the backend, and, where the address is known,
must be one of the pods at that address: a name never pins a backend on a governed pod when the
address belongs to another pod. Backends coming from a pooler pod's address are the pooler's
server connections; the pooler's own clients are attributed to pods by address, with the same
start check.
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
    """Every pod the operator sees by IP; the pods of one namespace by name."""

    namespace: str  # the budget's: the only one whose pods are looked up by name
    by_ip: Mapping[str, Sequence[PodInfo]]
    by_name: Mapping[str, PodInfo]  # of ``namespace`` only

    @classmethod
    def build(cls, pods: Iterable[PodInfo], *, namespace: str) -> PodIndex:
        """Index ``pods`` (of every namespace) by IP, and those of ``namespace`` by name."""
        by_ip: dict[str, list[PodInfo]] = {}
        by_name: dict[str, PodInfo] = {}
        for pod in pods:
            if pod.namespace == namespace:
                by_name[pod.name] = pod
            if pod.ip:
                by_ip.setdefault(pod.ip, []).append(pod)
        return cls(namespace=namespace, by_ip=by_ip, by_name=by_name)


def _predates(pod: PodInfo, started: float) -> bool:
    """Whether ``pod`` had started when a backend (or client) started at ``started``."""
    return pod.started_at is None or pod.started_at <= started + CLOCK_SKEW_TOLERANCE_SECONDS


def _pod_by_name(index: PodIndex, name: str, addr: str | None, started: float) -> PodInfo | None:
    """The pod named ``name``, if the address does not say it is someone else's."""
    pod = index.by_name.get(name)
    if pod is None or not _predates(pod, started):
        return None
    at_addr = index.by_ip.get(addr or "", ())
    if at_addr and pod not in at_addr:
        return None  # the address belongs to another pod: the name is not to be believed
    return pod


def _pod_by_ip(index: PodIndex, addr: str, backend_start: float) -> PodInfo | None:
    """The pod that had ``addr`` when a backend started at ``backend_start``."""
    owners = [p for p in index.by_ip.get(addr, ()) if _predates(p, backend_start)]
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
            pod = _pod_by_name(index, g.application_name, g.client_addr, g.oldest_backend_start)
            via = Via.APPLICATION_NAME if pod else Via.NONE
        out.append(Attributed(group=g, pod=pod, via=via))
    return out


def attribute_pooler_clients(
    *, clients: Iterable[PoolerClient], index: PodIndex
) -> dict[str, list[PoolerClient]]:
    """Group PgBouncer clients by the name of the pod at their address (unknown ones left out).

    As for backends: the pod must have started before the client connected (a new pod on a dead
    pod's address is not blamed for its clients), a pod of another namespace at the address is
    still the address's owner (its clients are nobody's here), and ``application_name`` decides
    only where the address does not.
    """
    out: dict[str, list[PoolerClient]] = {}
    for c in clients:
        since = c.connected_at if c.connected_at is not None else float("inf")
        pods = [p for p in index.by_ip.get(c.addr or "", ()) if _predates(p, since)]
        live = [p for p in pods if not p.terminating] or pods
        pod = max(live, key=lambda p: p.started_at or 0.0) if len(live) == 1 else None
        if pod is None:
            pod = _pod_by_name(index, c.application_name, c.addr, since)
        if pod is not None and pod.namespace == index.namespace:
            out.setdefault(pod.name, []).append(c)
    return out
