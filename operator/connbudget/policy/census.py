"""A census of one sample: its backends attributed once and counted once, for every budget.

Pure: no I/O, no clock; all inputs are arguments.

Why: the budgets of a database share one sample (``cycle.schedule``). Attributing and counting
its every group for each budget made a poll cost budgets x backends; a census is taken once per
sample and namespace (attribution by ``application_name`` looks at the budget's namespace only),
and each budget then reads its slice (the groups of the pods it governs, by pod name) and the
totals its scope counts. What a budget's own evidence adds (leak rates, abandoned and pooled
connections) is merged in per budget, over the few owners it concerns (``usage.compute_usage``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from connbudget.model.observations import BackendGroup, ServerSample
from connbudget.model.spec import AttributionMode
from connbudget.policy.attribution import Attributed, PodIndex, Via, attribute_backends


@dataclass(frozen=True, kw_only=True)
class OwnerCount:
    """What one owning workload holds on the server (direct backends and the pooler's)."""

    owner: str  # Kind/name; a workload of another namespace is named with it
    pods: frozenset[str]
    connections: int
    idle: int


@dataclass(frozen=True, kw_only=True)
class Totals:
    """Backends counted by state, and how many of them no pod holds."""

    connections: int = 0
    unattributed: int = 0
    by_state: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Census:
    """One sample, attributed against the pods of one namespace (and every pod's address)."""

    namespace: str
    attributed: tuple[Attributed, ...]
    # The direct (not through the pooler) backend groups of each pod of the namespace, by name.
    by_pod: Mapping[str, tuple[Attributed, ...]]
    server: Totals
    by_database: Mapping[str | None, Totals]
    # Every owner seen, most connections first (then by name), and by name.
    owners: tuple[OwnerCount, ...]
    owners_by_name: Mapping[str, OwnerCount] = field(default_factory=dict)
    # The groups no pod could be told from, under each pod of the namespace that may hold them
    # (``Attributed.claimants``): what scope Selected counts as unattributed.
    claimed: Mapping[str, tuple[Attributed, ...]] = field(default_factory=dict)

    def owner(self, name: str) -> OwnerCount | None:
        """What the owner named ``name`` holds (None: nothing)."""
        return self.owners_by_name.get(name)

    def slice(self, pods: Iterable[str]) -> list[Attributed]:
        """The direct backend groups of the named pods (a budget's governed pods)."""
        return [a for name in pods for a in self.by_pod.get(name, ())]

    def claimed_by(self, pods: Iterable[str]) -> list[Attributed]:
        """The groups no pod could be told from that the named pods may hold, each once."""
        found = {id(a): a for name in pods for a in self.claimed.get(name, ())}
        return list(found.values())


def take_census(
    *,
    sample: ServerSample,
    index: PodIndex,
    mode: AttributionMode,
    pooler_ips: frozenset[str] = frozenset(),
) -> Census:
    """Attribute every group of ``sample`` once, and count it once."""
    return census_of(
        attribute_backends(groups=sample.groups, index=index, mode=mode, pooler_ips=pooler_ips),
        namespace=index.namespace,
    )


def census_of(attributed: Sequence[Attributed], *, namespace: str) -> Census:
    """Count attributed groups (of one namespace's attribution)."""
    by_pod: dict[str, list[Attributed]] = {}
    claimed: dict[str, list[Attributed]] = {}
    tallies: dict[str, tuple[set[str], list[int]]] = {}
    server = _Tally()
    databases: dict[str | None, _Tally] = {}
    for a in attributed:
        g = a.group
        server.add(g, unattributed=a.pod is None)
        databases.setdefault(g.database, _Tally()).add(g, unattributed=a.pod is None)
        pod = a.pod
        if pod is None:
            for claimant in a.claimants:
                claimed.setdefault(claimant.name, []).append(a)
            continue
        if a.via is not Via.POOLER and pod.namespace == namespace:
            by_pod.setdefault(pod.name, []).append(a)
        key = pod.owner if pod.namespace == namespace else f"{pod.namespace}/{pod.owner}"
        names, counts = tallies.setdefault(key, (set(), [0, 0]))
        names.add(pod.name)
        counts[0] += g.count
        if g.state == "idle":
            counts[1] += g.count
    owners = sorted(
        (
            OwnerCount(owner=k, pods=frozenset(names), connections=c[0], idle=c[1])
            for k, (names, c) in tallies.items()
        ),
        key=lambda o: (-o.connections, o.owner),
    )
    return Census(
        namespace=namespace,
        attributed=tuple(attributed),
        by_pod={k: tuple(v) for k, v in by_pod.items()},
        server=server.totals(),
        by_database={k: t.totals() for k, t in databases.items()},
        owners=tuple(owners),
        owners_by_name={o.owner: o for o in owners},
        claimed={k: tuple(v) for k, v in claimed.items()},
    )


@dataclass
class _Tally:
    connections: int = 0
    unattributed: int = 0
    by_state: dict[str, int] = field(default_factory=dict)

    def add(self, g: BackendGroup, *, unattributed: bool) -> None:
        self.connections += g.count
        if unattributed:
            self.unattributed += g.count
        state = g.state or "unknown"
        self.by_state[state] = self.by_state.get(state, 0) + g.count

    def totals(self) -> Totals:
        return Totals(
            connections=self.connections,
            unattributed=self.unattributed,
            by_state=dict(self.by_state),
        )
