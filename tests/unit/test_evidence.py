"""The evidence: backends followed across polls, owners classified, thresholds learned."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from connbudget.policy.evidence import (
    ABANDON_GAP_FACTOR,
    LEAK_MIN_CONNECTIONS,
    Evidence,
    OwnerClass,
    OwnerEvidence,
    Seen,
    abandon_after,
)

T0 = 1_800_000_000.0
FLOOR = 3.0
IDLE_SECONDS = 300


@dataclass
class Conn:
    """A client connection: opened at ``start``, used at ``uses`` (each a short query), closed at
    ``end`` (None: never)."""

    pid: int
    start: float
    uses: list[float] = field(default_factory=list)
    end: float | None = None
    owner: str = "Deployment/web"
    state_at_rest: str = "idle"
    pod: str = "web-1"

    def seen_at(self, t: float) -> Seen | None:
        if t < self.start or (self.end is not None and t >= self.end):
            return None
        last = max((u for u in self.uses if u <= t), default=self.start)
        return Seen(
            pid=self.pid,
            backend_start=self.start,
            state=self.state_at_rest,
            changed_at=last,
            pod=self.pod,
            owner=self.owner,
        )


Judged = dict[str, OwnerEvidence]


def play(
    conns: list[Conn], *, until: float, every: float = 1.0, ev: Evidence | None = None
) -> Iterator[tuple[float, Judged]]:
    """Poll the connections every ``every`` seconds from T0 to ``until``; yield each judgement."""
    ev = Evidence() if ev is None else ev
    t = T0
    while t <= until:
        seen = [s for c in conns if (s := c.seen_at(t)) is not None]
        ev.observe(at=t, seen=seen, floor=FLOOR)
        yield t, ev.judge(at=t, floor=FLOOR, idle_seconds=IDLE_SECONDS)
        t += every


def leak(
    rate: float, *, start: float = T0, seconds: float, owner: str = "Deployment/web"
) -> list[Conn]:
    """Connections opened at ``rate`` per second, each used once and never again."""
    n = int(rate * seconds)
    return [
        Conn(pid=10_000 + i, start=start + i / rate, uses=[start + i / rate + 0.01], owner=owner)
        for i in range(n)
    ]


def pool(n: int, *, gaps: tuple[float, float], seconds: float, seed: int = 0) -> list[Conn]:
    """``n`` connections opened together, each reused after a gap drawn from ``gaps``."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        t, uses = T0 + 0.01 * i, []
        while t < T0 + seconds:
            uses.append(t + 0.02)
            t += rnd.uniform(*gaps)
        out.append(Conn(pid=i + 1, start=T0 + 0.01 * i, uses=uses, owner="Deployment/pool"))
    return out


def last(judgements: Iterable[tuple[float, Judged]]) -> Judged:
    return list(judgements)[-1][1]


def test_a_steady_leak_is_leaking_at_its_rate() -> None:
    got = last(play(leak(7.0, seconds=40), until=T0 + 30))["Deployment/web"]
    assert got.cls is OwnerClass.LEAKING
    assert 0.8 * 7.0 <= got.leak_rate <= 1.2 * 7.0
    assert got.abandon_after == FLOOR  # never seen reused: the floor
    assert got.terminate_after == FLOOR


def test_a_pool_opened_in_a_burst_is_not_a_leak_before_its_first_reuse() -> None:
    conns = pool(20, gaps=(30, 90), seconds=29)  # nothing reused in the first 29 s
    for _, judged in play(conns, until=T0 + 29):
        assert judged["Deployment/pool"].cls is not OwnerClass.LEAKING
        assert judged["Deployment/pool"].terminate_after >= IDLE_SECONDS


def test_a_pool_learns_its_gaps_and_is_never_terminable_within_them() -> None:
    judged = last(play(pool(5, gaps=(30, 90), seconds=400), until=T0 + 400))
    p = judged["Deployment/pool"]
    assert p.cls is OwnerClass.POOLING
    assert p.max_gap is not None
    assert 60 < p.max_gap <= 92
    assert p.terminate_after >= max(IDLE_SECONDS, 3 * p.max_gap)


def test_an_owner_that_pauses_between_two_queries_is_abandoned_only_after_the_pause() -> None:
    conns = leak(5.0, seconds=50)
    for c in conns:
        c.uses.append(c.uses[0] + 2.0)  # every request: a query, 2 s idle, a second query
    got = last(play(conns, until=T0 + 40))["Deployment/web"]
    assert got.cls is OwnerClass.LEAKING
    assert got.max_gap is not None
    assert got.abandon_after >= ABANDON_GAP_FACTOR * 2.0
    assert got.abandon_after > 2.0 + 1.0


def test_terminated_abandoned_connections_still_count_for_the_rate() -> None:
    conns = leak(5.0, seconds=60)
    ev = Evidence()
    for t, judged in play(conns, until=T0 + 40, ev=ev):
        web = judged.get("Deployment/web")
        # The operator terminates each abandoned connection as soon as it is abandoned.
        for c in conns:
            if c.end is None and web is not None and web.cls is OwnerClass.LEAKING:
                idle = t - c.uses[0]
                if c.start <= t and idle >= web.terminate_after:
                    c.end = t + 0.001
    assert web is not None
    assert web.cls is OwnerClass.LEAKING
    assert 0.8 * 5.0 <= web.leak_rate <= 1.2 * 5.0
    assert web.abandoned <= 5  # held: only what arrived since the last poll


def test_a_few_abandoned_connections_are_no_leak() -> None:
    conns = leak(0.1, seconds=40)  # four in 40 s
    assert len(conns) < LEAK_MIN_CONNECTIONS
    got = last(play(conns, until=T0 + 40))["Deployment/web"]
    assert got.cls is OwnerClass.STEADY
    assert got.terminate_after == IDLE_SECONDS


def test_old_connections_seen_at_start_are_not_a_sustained_leak() -> None:
    conns = [Conn(pid=i, start=T0 - 600 - i, uses=[T0 - 600 - i + 0.01]) for i in range(50)]
    got = last(play(conns, until=T0 + 5))["Deployment/web"]
    assert got.cls is OwnerClass.STEADY
    assert got.abandoned == 50  # abandoned, but not evidence of a leak going on now


def test_idle_in_transaction_leaks_are_counted_apart() -> None:
    conns = leak(3.0, seconds=40)
    for c in conns:
        c.state_at_rest = "idle in transaction"
    got = last(play(conns, until=T0 + 35))["Deployment/web"]
    assert got.cls is OwnerClass.LEAKING
    assert got.abandoned_in_transaction == got.abandoned > 0


def test_a_leak_beside_a_pool_is_told_apart() -> None:
    conns = leak(7.0, seconds=200) + pool(5, gaps=(5, 120), seconds=200, seed=3)
    judged = last(play(conns, until=T0 + 200))
    assert judged["Deployment/web"].cls is OwnerClass.LEAKING
    assert judged["Deployment/pool"].cls is OwnerClass.POOLING


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=20.0),
    poll=st.sampled_from([1.0, 2.0]),
)
def test_any_leak_is_found_within_30_s_at_its_rate(rate: float, poll: float) -> None:
    got = last(play(leak(rate, seconds=40), until=T0 + 30, every=poll))["Deployment/web"]
    assert got.cls is OwnerClass.LEAKING
    assert 0.8 * rate <= got.leak_rate <= 1.2 * rate


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=30),
    low=st.floats(min_value=2.0, max_value=60.0),
    spread=st.floats(min_value=0.0, max_value=60.0),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_no_pool_connection_is_ever_terminable_before_its_reuse(
    n: int, low: float, spread: float, seed: int
) -> None:
    conns = pool(n, gaps=(low, low + spread), seconds=300, seed=seed)
    for t, judged in play(conns, until=T0 + 300, every=2.0):
        p = judged["Deployment/pool"]
        assert p.cls is not OwnerClass.LEAKING
        for c in conns:
            s = c.seen_at(t)
            assert s is None or t - s.changed_at < p.terminate_after


@given(
    gap=st.one_of(st.none(), st.floats(min_value=0.0, max_value=10_000.0)),
    floor=st.floats(min_value=1.0, max_value=600.0),
)
def test_the_abandon_age_is_above_the_floor_and_every_gap_seen(
    gap: float | None, floor: float
) -> None:
    after = abandon_after(gap, floor=floor)
    assert after >= floor
    if gap is not None:
        assert after > gap


def test_a_leak_just_begun_is_a_suspect_before_it_is_abandoned() -> None:
    conns = leak(7.0, start=T0, seconds=10)
    judged = last(play(conns, until=T0 + 2))["Deployment/web"]
    assert judged.cls is OwnerClass.STEADY  # nothing idle 3 s yet
    assert judged.suspect  # but 14 fresh connections, each used once


def test_a_pool_in_use_is_no_suspect() -> None:
    judged = last(play(pool(10, gaps=(0.5, 1.0), seconds=30), until=T0 + 30))
    assert not judged["Deployment/pool"].suspect
