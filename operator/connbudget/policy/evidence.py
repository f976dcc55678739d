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
  connections show is how long that owner may leave a connection idle and still want it (kept
  across a failed probe, and seeded from the status after an operator restart or a change of
  leader: a pool that reconnects after an outage is the same pool);
- a backend idle longer than that (and than a floor the spec sets) is *abandoned*;
- a connection opened while its own pod already held an abandoned one, and abandoned itself, is
  an *arrival*: the one thing a pool does not do and a leak always does. A pool lends an idle
  connection before it opens another, so the connections it opens in a warm-up burst, a reconnect
  storm after an outage or a failover, a rollout's new pods, or its spare idle connections
  (psycopg_pool ``min_size``, HikariCP ``minimumIdle``, node-postgres after a burst) are none;
  a leak opens a new connection while its old ones sit unused, again and again, and its count
  keeps growing (or keeps being replaced after terminations);
- an owner whose arrivals keep coming is *leaking*, at the rate its abandoned connections are
  opened: at least ``LEAK_MIN_CONNECTIONS`` arrivals, spread over ``SUSTAINED_SPAN_SECONDS``
  while the budget is calm (a proven, sustained leak: it may be terminated without pressure), or
  over ``LEAK_MIN_SPAN_SECONDS`` under pressure (usage at the warning line, or the server filling:
  waiting would let the leak fill it). With the server nearly full, a pod that opened
  ``URGENT_MIN_ARRIVALS`` connections, each used once, while another had sat idle half a second
  is the leak that filled it faster than the floor (and opens no more).
  Once leaking, an owner stays leaking while abandoned
  connections keep being opened within ``LEAK_WINDOW_SECONDS`` (its terminated connections are
  replaced by new abandoned ones: a leak held by terminations shows few arrivals, and its
  connections used once keep sitting idle past the floor), or while it
  still holds ``LEAK_MIN_CONNECTIONS`` abandoned (a leak stopped by a full server). An owner whose
  connections are reused and not leaking is *pooling*; any other is *steady* (not enough
  evidence either way).

What it accepts: a gap is measured as the distance between two ``state_change`` times, so it
includes the next query's run time (an over-estimate, which errs on the side of the pool); a gap
shorter than a poll is seen as one longer gap; a backend that lived less than a poll is never seen.
"""

from __future__ import annotations

import bisect
import enum
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from connbudget.model.observations import BackendGroup, PodInfo, PoolerClient
from connbudget.policy.attribution import Attributed, Via

# Leak evidence and rates are computed over this much recent time (seconds).
LEAK_WINDOW_SECONDS = 60.0
# Fewer abandoned connections than this in the window is no sustained leak: a worker or two that
# opened a connection and went quiet is not a leak.
LEAK_MIN_CONNECTIONS = 5
# ... and arrive over at least this long under pressure: the moments a poll sees are not the
# moments connections open.
LEAK_MIN_SPAN_SECONDS = 1.0
# ... and over at least this long while the budget is calm: only a sustained leak is acted on
# without pressure (a worker or a pool's sub-pools, warming up one by one, stop arriving).
SUSTAINED_SPAN_SECONDS = 20.0
# With the server nearly full, a pod that opened this many connections while another of its own
# had sat idle ``URGENT_ARRIVAL_SECONDS``, each used once and idle the floor since, is the leak
# that filled it, though it did so faster than the floor (measured: a Django leak at 20/s opened
# 43 and 36 connections in under 2 s over two pods at its start, filled the server and opened
# none after). A pool opens no more than its size, and twice the size client libraries default
# to (10 for HikariCP and node-postgres) is beyond it: its requests pausing between two queries
# leave connections idle while it opens others, and its spares sit idle while HikariCP opens
# more to keep ``minimumIdle`` (the property test generates pools of up to 20).
URGENT_MIN_ARRIVALS = 20
URGENT_ARRIVAL_SECONDS = 0.5
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
    pooled: bool = False  # a PgBouncer client, not a backend: judged, never terminated


@dataclass(slots=True)
class _Track:
    pid: int
    owner: str
    pod: str
    start: float  # backend_start
    state: str
    changed_at: float
    last_seen: float
    pooled: bool = False


@dataclass(frozen=True, slots=True)
class _Ended:
    """A backend no longer seen that was idle (in a waiting state) at least the floor when last
    seen: it may have been abandoned, and still counts as the leak's output within the window."""

    ended_at: float  # the poll that no longer saw it
    start: float  # backend_start
    pod: str
    state: str
    changed_at: float
    last_seen: float


@dataclass
class _OwnerLog:
    gaps: deque[tuple[float, float]] = field(default_factory=deque)  # (seen at, gap seconds)
    ended: deque[_Ended] = field(default_factory=deque)
    # A prior for the longest gap (from the status, after a restart or a change of leader), and
    # until when it holds: the gaps the owner showed before are still how it behaves.
    prior_gap: float | None = None
    prior_until: float = 0.0


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
    # connections opened in the window while their pod held an abandoned one (see _arrivals)
    arrivals: int = 0
    # leaking on the evidence a calm budget asks for (a proven, sustained leak): its abandoned
    # connections are terminated without pressure
    sustained: bool = False
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


# A PgBouncer client whose last request is at least this old is idle (PgBouncer prints whole
# seconds); a waiting one, or one with a request under way, is not.
POOLED_IDLE_SECONDS = 1.0


def seen_pooled(
    *,
    clients: Mapping[str, Sequence[PoolerClient]],
    pods: Mapping[str, PodInfo],
    sampled_at: float,
    governed: frozenset[str],
) -> list[Seen]:
    """The PgBouncer clients of the ``governed`` pods (``clients`` by pod name), one by one, as
    backends are: a client is followed by its address, port and connect time, and its last
    request moving on is a reuse. So a pod's pooled clients are judged by evidence as its direct
    backends are, never leaked by their idle age alone."""
    out: list[Seen] = []
    for name, mine in clients.items():
        pod = pods.get(name)
        if pod is None or name not in governed:
            continue
        for c in mine:
            if c.connected_at is None:
                continue
            idle = c.state != "waiting" and c.idle_seconds >= POOLED_IDLE_SECONDS
            out.append(
                Seen(
                    pid=-1 - (zlib.crc32(f"{c.addr}:{c.port}".encode()) & 0x7FFFFFFF),
                    backend_start=c.connected_at,
                    state="idle" if idle else "active",
                    changed_at=sampled_at - c.idle_seconds,
                    pod=name,
                    owner=pod.owner,
                    pooled=True,
                )
            )
    return out


def count_abandoned_pooled(clients: Iterable[PoolerClient], owner: OwnerEvidence | None) -> int:
    """Count a pod's PgBouncer clients that its owner has abandoned (leaked through the pooler).

    The one rule for the budget's count (``usage.compute_usage``) and for a restart for pooled
    clients (``plan``): a client counts only while its owner is Leaking, and only once idle
    beyond that owner's abandon age (a client waiting for a server is not idle). A pooled client
    is never leaked by its idle age alone: a healthy app behind PgBouncer leaves its clients idle
    as long as it likes (measured: an app whose clients sat idle 20 s had a pod evicted in a
    breach another workload caused, every cooldown), and an owner's evidence (``seen_pooled``) is
    what tells its pool from a leak.

    Args:
        clients: the PgBouncer clients of one pod.
        owner: the evidence of the pod's owner (None: not judged).

    Returns:
        How many of ``clients`` are abandoned.
    """
    if owner is None or owner.cls is not OwnerClass.LEAKING:
        return 0
    # A waiting client has sent a request and waits for a server (most often when the pool is
    # full, as in a breach): in use, as seen_pooled judges it, whatever its last request's age.
    return sum(1 for c in clients if c.state != "waiting" and c.idle_seconds >= owner.abandon_after)


def abandon_after(max_gap: float | None, *, floor: float) -> float:
    """Idle seconds after which a connection of an owner whose longest reuse gap is ``max_gap``
    is abandoned: longer than any gap the owner showed before using a connection again (so a
    request that idles between two queries is not taken for a leak), never less than ``floor``."""
    if max_gap is None:
        return floor
    return max(floor, ABANDON_GAP_FACTOR * max_gap + ABANDON_GAP_MARGIN_SECONDS)


def pause_bound(max_gap: float | None, *, floor: float) -> float:
    """Idle seconds beyond every pause an owner's requests were seen to make between two uses of
    a connection (its longest reuse gap and a margin), never less than ``floor``: a connection
    idle longer is unused beyond anything seen, though not yet abandoned by ``abandon_after``."""
    if max_gap is None:
        return floor
    return max(floor, max_gap + ABANDON_GAP_MARGIN_SECONDS)


class Evidence:
    """Each governed backend followed across polls, and what each owner's backends did."""

    def __init__(self) -> None:
        self._tracks: dict[tuple[int, float], _Track] = {}
        self._owners: dict[str, _OwnerLog] = {}
        self._leaking: set[str] = set()  # owners judged leaking at the last judgement
        self._sustained: set[str] = set()  # ... of them, on the evidence of a calm budget

    def __len__(self) -> int:
        return len(self._tracks)

    def clear(self) -> None:
        """Forget everything (the budget's spec or database changed)."""
        self._tracks.clear()
        self._owners.clear()
        self._leaking.clear()
        self._sustained.clear()

    def forget_backends(self) -> None:
        """Forget the backends followed and what ended, not what the owners taught: after a gap
        in the samples (a failed probe, a restart of the server) a backend seen before says
        nothing, but a pool that reconnects is the same pool, with the same reuse gaps."""
        self._tracks.clear()
        self._leaking.clear()
        self._sustained.clear()
        for log in self._owners.values():
            log.ended.clear()

    def seed(self, priors: Mapping[str, float], *, at: float) -> None:
        """Take each owner's longest reuse gap as the status kept it (``priors``: owner to
        seconds), for ``GAP_MEMORY_SECONDS`` from ``at``: an operator restart or a new leader
        does not make a pool's reconnect burst or its idle gaps look like a leak."""
        for owner, gap in priors.items():
            log = self._owners.setdefault(owner, _OwnerLog())
            if log.prior_gap is None or gap > log.prior_gap:
                log.prior_gap = gap
            log.prior_until = at + GAP_MEMORY_SECONDS

    def observe(self, *, at: float, seen: Iterable[Seen], floor: float) -> None:
        """Take one poll's backends (``at``: the sample's time, on the server's clock).

        A backend seen before whose ``state_change`` moved on after it sat idle was used again:
        the gap is recorded for its owner. A backend no longer seen has ended; if it sat in a
        waiting state at least ``floor`` when last seen, it is kept for the window: it may have
        been abandoned (judged with the owner's abandon age when judged).
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
                pooled=s.pooled,
            )
        for key, track in self._tracks.items():
            if key in current:
                continue
            if (
                track.state in WAITING_STATES
                and track.last_seen - track.changed_at >= floor
                and track.start >= at - LEAK_WINDOW_SECONDS
            ):
                log = self._owners.setdefault(track.owner, _OwnerLog())
                log.ended.append(
                    _Ended(
                        ended_at=at,
                        start=track.start,
                        pod=track.pod,
                        state=track.state,
                        changed_at=track.changed_at,
                        last_seen=track.last_seen,
                    )
                )
        self._tracks = current
        for owner, log in list(self._owners.items()):
            while log.gaps and log.gaps[0][0] < at - GAP_MEMORY_SECONDS:
                log.gaps.popleft()
            while log.ended and log.ended[0].ended_at < at - LEAK_WINDOW_SECONDS:
                log.ended.popleft()
            if log.prior_gap is not None and log.prior_until < at:
                log.prior_gap = None
            if not log.gaps and not log.ended and log.prior_gap is None:
                del self._owners[owner]

    def judge(
        self,
        *,
        at: float,
        floor: float,
        idle_seconds: float,
        pressure: bool = False,
        urgent: bool = False,
    ) -> dict[str, OwnerEvidence]:
        """Classify every owner seen (``floor``: the spec's least idle age for a termination;
        ``idle_seconds``: leakDetection.idleSeconds, the least for an owner that is not leaking;
        ``urgent``: the server is nearly full, so an unused connection is one idle the floor;
        ``pressure``: usage is at the warning line or the server is filling, so a leak is named
        on less evidence; see the module docstring).
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
                pressure=pressure,
                urgent=urgent,
            )
        self._leaking = {o for o, ev in out.items() if ev.cls is OwnerClass.LEAKING}
        self._sustained = {o for o, ev in out.items() if ev.sustained}
        return out

    def _judge_owner(
        self,
        owner: str,
        tracks: Sequence[_Track],
        *,
        at: float,
        floor: float,
        idle_seconds: float,
        pressure: bool,
        urgent: bool = False,
    ) -> OwnerEvidence:
        log = self._owners.get(owner) or _OwnerLog()
        max_gap = _max_gap(log)
        after = abandon_after(max_gap, floor=floor)
        # Every connection of the window, open or ended: (pod, start, state, changed_at, until).
        lives = [(t.pod, t.start, t.state, t.changed_at, at) for t in tracks]
        lives += [(e.pod, e.start, e.state, e.changed_at, e.last_seen) for e in log.ended]
        recent = at - LEAK_WINDOW_SECONDS
        # Abandoned connections opened within the window (open now, or ended abandoned).
        starts: list[float] = []
        pod_starts: dict[str, int] = {}
        for pod, start, state, changed_at, until in lives:
            if state in WAITING_STATES and until - changed_at >= after and start >= recent:
                starts.append(start)
                pod_starts[pod] = pod_starts.get(pod, 0) + 1
        # Connections of the window used once, right after they were opened, and idle at least
        # the floor since: what a leak keeps showing while terminations end its connections
        # before they reach the abandon age (they never do, and would erase the evidence).
        single_use = [
            start
            for _pod, start, state, changed_at, until in lives
            if state in WAITING_STATES
            and start >= recent
            and changed_at - start <= FIRST_USE_SECONDS
            and until - changed_at >= floor
        ]
        # Under pressure, a connection idle beyond every pause the owner's requests were seen to
        # make is unused enough: the abandon age adds half again (a margin for pauses not seen
        # yet), which a leak whose own requests pause 2-8 s would fill the server waiting out.
        beyond_pauses = pause_bound(max_gap, floor=floor)
        unused_after = beyond_pauses if (pressure or urgent) and beyond_pauses < after else after
        arrivals = _arrivals(lives, after=unused_after, since=recent)
        # The unused connections the arrivals were opened beside: a leak's pile up, one request
        # pausing longer than any seen yet is one (a pool opens connection after connection
        # while it waits: found by the property test, HikariCP-style spares and a 9.7 s pause).
        unused = sum(
            1
            for _pod, _start, state, changed_at, until in lives
            if state in WAITING_STATES and until - changed_at >= unused_after
        )
        # Reuses seen in the window: a pool reuses its connections far more often than it opens
        # new ones beside paused requests; a leak, whose requests each take a new connection,
        # shows reuses only for requests pausing between two queries (found by the property
        # test: four pods of a busy pool, 30 % of its requests pausing 2-10 s before any such
        # pause was learned, 5 arrivals over a second beside 5 pausing connections, 50 reuses).
        reused = _since(log.gaps, recent)
        filled = False
        if urgent:
            # The server is nearly full: a fast leak fills it before any connection is idle
            # beyond the pauses (20/s against 9 s: 180 connections), or even the floor, and then
            # opens none. Its arrivals right after a first use tell it, in a number no pool of a
            # sane size reaches.
            quick = _arrivals(lives, after=URGENT_ARRIVAL_SECONDS, since=recent, own_after=floor)
            per_pod = Counter(pod for _start, abandoned, pod in quick if abandoned)
            filled = max(per_pod.values(), default=0) >= URGENT_MIN_ARRIVALS
        by_pod: dict[str, int] = {}
        in_tx_by_pod: dict[str, int] = {}
        direct = [t for t in tracks if not t.pooled]
        fresh_single_use = sum(
            1
            for t in direct
            if t.state in WAITING_STATES
            and t.start >= recent
            and t.changed_at - t.start <= FIRST_USE_SECONDS
        )
        abandoned: list[_Track] = []
        for t in direct:
            if t.state not in WAITING_STATES or at - t.changed_at < after:
                continue
            abandoned.append(t)
            by_pod[t.pod] = by_pod.get(t.pod, 0) + 1
            if t.state in IN_TRANSACTION_STATES:
                in_tx_by_pod[t.pod] = in_tx_by_pod.get(t.pod, 0) + 1
        holding = sum(by_pod.values())
        sustained = _is_leaking(
            arrivals=arrivals,
            starts=starts,
            pressure=False,
            was_leaking=owner in self._sustained,
            holding=holding,
            single_use=single_use,
            unused=unused,
        )
        leaking = (
            sustained
            or filled
            or _is_leaking(
                arrivals=arrivals,
                starts=starts,
                pressure=pressure or urgent,
                was_leaking=owner in self._leaking,
                holding=holding,
                single_use=single_use,
                unused=unused,
                reused=reused,
            )
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
            cls = OwnerClass.POOLING if log.gaps or log.prior_gap is not None else OwnerClass.STEADY
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
            connections=len(direct),
            arrivals=len(arrivals),
            sustained=sustained,
            suspect=fresh_single_use >= LEAK_MIN_CONNECTIONS,
            rate_by_pod={p: n / span for p, n in pod_starts.items()} if leaking else {},
            abandoned_by_pod=by_pod,
            in_transaction_by_pod=in_tx_by_pod,
            abandoned_backends=tuple(
                (t.pid, t.start, t.pod) for t in sorted(abandoned, key=lambda t: t.start)
            ),
        )


def _arrivals(
    lives: Sequence[tuple[str, float, str, float, float]],
    *,
    after: float,
    since: float,
    own_after: float | None = None,
) -> list[tuple[float, bool, str]]:
    """The arrivals among ``lives`` (pod, start, state, changed_at, until), as their start,
    whether they were abandoned themselves (idle at least ``own_after``, default ``after``) and
    their pod: connections opened at or after ``since``, in a waiting state now (or when they
    ended), while another of their pod sat abandoned (idle at least ``after`` and still open).

    A backend is idle from ``changed_at`` until ``until`` (the last poll that saw it, or now), so
    it sits abandoned over ``[changed_at + after, until]``; a connection opened inside such an
    interval of its pod was opened while an unused one was at hand. Sorted intervals per pod and
    a binary search: a thousand backends cost a few milliseconds, not a million comparisons.
    """
    spans: dict[str, list[tuple[float, float]]] = {}
    for pod, _start, state, changed_at, until in lives:
        if state in WAITING_STATES and until - changed_at >= after:
            spans.setdefault(pod, []).append((changed_at + after, until))
    merged: dict[str, tuple[list[float], list[float]]] = {}
    for pod, found in spans.items():
        lows: list[float] = []
        highs: list[float] = []
        for low, high in sorted(found):
            if highs and low <= highs[-1]:
                highs[-1] = max(highs[-1], high)
            else:
                lows.append(low)
                highs.append(high)
        merged[pod] = (lows, highs)
    own = after if own_after is None else own_after
    out: list[tuple[float, bool, str]] = []
    for pod, start, state, changed_at, until in lives:
        if start < since or state not in WAITING_STATES:
            continue
        found_pod = merged.get(pod)
        if found_pod is None:
            continue
        lows, highs = found_pod
        i = bisect.bisect_right(lows, start) - 1
        if i >= 0 and start <= highs[i]:
            out.append((start, until - changed_at >= own, pod))
    return sorted(out)


def _is_leaking(
    *,
    arrivals: Sequence[tuple[float, bool, str]],
    starts: Sequence[float],
    pressure: bool,
    was_leaking: bool,
    holding: int = 0,
    single_use: Sequence[float] = (),
    unused: int = LEAK_MIN_CONNECTIONS,
    reused: int = 0,
) -> bool:
    """The verdict (see the module docstring). Calm: arrivals abandoned themselves, spread over
    ``SUSTAINED_SPAN_SECONDS``. Under pressure: any arrivals, over ``LEAK_MIN_SPAN_SECONDS``
    (a leak's newest connections are not abandoned yet, and waiting for them lets it grow). A leak
    already named stays named while abandoned connections keep being opened (its terminated ones
    replaced by new ones), or while it still ``holding`` at least ``LEAK_MIN_CONNECTIONS``
    abandoned ones (a leak stopped by a full server opens none, and is still the leak: found on
    the sandbox, a node-postgres leak judged Steady a minute after it filled the server)."""
    if was_leaking and holding >= LEAK_MIN_CONNECTIONS:
        return True
    if was_leaking and len(single_use) >= LEAK_MIN_CONNECTIONS:
        return max(single_use) - min(single_use) >= LEAK_MIN_SPAN_SECONDS
    if was_leaking and len(starts) >= LEAK_MIN_CONNECTIONS:
        return max(starts) - min(starts) >= LEAK_MIN_SPAN_SECONDS
    counted = [start for start, abandoned, _pod in arrivals if pressure or abandoned]
    if len(counted) < LEAK_MIN_CONNECTIONS or unused < LEAK_MIN_CONNECTIONS:
        return False
    if pressure and len(counted) <= reused:
        # Under pressure an arrival need not be abandoned itself: only an owner that opens more
        # connections beside unused ones than it reuses is named on it (the calm verdict, whose
        # arrivals are abandoned themselves, still names a leak inside a pooling workload).
        return False
    need = LEAK_MIN_SPAN_SECONDS if pressure else SUSTAINED_SPAN_SECONDS
    return counted[-1] - counted[0] >= need


def _since(gaps: deque[tuple[float, float]], since: float) -> int:
    """How many of ``gaps`` (in the order they were seen) were seen at or after ``since``:
    counted from the newest, so a busy pool's 15 minutes of reuses cost only the window's."""
    n = 0
    for seen_at, _gap in reversed(gaps):
        if seen_at < since:
            break
        n += 1
    return n


def _max_gap(log: _OwnerLog) -> float | None:
    seen = max((g for _, g in log.gaps), default=None)
    if log.prior_gap is None:
        return seen
    return log.prior_gap if seen is None else max(seen, log.prior_gap)
