"""One actionable line per workload, where the evidence is clear: a table, never a guess.

Pure. Each hint names the evidence that triggers it; the first that applies is shown
(``status.usage.byOwner[].hint``, the leak's Event, ``connbudget leaks``). A hint that needs a fact
the operator does not have (a framework tag the app does not send) does not apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from connbudget.policy.admission import CONNECTIONS_PER_POD_ANNOTATION
from connbudget.policy.attribution import Attributed, Via
from connbudget.policy.culprits import LeakShape
from connbudget.policy.evidence import OwnerClass, OwnerEvidence
from connbudget.policy.occupancy import find_pods_above

# sqlcommenter's Django middleware tags statements framework='django:<version>'.
_LEAKY_DJANGO = re.compile(r"^django:5\.0(\.[01])?$")


@dataclass(frozen=True, kw_only=True)
class OwnerFacts:
    """What a hint may look at of one owning workload."""

    owner: str
    cls: OwnerClass
    shapes: Sequence[LeakShape] = ()  # what its abandoned connections last ran (leaking only)
    unnamed: int = 0  # its direct backends that send no application_name
    pods: int = 0
    max_per_pod: int = 0  # the most connections one of its pods holds
    budget: int = 0  # the budget's maxConnections
    dies_on_termination: bool = False  # its pods restart when its connections are terminated
    declared_per_pod: int | None = None  # its connbudget.io/connections-per-pod annotation
    above_declared: tuple[str, ...] = ()  # its pods holding more than that, most first


@dataclass(frozen=True)
class Hint:
    name: str
    evidence: str  # what triggers it, in words (the README's table is made from these)
    applies: Callable[[OwnerFacts], bool]
    text: Callable[[OwnerFacts], str]


def _django_asgi(f: OwnerFacts) -> bool:
    return f.cls is OwnerClass.LEAKING and any(
        _LEAKY_DJANGO.match(s.tags.get("framework", "")) for s in f.shapes
    )


def _pool_over_budget(f: OwnerFacts) -> bool:
    return f.cls is OwnerClass.POOLING and f.pods > 1 and f.max_per_pod * f.pods > f.budget > 0


def _above_declared(f: OwnerFacts) -> str:
    others = len(f.above_declared) - 1
    more = f" (and {others} more of its pods)" if others else ""
    return (
        f"pod {f.above_declared[0]} holds {f.max_per_pod} connections{more}, above the"
        f" {f.declared_per_pod} per pod its {CONNECTIONS_PER_POD_ANNOTATION} annotation declares:"
        " budget admission counts its pods at the declared figure; raise the annotation or"
        " lower its pool size"
    )


HINTS: tuple[Hint, ...] = (
    Hint(
        "DiesOnTermination",
        "its containers restarted within 30 s of the operator terminating their connections, "
        "twice (policy.remedy)",
        lambda f: f.dies_on_termination,
        lambda f: (
            "its process exits when the server closes one of its idle connections: a client "
            "library with no handler for it (node-postgres: listen for 'error' on every client "
            "and on the pool); until then its pods are restarted instead of its connections "
            "being terminated"
        ),
    ),
    Hint(
        "DjangoAsgiLeak",
        "leaking, and its leaked statements carry sqlcommenter's framework tag django:5.0 or "
        "django:5.0.1",
        _django_asgi,
        lambda f: (
            "known leak: Django 5.0-5.0.1 under ASGI, ticket #35059 (a client that hangs up "
            "mid-request leaves its connection open); upgrade Django, or set CONN_MAX_AGE with "
            "CONN_HEALTH_CHECKS"
        ),
    ),
    Hint(
        "AboveDeclaredPerPod",
        "one of its pods holds more direct connections than its connbudget.io/connections-per-pod"
        " annotation declares",
        lambda f: bool(f.above_declared),
        _above_declared,
    ),
    Hint(
        "NoApplicationName",
        "some of its connections send no application_name",
        lambda f: f.unnamed > 0,
        lambda f: (
            f"{f.unnamed} of its connections send no application_name: set PGAPPNAME from the "
            "pod name (env valueFrom fieldRef metadata.name), so PostgreSQL and PgBouncer show "
            "which pod holds each"
        ),
    ),
    Hint(
        "PoolAboveBudget",
        "its connections are pooled, and its busiest pod's connections times its pods exceed "
        "the budget",
        _pool_over_budget,
        lambda f: (
            f"its pool of up to {f.max_per_pod} connections per pod times {f.pods} pods is "
            f"{f.max_per_pod * f.pods}, above the budget of {f.budget}: lower the pool size or "
            "the replicas, or put PgBouncer in front"
        ),
    ),
)


def hint_for(facts: OwnerFacts) -> str | None:
    """The first hint of ``HINTS`` that applies to ``facts`` (None: none does)."""
    for h in HINTS:
        if h.applies(facts):
            return h.text(facts)
    return None


def owner_facts(
    *,
    owners: Mapping[str, OwnerEvidence],
    attributed: Sequence[Attributed],
    shapes: Mapping[str, Sequence[LeakShape]],
    budget: int,
    fragile: frozenset[str] = frozenset(),
    declared: Mapping[str, int] | None = None,
) -> list[OwnerFacts]:
    """The facts of every judged owner, from its direct backends (not those through a pooler).

    ``declared`` maps owners to the connections per pod their workload declares (the
    ``connbudget.io/connections-per-pod`` annotation), for the pods seen above it.
    """
    declared = declared or {}
    per_pod: dict[str, dict[str, int]] = {}
    unnamed: dict[str, int] = {}
    for a in attributed:
        if a.pod is None or a.via is Via.POOLER or a.pod.owner not in owners:
            continue
        owner = a.pod.owner
        pods = per_pod.setdefault(owner, {})
        pods[a.pod.name] = pods.get(a.pod.name, 0) + a.group.count
        if not a.group.application_name:
            unnamed[owner] = unnamed.get(owner, 0) + a.group.count
    return [
        OwnerFacts(
            owner=owner,
            cls=ev.cls,
            shapes=tuple(shapes.get(owner, ())),
            unnamed=unnamed.get(owner, 0),
            pods=len(per_pod.get(owner, {})),
            max_per_pod=max(per_pod.get(owner, {}).values(), default=0),
            budget=budget,
            dies_on_termination=owner in fragile,
            declared_per_pod=declared.get(owner),
            above_declared=(
                tuple(find_pods_above(per_pod.get(owner, {}), declared=declared[owner]))
                if owner in declared
                else ()
            ),
        )
        for owner, ev in sorted(owners.items())
    ]


def hints_of(facts: Sequence[OwnerFacts]) -> dict[str, str]:
    """Owner → its hint, for the owners one applies to."""
    return {f.owner: h for f in facts if (h := hint_for(f)) is not None}
