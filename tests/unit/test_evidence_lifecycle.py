"""The verdict under the lifecycle events a healthy pool lives through, and the leaks beside it.

A pool simulated as the client libraries behave: it opens ``min_size`` connections when its pod
starts (psycopg_pool, HikariCP's ``minimumIdle``), lends an idle connection before opening another
(LIFO as node-postgres, FIFO as psycopg_pool and HikariCP's shared list), opens one more only when
every connection is busy, holds it for the request (some requests pause between two queries with
the connection idle), and after a PostgreSQL restart reconnects ``min_size`` at once. None of
these is ever a leak, whatever the pressure: the measured harms of issue 20 (a warm-up burst of two
pods started 2.5 s apart, a reconnect storm, spare idle connections, node-postgres' sparse bursts)
are scenarios here, and a property generates pool shapes beyond them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from connbudget.policy.evidence import (
    GAP_MEMORY_SECONDS,
    SUSTAINED_SPAN_SECONDS,
    Evidence,
    OwnerClass,
)
from unit.test_evidence import FLOOR, IDLE_SECONDS, T0, Conn, Judged, leak

OWNER = "Deployment/app"


@dataclass
class _Slot:
    conn: Conn
    busy_until: float = 0.0


def pool_life(
    *,
    pods: dict[str, float],
    min_size: int,
    max_size: int,
    requests: list[tuple[float, str, float, float]],
    lifo: bool,
    restarts: tuple[float, ...] = (),
    keep_idle: int = 0,
) -> list[Conn]:
    """The connections a pool of each pod (name to start time) opens and uses.

    ``requests`` are ``(at, pod, pause, hold)``: a query at ``at``, a second one ``pause`` later
    when ``pause`` > 0, the connection busy for ``hold`` (at least the pause). At each of
    ``restarts`` every connection ends and each pool reconnects ``min_size`` at once.
    ``keep_idle``: after each loan the pool opens connections (up to ``max_size``) until that
    many are idle, as HikariCP keeps ``minimumIdle``: it opens while a spare one sits idle.
    """
    pid = iter(range(1, 1_000_000))
    out: list[Conn] = []
    slots: dict[str, list[_Slot]] = {}

    def open_conn(pod: str, at: float) -> _Slot:
        c = Conn(pid=next(pid), start=at, uses=[at + 0.005], owner=OWNER, pod=pod)
        out.append(c)
        return _Slot(conn=c)

    events: list[tuple[float, int, str, float, float]] = []
    for pod, start in pods.items():
        events.append((start, 0, pod, 0.0, 0.0))
    for at in restarts:
        events.append((at, 1, "", 0.0, 0.0))
    for at, pod, pause, hold in requests:
        events.append((at, 2, pod, pause, hold))
    for at, kind, pod, pause, hold in sorted(events):
        if kind == 0:  # the pod starts: its pool opens min_size at once
            slots[pod] = [open_conn(pod, at + 0.01 * i) for i in range(min_size)]
        elif kind == 1:  # PostgreSQL restarts: every connection ends, each pool reconnects
            for pod_name, mine in slots.items():
                for slot in mine:
                    if slot.conn.end is None:
                        slot.conn.end = at
                slots[pod_name] = [
                    open_conn(pod_name, at + 1.0 + 0.01 * i) for i in range(min_size)
                ]
        elif pod in slots:
            mine = slots[pod]
            idle = [s for s in mine if s.busy_until <= at]
            if idle:
                # The pool lends the most recently returned (LIFO) or the longest idle (FIFO).
                idle.sort(key=lambda s: s.busy_until)
                slot = idle[-1] if lifo else idle[0]
            elif len(mine) < max_size:
                slot = open_conn(pod, at)
                mine.append(slot)
            else:
                continue  # the request waits for a connection: not modelled
            slot.conn.uses.append(at + 0.01)
            if pause > 0:
                slot.conn.uses.append(at + pause + 0.01)
            slot.busy_until = at + max(hold, pause + 0.02)
            spare = sum(1 for s in mine if s.busy_until <= at)
            for i in range(min(keep_idle - spare, max_size - len(mine))):
                mine.append(open_conn(pod, at + 0.02 + 0.01 * i))
    return out


def play_pressured(
    conns: list[Conn],
    *,
    until: float,
    every: float = 1.0,
    pressure: bool = True,
    urgent: bool = False,
    ev: Evidence | None = None,
) -> list[tuple[float, Judged]]:
    ev = Evidence() if ev is None else ev
    out = []
    t = T0
    while t <= until:
        seen = [s for c in conns if (s := c.seen_at(t)) is not None]
        ev.observe(at=t, seen=seen, floor=FLOOR)
        judged = ev.judge(
            at=t, floor=FLOOR, idle_seconds=IDLE_SECONDS, pressure=pressure, urgent=urgent
        )
        out.append((t, judged))
        t += every
    return out


def never_leaking(judgements: list[tuple[float, Judged]], owner: str = OWNER) -> None:
    for t, judged in judgements:
        got = judged.get(owner)
        assert got is None or got.cls is not OwnerClass.LEAKING, (t - T0, got)


def sparse(
    pods: list[str], *, every: tuple[float, float], seconds: float, seed: int
) -> list[tuple[float, str, float, float]]:
    rnd = random.Random(seed)
    out = []
    for pod in pods:
        t = T0 + rnd.uniform(*every)
        while t < T0 + seconds:
            out.append((t, pod, 0.0, 0.05))
            t += rnd.uniform(*every)
    return out


def test_two_pods_of_a_pool_started_apart_are_no_leak() -> None:
    # Measured on the sandbox before: psycopg_pool min_size=8, two pods 2.5 s apart, Leaking
    # 10 s after start and 30 of 32 requests failed.
    pods = {"app-1": T0, "app-2": T0 + 2.5}
    conns = pool_life(
        pods=pods,
        min_size=8,
        max_size=8,
        requests=sparse(list(pods), every=(5, 15), seconds=120, seed=1),
        lifo=False,
    )
    never_leaking(play_pressured(conns, until=T0 + 120))


def test_node_postgres_sparse_bursts_are_no_leak() -> None:
    # pg.Pool({max: 10, idleTimeoutMillis: 0}): a few concurrent requests every 30-110 s; the
    # pool opens connections in a burst and leaves them idle. Measured before: LeakDetected 11 s
    # after start, 50 connections terminated in 180 s.
    rnd = random.Random(7)
    requests = []
    t = T0 + 1.0
    while t < T0 + 400:
        for _ in range(rnd.randint(3, 8)):
            requests.append((t + rnd.uniform(0, 1.5), "catalog-1", 0.0, rnd.uniform(0.3, 1.5)))
        t += rnd.uniform(30, 110)
    conns = pool_life(pods={"catalog-1": T0}, min_size=0, max_size=10, requests=requests, lifo=True)
    never_leaking(play_pressured(conns, until=T0 + 400))


def test_spare_idle_connections_of_three_pods_are_no_leak() -> None:
    # HikariCP minimumIdle / database/sql MaxIdleConns: 10 open per pod, 2 used.
    pods = {"api-1": T0, "api-2": T0 + 1.3, "api-3": T0 + 4.0}
    requests = [
        (T0 + 5 + i * 0.7, f"api-{1 + i % 3}", 0.0, 0.3) for i in range(200)
    ]  # two at a time at most
    conns = pool_life(pods=pods, min_size=10, max_size=20, requests=requests, lifo=False)
    never_leaking(play_pressured(conns, until=T0 + 150))


def test_a_reconnect_storm_after_a_restart_is_no_leak_and_the_gaps_are_kept() -> None:
    # Measured before: psycopg_pool min_size=8, warmed up and Pooling; PostgreSQL restarted; the
    # failed probe cleared the learned gaps and the reconnected pool was Leaking for 112 s.
    pods = {"app-1": T0}
    requests = [(T0 + 2 + i * 4.0, "app-1", 0.0, 0.1) for i in range(60)]
    conns = pool_life(
        pods=pods, min_size=8, max_size=8, requests=requests, lifo=False, restarts=(T0 + 90,)
    )
    ev = Evidence()
    before = play_pressured(conns, until=T0 + 88, ev=ev)
    learned = before[-1][1][OWNER].max_gap
    assert learned is not None
    ev.forget_backends()  # the probe failed while the server restarted
    after = [
        (t, j)
        for t, j in play_pressured(conns, until=T0 + 240, ev=ev)
        if t >= T0 + 91  # a new play from T0 replays the past: judge only after the restart
    ]
    never_leaking(after)
    kept = after[0][1][OWNER].max_gap
    assert kept is not None
    assert kept >= learned


def test_a_pools_gaps_survive_an_operator_restart_through_the_status() -> None:
    ev = Evidence()
    ev.seed({OWNER: 40.0}, at=T0)
    pods = {"app-1": T0}
    conns = pool_life(
        pods=pods,
        min_size=8,
        max_size=8,
        requests=sparse(["app-1"], every=(20, 40), seconds=90, seed=3),
        lifo=False,
    )
    judged = play_pressured(conns, until=T0 + 90, ev=ev)
    never_leaking(judged)
    first = judged[0][1][OWNER]
    assert first.cls is OwnerClass.POOLING
    assert first.max_gap == 40.0
    assert first.abandon_after > 40.0
    # The prior is a memory like any other gap: it ends after GAP_MEMORY_SECONDS.
    ev2 = Evidence()
    ev2.seed({OWNER: 40.0}, at=T0)
    ev2.observe(at=T0 + GAP_MEMORY_SECONDS + 1, seen=[], floor=FLOOR)
    assert OWNER not in ev2.judge(at=T0 + GAP_MEMORY_SECONDS + 1, floor=FLOOR, idle_seconds=300)


def test_under_pressure_a_leak_is_named_within_seconds() -> None:
    judged = play_pressured(leak(7.0, seconds=30, owner=OWNER), until=T0 + 30)
    first = next(t for t, j in judged if j.get(OWNER) and j[OWNER].cls is OwnerClass.LEAKING)
    assert first - T0 <= 6.0


def test_calm_a_leak_is_named_only_once_sustained() -> None:
    judged = play_pressured(leak(7.0, seconds=60, owner=OWNER), until=T0 + 60, pressure=False)
    first = next(t for t, j in judged if j.get(OWNER) and j[OWNER].cls is OwnerClass.LEAKING)
    # Abandoned after the 3 s floor, arriving from then on, for SUSTAINED_SPAN_SECONDS.
    assert SUSTAINED_SPAN_SECONDS <= first - T0 <= SUSTAINED_SPAN_SECONDS + 2 * FLOOR + 2


def test_a_leak_held_by_terminations_stays_named() -> None:
    conns = leak(0.5, seconds=200, owner=OWNER)
    ev = Evidence()
    named = []
    t = T0
    while t <= T0 + 200:
        seen = [s for c in conns if (s := c.seen_at(t)) is not None]
        ev.observe(at=t, seen=seen, floor=FLOOR)
        judged = ev.judge(at=t, floor=FLOOR, idle_seconds=IDLE_SECONDS, pressure=t < T0 + 30)
        got = judged.get(OWNER)
        named.append((t, got is not None and got.cls is OwnerClass.LEAKING))
        if got is not None and got.cls is OwnerClass.LEAKING:
            for c in conns:  # the operator terminates what the evidence says is abandoned
                if c.end is None and c.start <= t and t - c.uses[-1] >= got.terminate_after:
                    c.end = t + 0.001
        t += 1.0
    since = next(t for t, n in named if n)
    assert all(n for t, n in named if t >= since), "the verdict flapped while the leak went on"


@st.composite
def pool_shapes(draw: st.DrawFn) -> tuple[list[Conn], float]:
    """A pool's life: pods starting apart, a size and spare connections, a lending order,
    traffic from sparse bursts to steady, pauses inside requests, restarts of the server."""
    n_pods = draw(st.integers(min_value=1, max_value=4))
    pods = {f"p-{i}": T0 + draw(st.floats(min_value=0.0, max_value=30.0)) for i in range(n_pods)}
    min_size = draw(st.integers(min_value=0, max_value=12))
    max_size = max(min_size, draw(st.integers(min_value=1, max_value=20)))
    seconds = 240.0
    rnd = random.Random(draw(st.integers(min_value=0, max_value=10_000)))
    every = draw(st.sampled_from([(0.2, 1.0), (2.0, 8.0), (10.0, 40.0), (30.0, 110.0)]))
    burst = draw(st.integers(min_value=1, max_value=8))
    pause_share = draw(st.sampled_from([0.0, 0.3]))
    requests = []
    for pod, start in pods.items():
        t = start + rnd.uniform(0.5, every[1])
        while t < T0 + seconds:
            for _ in range(rnd.randint(1, burst)):
                pause = rnd.uniform(2.0, 10.0) if rnd.random() < pause_share else 0.0
                requests.append((t + rnd.uniform(0, 0.3), pod, pause, rnd.uniform(0.02, 0.5)))
            t += rnd.uniform(*every)
    restarts = tuple(
        T0 + draw(st.floats(min_value=20.0, max_value=200.0))
        for _ in range(draw(st.integers(min_value=0, max_value=2)))
    )
    lifo = draw(st.booleans())
    conns = pool_life(
        pods=pods,
        min_size=min_size,
        max_size=max_size,
        requests=requests,
        lifo=lifo,
        restarts=restarts,
        # HikariCP keeps minimumIdle, lending from its shared list in order (the longest idle
        # first); the LIFO pools (node-postgres, database/sql, pgxpool) keep no idle count by
        # default.
        keep_idle=0 if lifo else draw(st.sampled_from([0, 2, 3])),
    )
    return conns, seconds


@settings(max_examples=60, deadline=None)
@given(shape=pool_shapes(), poll=st.sampled_from([1.0, 5.0]))
def test_no_pool_shape_is_ever_leaking_even_under_pressure(
    shape: tuple[list[Conn], float], poll: float
) -> None:
    conns, seconds = shape
    never_leaking(play_pressured(conns, until=T0 + seconds, every=poll))


@settings(max_examples=60, deadline=None)
@given(shape=pool_shapes(), poll=st.sampled_from([1.0, 5.0]))
def test_no_pool_shape_is_ever_leaking_with_the_server_full(
    shape: tuple[list[Conn], float], poll: float
) -> None:
    # Another workload filled the server: the verdict asks less of a leak then, and still
    # nothing a pool of at most 20 connections a pod does (HikariCP's minimumIdle fill included).
    conns, seconds = shape
    never_leaking(play_pressured(conns, until=T0 + seconds, every=poll, urgent=True))


def test_a_busy_pool_pausing_before_its_pauses_are_learned_is_no_leak() -> None:
    # Found by the property test: four pods of a busy pool (a request every 0.2-1 s, bursts of up
    # to 8), 30 % of its requests pausing 2-10 s; before any such pause was learned, under
    # pressure, 5 connections opened in a second beside 5 pausing ones made it Leaking, though it
    # had reused its connections 50 times. Seeds 18 and 24 of this shape failed so.
    for seed in (18, 24):
        rnd = random.Random(seed)
        pods = {f"p-{i}": T0 + rnd.uniform(0.0, 4.0) for i in range(4)}
        requests = []
        for pod, start in pods.items():
            t = start + rnd.uniform(0.5, 1.0)
            while t < T0 + 60:
                for _ in range(rnd.randint(1, 8)):
                    pause = rnd.uniform(2.0, 10.0) if rnd.random() < 0.3 else 0.0
                    requests.append((t + rnd.uniform(0, 0.3), pod, pause, rnd.uniform(0.02, 0.5)))
                t += rnd.uniform(0.2, 1.0)
        conns = pool_life(pods=pods, min_size=0, max_size=20, requests=requests, lifo=False)
        never_leaking(play_pressured(conns, until=T0 + 60))


def test_a_hikari_style_pool_keeping_idle_spares_is_no_leak_with_the_server_full() -> None:
    # HikariCP's defaults: maximumPoolSize 10, minimumIdle 2 here; bursts of 8 every 15-60 s.
    rnd = random.Random(11)
    requests = []
    t = T0 + 1.0
    while t < T0 + 240:
        requests += [(t + rnd.uniform(0, 0.3), "p-0", 0.0, 0.2) for _ in range(8)]
        t += rnd.uniform(15.0, 60.0)
    conns = pool_life(
        pods={"p-0": T0}, min_size=2, max_size=10, requests=requests, lifo=False, keep_idle=2
    )
    assert sum(1 for c in conns) == 10
    never_leaking(play_pressured(conns, until=T0 + 240, urgent=True))


def test_a_leak_stopped_by_a_full_server_is_still_the_leak() -> None:
    # Found on the sandbox: a leak that filled the server could open no more connections, and a
    # minute later it was judged Steady, holding every slot.
    conns = leak(5.0, seconds=20, owner=OWNER)  # then the server is full: nothing new
    judged = play_pressured(conns, until=T0 + 150)
    first = next(t for t, j in judged if j[OWNER].cls is OwnerClass.LEAKING)
    assert all(j[OWNER].cls is OwnerClass.LEAKING for t, j in judged if t >= first)


def test_a_leak_whose_requests_pause_up_to_8_s_is_named_under_pressure_past_its_pauses() -> None:
    # Found on the sandbox: the leaking app's own requests paused 2-8 s, its abandon age grew to
    # 13 s (half again its longest pause), the leak was named only past it, and the server filled
    # meanwhile (peak 95 of 100, 47 refused).
    rnd = random.Random(5)
    conns = leak(5.0, seconds=40, owner=OWNER)
    for c in conns:
        if rnd.random() < 0.3:  # a request that pauses, then queries again
            c.uses.append(c.uses[0] + rnd.uniform(2.0, 8.0))
    judged = play_pressured(conns, until=T0 + 40)
    first = next(t for t, j in judged if j[OWNER].cls is OwnerClass.LEAKING)
    got = judged[-1][1][OWNER]
    assert got.abandon_after > 12.0  # what a calm verdict would wait out
    assert first - T0 <= 8.0 + 1.0 + 3.0  # the longest pause, the margin, a few arrivals


def test_a_leak_held_by_terminations_below_its_abandon_age_stays_named() -> None:
    # Found by the harm benchmark: a 7/s leak whose requests pause 2-8 s, terminated at 6-7 s idle
    # (below its 13 s abandon age, to keep the budget) showed no abandoned connection any more,
    # was judged Steady, and filled the server within seconds.
    rnd = random.Random(9)
    conns = leak(7.0, seconds=90, owner=OWNER)
    for c in conns:
        if rnd.random() < 0.3:
            c.uses.append(c.uses[0] + rnd.uniform(2.0, 8.0))
    ev = Evidence()
    named: list[bool] = []
    t = T0
    while t <= T0 + 90:
        seen = [s for c in conns if (s := c.seen_at(t)) is not None]
        ev.observe(at=t, seen=seen, floor=FLOOR)
        got = ev.judge(at=t, floor=FLOOR, idle_seconds=IDLE_SECONDS, pressure=True).get(OWNER)
        named.append(got is not None and got.cls is OwnerClass.LEAKING)
        if named[-1]:
            for c in conns:  # the operator ends every connection idle 6 s (single use) or more
                if c.end is None and c.start <= t and len(c.uses) == 1 and t - c.uses[0] >= 6.0:
                    c.end = t + 0.001
        t += 1.0
    first = named.index(True)
    assert all(named[first:]), "the verdict dropped while the leak went on"


def test_a_fast_leak_that_fills_the_server_before_its_pauses_is_named() -> None:
    # Found by the harm benchmark: at 20/s with requests pausing 2-8 s, the server was full
    # before any connection was idle beyond the pauses, and the leak, able to open no more, was
    # never named (no action at all, 1,045 refused).
    rnd = random.Random(4)
    conns = leak(20.0, seconds=5, owner=OWNER)  # 100 connections: the server is full
    for c in conns:
        if rnd.random() < 0.3:
            c.uses.append(c.uses[0] + rnd.uniform(2.0, 8.0))
    ev = Evidence()
    urgent = []
    for t in range(int(T0), int(T0) + 12):
        seen = [s for c in conns if (s := c.seen_at(float(t))) is not None]
        ev.observe(at=float(t), seen=seen, floor=FLOOR)
        got = ev.judge(
            at=float(t), floor=FLOOR, idle_seconds=IDLE_SECONDS, pressure=True, urgent=True
        )
        urgent.append(got[OWNER].cls is OwnerClass.LEAKING)
    assert any(urgent)


def test_a_leak_that_filled_the_server_within_a_second_of_its_first_arrival_is_named() -> None:
    # Found by the harm benchmark: 81 connections in 4 s over two pods filled the server; their
    # arrivals spanned 0.95 s, under the second asked otherwise, and the leak was never named.
    conns = [
        Conn(pid=100 + i, start=T0 + i / 20, uses=[T0 + i / 20 + 0.01], owner=OWNER, pod=pod)
        for i in range(81)
        for pod in (("leak-a", "leak-b")[i % 2],)
    ]
    ev = Evidence()
    named = []
    for k in range(12):
        t = T0 + k
        seen = [s for c in conns if (s := c.seen_at(t)) is not None]
        ev.observe(at=t, seen=seen, floor=FLOOR)
        got = ev.judge(
            at=t, floor=FLOOR, idle_seconds=IDLE_SECONDS, pressure=True, urgent=len(seen) >= 75
        )
        named.append(got[OWNER].cls is OwnerClass.LEAKING)
    assert any(named)


def test_a_leak_that_filled_the_server_faster_than_the_floor_is_named() -> None:
    # Measured on the sandbox (harm benchmark, leak-20): the Django leak's two pods opened 43
    # connections in 1.96 s and 36 in 1.64 s at their start, each used once, and filled the
    # server; no connection had been idle the floor when the last one opened, so none was an
    # arrival, and the leak was never named: 0 terminated, 1,061 refused in 180 s.
    conns = [
        Conn(pid=100 + i, start=T0 + i * 1.96 / 42, uses=[T0 + i * 1.96 / 42 + 0.06], pod="a")
        for i in range(43)
    ] + [
        Conn(pid=200 + i, start=T0 + 0.26 + i * 1.64 / 35, uses=[T0 + 0.3 + i * 1.64 / 35], pod="b")
        for i in range(36)
    ]
    for c in conns:
        c.owner = OWNER
    judged = play_pressured(conns, until=T0 + 12, urgent=True)
    first = next((t for t, j in judged if j[OWNER].cls is OwnerClass.LEAKING), None)
    assert first is not None, "the leak that filled the server was never named"
    assert first - T0 <= 2.0 + FLOOR + 1.0  # the fill, the floor, a poll
    # Not without the server full: then its arrivals have time to show.
    calm = play_pressured(conns, until=T0 + 12, urgent=False)
    assert all(j[OWNER].cls is not OwnerClass.LEAKING for _t, j in calm)
