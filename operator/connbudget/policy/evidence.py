"""Evidence of a leak: every backend followed across polls, every owning workload classified.

Pure: no I/O, no clock; every time comes from the samples (the server's own clock), every input
is an argument. The ``Evidence`` object is memory carried from one poll to the next (like the
forecast's history); ``observe`` and ``judge`` are deterministic functions of what they are given.

Why: an idle age alone cannot tell a leak from a pool. A Django app with ``CONN_MAX_AGE`` under a
WSGI server leaves each connection idle for as long as a minute or two between requests; a leak
under ASGI leaves connections idle forever. Terminating by idle age either hurts the pool (a
connection killed under a client that does not pre-ping is a failed request) or lets the leak fill
the server (it must wait out the pool's gaps). Following each backend by identity (pid and
``backend_start``) and watching its ``state_change`` move tells them apart:

- a backend *used again* shows the gap it sat idle before reuse; the longest gap an owner's
  connections show is how long that owner may leave a connection idle and still want it;
- a backend idle longer than that (and than a floor the spec sets) is *abandoned*;
- an owner whose abandoned connections keep arriving (at least ``LEAK_MIN_CONNECTIONS`` opened over
  at least ``LEAK_MIN_SPAN_SECONDS`` within ``LEAK_WINDOW_SECONDS``) is *leaking*, at the rate they
  arrive; an owner whose connections are reused and not abandoned is *pooling*; any other is
  *steady* (not enough evidence either way).

What it accepts: a gap is measured as the distance between two ``state_change`` times, so it
includes the next query's run time (an over-estimate, which errs on the side of the pool); a gap
shorter than a poll is seen as one longer gap; a backend that lived less than a poll is never seen.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from connbudget.model.observations import BackendGroup
from connbudget.policy.attribution import Attributed, Via

# Leak evidence and rates are computed over this much recent time (seconds).
LEAK_WINDOW_SECONDS = 60.0
# Fewer abandoned connections than this in the window is no sustained leak: a worker or two that
# opened a connection and went quiet is not a leak.
LEAK_MIN_CONNECTIONS = 5
# ... and they must have been opened over at least this long: a pool opens its connections in a
# burst when it starts (psycopg_pool's min_size, SQLAlchemy's pool warming), a leak keeps opening.
LEAK_MIN_SPAN_SECONDS = 1.0
# Reuse gaps are remembered this long: a pool's longest gap (a quiet worker) may be minutes.
GAP_MEMORY_SECONDS = 900.0
# An owner's connection is abandoned once idle this many times its longest reuse gap, plus the
# margin (the gap is measured between polls, so it may be a poll short).
ABANDON_GAP_FACTOR = 1.5
ABANDON_GAP_MARGIN_SECONDS = 1.0
# A connection of an owner that is not leaking is terminated only when idle well beyond its reuse
# gaps: this many times the longest one (and never before leakDetection.idleSeconds).
POOL_GAP_FACTOR = 3.0
# A connection whose last state change came this soon after it was opened has run its first
# query and nothing since: used once so far. Enough of them, fresh, make an owner a *suspect*,
# polled every second until the evidence says leak or not (a leak's first connections are not yet
# abandoned when it is first seen).
FIRST_USE_SECONDS = 2.0
# Two state_change times closer than this are the same (both come from the same float arithmetic).
SAME_TIME_SECONDS = 0.01
# States in which a backend waits for its client: a client that never comes back leaves it there.
WAITING_STATES = frozenset({"idle", "idle in transaction", "idle in transaction (aborted)"})
IN_TRANSACTION_STATES = frozenset({"idle in transaction", "idle in transaction (aborted)"})


class OwnerClass(enum.StrEnum):
    LEAKING = "Leaking"
    POOLING = "Pooling"
    STEADY = "Steady"


@dataclass(frozen=True, kw_only=True, slots=True)
class Seen:
    """One backend of a governed pod, as one poll saw it."""

    pid: int
    backend_start: float
    state: str
    changed_at: float  # state_change (the server's clock, epoch seconds)
    pod: str
    owner: str  # Kind/name of the pod's workload


@dataclass(slots=True)
class _Track:
    pid: int
    owner: str
    pod: str
    start: float  # backend_start
    state: str
    changed_at: float
    last_seen: float


@dataclass
class _OwnerLog:
    gaps: deque[tuple[float, float]] = field(default_factory=deque)  # (seen at, gap seconds)
    # (ended at, backend_start, pod) of abandoned backends that have ended (terminated, or
    # closed at last): they still count as the leak's output within the window.
    ended: deque[tuple[float, float, str]] = field(default_factory=deque)


@dataclass(frozen=True, kw_only=True)
class OwnerEvidence:
    """What the evidence says of one owning workload."""

    owner: str
    cls: OwnerClass
    leak_rate: float  # abandoned connections opened per second, over the window
    abandoned: int  # open connections idle beyond abandon_after
    abandoned_in_transaction: int  # ... of them ``idle in transaction``: termination is no remedy
    abandon_after: float  # idle seconds after which this owner's connection is abandoned
    terminate_after: float  # idle seconds after which its idle connections may be terminated
    max_gap: float | None  # the longest reuse gap seen (None: no reuse seen)
    reuses: int  # reuses seen within the gap memory
    connections: int  # its backends open now (of governed pods)
    suspect: bool = False  # many fresh connections used once so far: watch it closely
    abandoned_by_pod: Mapping[str, int] = field(default_factory=dict)
    in_transaction_by_pod: Mapping[str, int] = field(default_factory=dict)
    rate_by_pod: Mapping[str, float] = field(default_factory=dict)  # of a leaking owner
    # (pid, backend_start, pod) of its abandoned connections open now, oldest first: whose last
    # statement tells where the leak is (policy.culprits)
    abandoned_backends: tuple[tuple[int, float, str], ...] = ()

    @property
    def rate_per_minute(self) -> float:
        return self.leak_rate * 60.0


def seen_backends(
    *, attributed: Sequence[Attributed], sampled_at: float, governed: frozenset[str]
) -> list[Seen]:
    """The direct backends of the ``governed`` pods (by name) in a sample, one by one."""
    out: list[Seen] = []
    for a in attributed:
        pod = a.pod
        if pod is None or a.via is Via.POOLER or pod.name not in governed:
            continue
        out.extend(_seen_of(a.group, sampled_at, pod.name, pod.owner))
    return out


def _seen_of(g: BackendGroup, sampled_at: float, pod: str, owner: str) -> Iterable[Seen]:
    state = g.state or "unknown"
    for pid, in_state, start in g.backends:
        yield Seen(
            pid=pid,
            backend_start=start,
            state=state,
            changed_at=sampled_at - in_state,
            pod=pod,
            owner=owner,
        )


def abandon_after(max_gap: float | None, *, floor: float) -> float:
    """Idle seconds after which a connection of an owner whose longest reuse gap is ``max_gap``
    is abandoned: longer than any gap the owner showed before using a connection again (so a
    request that idles between two queries is not taken for a leak), never less than ``floor``."""
    if max_gap is None:
        return floor
    return max(floor, ABANDON_GAP_FACTOR * max_gap + ABANDON_GAP_MARGIN_SECONDS)


class Evidence:
    """Each governed backend followed across polls, and what each owner's backends did."""

    def __init__(self) -> None:
        self._tracks: dict[tuple[int, float], _Track] = {}
        self._owners: dict[str, _OwnerLog] = {}

    def __len__(self) -> int:
        return len(self._tracks)

    def clear(self) -> None:
        self._tracks.clear()
        self._owners.clear()

    def observe(self, *, at: float, seen: Iterable[Seen], floor: float) -> None:
        """Take one poll's backends (``at``: the sample's time, on the server's clock).

        A backend seen before whose ``state_change`` moved on after it sat idle was used again:
        the gap is recorded for its owner. A backend no longer seen has ended; if it was
        abandoned when last seen, its start still counts as the leak's output in the window.
        """
        current: dict[tuple[int, float], _Track] = {}
        for s in seen:
            key = (s.pid, s.backend_start)
            track = self._tracks.get(key)
            # Used again after sitting idle: the gap tells how long this owner lets one wait.
            if (
                track is not None
                and track.state == "idle"
                and s.changed_at > track.changed_at + SAME_TIME_SECONDS
            ):
                log = self._owners.setdefault(track.owner, _OwnerLog())
                log.gaps.append((at, s.changed_at - track.changed_at))
            current[key] = _Track(
                pid=s.pid,
                owner=s.owner,
                pod=s.pod,
                start=s.backend_start,
                state=s.state,
                changed_at=s.changed_at,
                last_seen=at,
            )
        for key, track in self._tracks.items():
            if key in current:
                continue
            log = self._owners.setdefault(track.owner, _OwnerLog())
            threshold = abandon_after(_max_gap(log), floor=floor)
            if (
                track.state in WAITING_STATES
                and track.last_seen - track.changed_at >= threshold
                and track.start >= at - LEAK_WINDOW_SECONDS
            ):
                log.ended.append((at, track.start, track.pod))
        self._tracks = current
        for owner, log in list(self._owners.items()):
            while log.gaps and log.gaps[0][0] < at - GAP_MEMORY_SECONDS:
                log.gaps.popleft()
            while log.ended and log.ended[0][0] < at - LEAK_WINDOW_SECONDS:
                log.ended.popleft()
            if not log.gaps and not log.ended:
                del self._owners[owner]

    def judge(self, *, at: float, floor: float, idle_seconds: float) -> dict[str, OwnerEvidence]:
        """Classify every owner seen (``floor``: the spec's least idle age for a termination;
        ``idle_seconds``: leakDetection.idleSeconds, the least for an owner that is not leaking).
        """
        by_owner: dict[str, list[_Track]] = {}
        for track in self._tracks.values():
            by_owner.setdefault(track.owner, []).append(track)
        out: dict[str, OwnerEvidence] = {}
        for owner in sorted(set(by_owner) | set(self._owners)):
            out[owner] = self._judge_owner(
                owner,
                by_owner.get(owner, []),
                at=at,
                floor=floor,
                idle_seconds=idle_seconds,
            )
        return out

    def _judge_owner(
        self, owner: str, tracks: Sequence[_Track], *, at: float, floor: float, idle_seconds: float
    ) -> OwnerEvidence:
        log = self._owners.get(owner) or _OwnerLog()
        max_gap = _max_gap(log)
        after = abandon_after(max_gap, floor=floor)
        starts = [start for _, start, _ in log.ended]
        pod_starts: dict[str, int] = {}
        for _, _, pod in log.ended:
            pod_starts[pod] = pod_starts.get(pod, 0) + 1
        by_pod: dict[str, int] = {}
        in_tx_by_pod: dict[str, int] = {}
        fresh_single_use = sum(
            1
            for t in tracks
            if t.state in WAITING_STATES
            and t.start >= at - LEAK_WINDOW_SECONDS
            and t.changed_at - t.start <= FIRST_USE_SECONDS
        )
        abandoned: list[_Track] = []
        for t in tracks:
            if t.state not in WAITING_STATES or at - t.changed_at < after:
                continue
            abandoned.append(t)
            by_pod[t.pod] = by_pod.get(t.pod, 0) + 1
            if t.state in IN_TRANSACTION_STATES:
                in_tx_by_pod[t.pod] = in_tx_by_pod.get(t.pod, 0) + 1
            if t.start >= at - LEAK_WINDOW_SECONDS:
                starts.append(t.start)
                pod_starts[t.pod] = pod_starts.get(t.pod, 0) + 1
        leaking = (
            len(starts) >= LEAK_MIN_CONNECTIONS
            and max(starts) - min(starts) >= LEAK_MIN_SPAN_SECONDS
        )
        rate = 0.0
        span = LEAK_MIN_SPAN_SECONDS
        if starts:
            # Abandoned connections opened between the oldest one in the window and the newest
            # that could be known abandoned by now (``after`` seconds ago).
            span = max(at - after - min(starts), LEAK_MIN_SPAN_SECONDS)
            rate = len(starts) / span
        if leaking:
            cls = OwnerClass.LEAKING
            terminate_after = after
        else:
            cls = OwnerClass.POOLING if log.gaps else OwnerClass.STEADY
            terminate_after = max(
                float(idle_seconds), POOL_GAP_FACTOR * max_gap if max_gap is not None else 0.0
            )
        return OwnerEvidence(
            owner=owner,
            cls=cls,
            leak_rate=rate if leaking else 0.0,
            abandoned=sum(by_pod.values()),
            abandoned_in_transaction=sum(in_tx_by_pod.values()),
            abandon_after=after,
            terminate_after=terminate_after,
            max_gap=max_gap,
            reuses=len(log.gaps),
            connections=len(tracks),
            suspect=fresh_single_use >= LEAK_MIN_CONNECTIONS,
            rate_by_pod={p: n / span for p, n in pod_starts.items()} if leaking else {},
            abandoned_by_pod=by_pod,
            in_transaction_by_pod=in_tx_by_pod,
            abandoned_backends=tuple(
                (t.pid, t.start, t.pod) for t in sorted(abandoned, key=lambda t: t.start)
            ),
        )


def _max_gap(log: _OwnerLog) -> float | None:
    return max((g for _, g in log.gaps), default=None)
