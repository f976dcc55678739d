"""Attribute PostgreSQL backends and PgBouncer clients to pods.

Pure: no I/O, no clock; all inputs are arguments.

A backend belongs to a pod when its client address is one of the pod's addresses (``podIPs``,
IPv4 and IPv6 alike) and it started after the pod did: a new pod may reuse a dead pod's IP, and
the dead pod's backends must not be pinned on it. A pod that has finished (phase Succeeded or
Failed) keeps its ``podIP`` in its status but holds no connection: it is no candidate for any
address or name. Addresses are matched against every pod the operator sees: a pod of another
namespace is still a known address, never a stranger whose ``application_name`` decides.

``application_name`` (the pod's name, which the app sets; nothing stops it from sending another,
and a pod of another namespace may have the same name) decides only where the address says
nothing. The named pod must be of the budget's namespace, must have started before the backend,
and the address must vouch for it:

- an address several live pods share (hostNetwork pods, the sandbox's loopback): the named pod
  must be one of them;
- a node's address (a pod's ``hostIP``: the database sees it when traffic leaving the node is
  SNATed, e.g. a database outside the cluster): the named pod must run on that node;
- an address no pod has (a proxy, a NAT gateway): believed only when the operator watches every
  namespace. Watching some namespaces, such an address may be a pod of a namespace it does not
  see (``staging/web-0`` sending ``web-0``), so the name is not believed there.

A backend no pod can be told from is nobody's, but it keeps its *claimants*: the pods of the
namespace it may belong to (the live pods at its address, the pods of the node that has the
address, the pod its unbelieved name names). Under scope Selected it is counted, as unattributed,
for a budget that governs a claimant, so the budget sees the database fill; it is never acted
on. Backends coming from a pooler pod's address are the pooler's server connections; the
pooler's own clients are attributed to pods by address, with the same checks.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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
    """A backend group and the pod it was attributed to (``None`` if none).

    ``claimants`` are, for a group no pod could be told from, the pods of the index's namespace
    that may hold it (empty once attributed).
    """

    group: BackendGroup
    pod: PodInfo | None
    via: Via
    claimants: tuple[PodInfo, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PodIndex:
    """Every pod the operator sees, by address and by node address; one namespace's by name.

    ``all_namespaces`` says whether the pods are every namespace's (the operator watches them
    all): only then is an address no pod has surely no pod's.
    """

    namespace: str  # the budget's: the only one whose pods are looked up by name
    by_ip: Mapping[str, Sequence[PodInfo]]  # live pods (not finished), by each of their addresses
    by_name: Mapping[str, PodInfo]  # of ``namespace`` only
    by_host: Mapping[str, Sequence[PodInfo]] = field(default_factory=dict)  # by node address
    all_namespaces: bool = False

    @classmethod
    def build(
        cls, pods: Iterable[PodInfo], *, namespace: str, all_namespaces: bool = False
    ) -> PodIndex:
        """Index ``pods`` by address and node address, and those of ``namespace`` by name."""
        pods = list(pods)
        by_ip, by_host = index_addresses(pods)
        return cls(
            namespace=namespace,
            by_ip=by_ip,
            by_host=by_host,
            by_name={p.name: p for p in pods if p.namespace == namespace},
            all_namespaces=all_namespaces,
        )


def index_addresses(
    pods: Iterable[PodInfo],
) -> tuple[dict[str, list[PodInfo]], dict[str, list[PodInfo]]]:
    """The live pods by each of their addresses, and by each of their node's addresses.

    A finished pod (Succeeded, Failed) is left out of both: its status keeps its podIP, but it
    holds no connection, and counting it would make a reused address look shared.
    """
    by_ip: dict[str, list[PodInfo]] = {}
    by_host: dict[str, list[PodInfo]] = {}
    for pod in pods:
        if pod.finished:
            continue
        for addr in pod.addresses:
            by_ip.setdefault(addr, []).append(pod)
        for addr in pod.host_ips:
            by_host.setdefault(addr, []).append(pod)
    return by_ip, by_host


def _predates(pod: PodInfo, started: float) -> bool:
    """Whether ``pod`` had started when a backend (or client) started at ``started``."""
    return pod.started_at is None or pod.started_at <= started + CLOCK_SKEW_TOLERANCE_SECONDS


def _named(index: PodIndex, name: str, started: float) -> PodInfo | None:
    """The live pod of the index's namespace named ``name``, if it predates ``started``."""
    pod = index.by_name.get(name)
    if pod is None or pod.finished or not _predates(pod, started):
        return None
    return pod


def _pod_by_name(index: PodIndex, name: str, addr: str | None, started: float) -> PodInfo | None:
    """The pod named ``name``, if the address vouches for it (see the module's docstring)."""
    pod = _named(index, name, started)
    if pod is None:
        return None
    at_addr = index.by_ip.get(addr or "", ())
    if at_addr:
        # The address belongs to pods: the name only tells which of them.
        return pod if pod in at_addr else None
    if addr and addr in index.by_host:
        # A node's address (SNAT): only a pod of that node can come from it.
        return pod if addr in pod.host_ips else None
    # An address no pod has: no pod's for sure only when every namespace's pods are seen.
    return pod if index.all_namespaces else None


def _pod_by_ip(index: PodIndex, addr: str, backend_start: float) -> PodInfo | None:
    """The pod that had ``addr`` when a backend started at ``backend_start``."""
    owners = [p for p in index.by_ip.get(addr, ()) if _predates(p, backend_start)]
    # Pods sharing an address at the same time (hostNetwork pods, the node's IP) say nothing about
    # which of them holds the backend: leave it to application_name.
    if sum(1 for p in owners if not p.terminating) > 1:
        return None
    # Two pods can share an address over time; the backend belongs to the latest that predates it.
    return max(owners, key=lambda p: p.started_at or 0.0, default=None)


def _claimants(index: PodIndex, g: BackendGroup, mode: AttributionMode) -> tuple[PodInfo, ...]:
    """The pods of the index's namespace that may hold ``g``, which no pod could be told from."""
    addr, started = g.client_addr or "", g.oldest_backend_start
    found: dict[str, PodInfo] = {}  # by name: ordered, without repeats
    at_addr = index.by_ip.get(addr, ())
    if mode is not AttributionMode.APPLICATION_NAME:
        for p in (*at_addr, *index.by_host.get(addr, ())):
            if p.namespace == index.namespace and _predates(p, started):
                found[p.name] = p
    if mode is not AttributionMode.CLIENT_ADDR and not at_addr:
        named = _named(index, g.application_name, started)
        if named is not None:
            found[named.name] = named
    return tuple(found.values())


def attribute_backends(
    *,
    groups: Iterable[BackendGroup],
    index: PodIndex,
    mode: AttributionMode,
    pooler_ips: frozenset[str] = frozenset(),
) -> list[Attributed]:
    """Attribute each backend group to a pod, to the pooler, or to nobody.

    The operator's own probe connections are left out entirely. A group no pod could be told
    from keeps the pods that may hold it (``Attributed.claimants``).
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
        claimants = () if pod is not None else _claimants(index, g, mode)
        out.append(Attributed(group=g, pod=pod, via=via, claimants=claimants))
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
