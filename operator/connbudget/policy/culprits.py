"""Where a leak is in the code: a leaking workload's abandoned connections, grouped by what they
last ran.

Pure: no I/O, no clock. PostgreSQL keeps the last statement of every connection, and a leaked
connection is never used again, so its last statement is the one that leaked it (or ran just
before the leak), with the sqlcommenter or Marginalia tags the app put on it (route, controller,
action). ``Culprits`` asks for the statements of abandoned connections of leaking owners only, once
per connection (an abandoned connection's last statement no longer changes), and remembers them
while they are open and for the leak window after (terminated ones are the leak's output too).

What it shows never holds a literal: ``policy.fingerprint`` normalises every statement before it
is kept; the raw text is read once and dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from connbudget.model.observations import LastStatement, PodInfo
from connbudget.policy.evidence import LEAK_WINDOW_SECONDS, OwnerClass, OwnerEvidence
from connbudget.policy.fingerprint import HIDDEN, Statement, statement_of

TOP_SHAPES = 3  # leaks kept per owner
# At most this many statements are asked for in one poll (a leak of hundreds a second is named
# as well by its first hundred connections).
MAX_ASKED_PER_POLL = 100
# A fingerprint's first sighting is kept this long after its last one: a leak that pauses for a
# few minutes and comes back is the same leak, one gone for longer starts afresh.
FIRST_SEEN_MEMORY_SECONDS = 900.0
# The labels Kubernetes puts on a pod naming its template's revision.
REVISION_LABELS = ("pod-template-hash", "controller-revision-hash")


@dataclass(frozen=True, kw_only=True)
class LeakShape:
    """One kind of leaked connection of an owner: what they last ran, how many, since when."""

    fingerprint: str
    statement: str  # normalised: no literals, no comments
    tags: Mapping[str, str]
    count: int  # abandoned connections with it, open or ended within the leak window
    share: float  # of the owner's abandoned connections whose statement is known, 0..1
    first_seen: float  # epoch seconds (the server's clock)
    revision: str  # the pod template revision most of them came from ("" unknown)
    revisions: int = 1  # how many revisions of the owner's pods leak it
    # The owner runs pods of other revisions that do not leak it: it came with a rollout.
    rollout: bool = False


def revision_of(pod: PodInfo) -> str:
    """The pod template revision ``pod`` runs: its ReplicaSet's name for a Deployment's pod, its
    ControllerRevision's for a StatefulSet's or DaemonSet's ("" when the labels do not say)."""
    for label in REVISION_LABELS:
        value = pod.labels.get(label)
        if not value:
            continue
        if label == "pod-template-hash" and pod.owner_kind == "Deployment" and pod.owner_name:
            return f"{pod.owner_name}-{value}"
        return value
    return ""


@dataclass(slots=True)
class _Known:
    owner: str
    revision: str
    statement: Statement | None  # None: hidden (no pg_read_all_stats) or empty
    seen_at: float  # last seen abandoned (open, or just asked about)


@dataclass(frozen=True, kw_only=True)
class Ask:
    """The backends whose last statements are wanted now, and what is known of each."""

    backends: tuple[tuple[int, float], ...]  # (pid, backend_start)
    owners: Mapping[tuple[int, float], str] = field(default_factory=dict)
    revisions: Mapping[tuple[int, float], str] = field(default_factory=dict)


class Culprits:
    """The last statements of leaking owners' abandoned connections, over the leak window."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, float], _Known] = {}
        self._first: dict[tuple[str, str], tuple[float, float]] = {}  # (owner, fp) → first, last
        self.visible: bool | None = None  # statement text readable (None: none asked for yet)

    def __len__(self) -> int:
        return len(self._known)

    def clear(self) -> None:
        self._known.clear()
        self._first.clear()

    def ask(
        self, owners: Mapping[str, OwnerEvidence], pods: Mapping[str, PodInfo], *, at: float
    ) -> Ask:
        """The abandoned connections of leaking owners whose last statement is not known yet
        (those known are marked seen at ``at``: they count as long as they are open)."""
        wanted: list[tuple[int, float]] = []
        owner_of: dict[tuple[int, float], str] = {}
        revisions: dict[tuple[int, float], str] = {}
        for owner, ev in sorted(owners.items()):
            if ev.cls is not OwnerClass.LEAKING:
                continue
            for pid, start, pod in ev.abandoned_backends:
                key = (pid, start)
                if (known := self._known.get(key)) is not None:
                    known.seen_at = at
                    continue
                if len(wanted) >= MAX_ASKED_PER_POLL:
                    continue
                wanted.append(key)
                owner_of[key] = owner
                info = pods.get(pod)
                revisions[key] = revision_of(info) if info is not None else ""
        return Ask(backends=tuple(wanted), owners=owner_of, revisions=revisions)

    def record(self, *, at: float, ask: Ask, found: Iterable[LastStatement]) -> None:
        """Keep what the server said of the asked backends (ones that ended meanwhile are not
        in ``found``: asked again if still abandoned, never if gone)."""
        hidden = False
        for row in found:
            key = (row.pid, row.backend_start)
            owner = ask.owners.get(key)
            if owner is None:
                continue
            if row.query.strip() == HIDDEN:
                hidden = True
            self._known[key] = _Known(
                owner=owner,
                revision=ask.revisions.get(key, ""),
                statement=statement_of(row.query, row.query_id),
                seen_at=at,
            )
        if ask.backends:
            self.visible = not hidden

    def shapes(self, *, at: float, leaking: Iterable[str]) -> dict[str, tuple[LeakShape, ...]]:
        """The top shapes of each leaking owner, over the leak window; forgets what is older."""
        self._known = {
            k: v for k, v in self._known.items() if v.seen_at >= at - LEAK_WINDOW_SECONDS
        }
        wanted = set(leaking)
        groups: dict[str, dict[str, list[_Known]]] = {}
        for k in self._known.values():
            if k.owner in wanted and k.statement is not None:
                groups.setdefault(k.owner, {}).setdefault(k.statement.fingerprint, []).append(k)
        for owner, by_fp in groups.items():
            for fp, ks in by_fp.items():
                first, _ = self._first.get((owner, fp), (min(k.seen_at for k in ks), at))
                self._first[(owner, fp)] = (first, at)
        self._first = {
            k: v for k, v in self._first.items() if v[1] >= at - FIRST_SEEN_MEMORY_SECONDS
        }
        out: dict[str, tuple[LeakShape, ...]] = {}
        for owner, by_fp in groups.items():
            total = sum(len(ks) for ks in by_fp.values())
            ranked = sorted(by_fp.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:TOP_SHAPES]
            out[owner] = tuple(
                _shape(ks, total=total, first=self._first[(owner, fp)][0]) for fp, ks in ranked
            )
        return out


def _shape(ks: Sequence[_Known], *, total: int, first: float) -> LeakShape:
    statement = ks[0].statement
    assert statement is not None
    by_revision: dict[str, int] = {}
    for k in ks:
        by_revision[k.revision] = by_revision.get(k.revision, 0) + 1
    revision = max(sorted(by_revision), key=lambda r: by_revision[r])
    return LeakShape(
        fingerprint=statement.fingerprint,
        statement=statement.text,
        tags=dict(statement.tags),
        count=len(ks),
        share=len(ks) / total if total else 0.0,
        first_seen=first,
        revision=revision,
        revisions=len([r for r in by_revision if r]) or 1,
    )


def with_rollouts(
    shapes: Mapping[str, Sequence[LeakShape]], pods: Iterable[PodInfo]
) -> dict[str, tuple[LeakShape, ...]]:
    """Mark the shapes that only pods of one revision leak while the owner also runs pods of
    another: a leak that came with a rollout (the older pods run the same traffic and do not)."""
    running: dict[str, set[str]] = {}
    for p in pods:
        if not p.terminating and (rev := revision_of(p)):
            running.setdefault(p.owner, set()).add(rev)
    return {
        owner: tuple(
            replace(s, rollout=True)
            if s.revisions == 1 and s.revision and len(running.get(owner, set()) - {s.revision})
            else s
            for s in ranked
        )
        for owner, ranked in shapes.items()
    }
