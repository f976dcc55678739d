"""One sample per database for every budget that asks at once, never an older one (no database).

The query itself is replaced by a counting fake: what is tested is how ``Monitor.sample`` shares
the queries it runs between concurrent callers.
"""

from __future__ import annotations

import asyncio

import pytest

from connbudget.model.observations import ServerSample
from connbudget.probe.errors import ProbeError, ProbeFailure
from connbudget.probe.postgres import Monitor


class CountingQuery:
    """Stands in for the monitor's query: each call is one query, numbered from 1."""

    def __init__(self, *, seconds: float = 0.0, fail: bool = False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.started: list[float] = []
        self.running = 0
        self.most_at_once = 0

    async def __call__(self) -> ServerSample:
        loop = asyncio.get_running_loop()
        self.started.append(loop.time())
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.running -= 1
        if self.fail:
            raise ProbeError(ProbeFailure.DATABASE_UNREACHABLE, f"query {len(self.started)} failed")
        return ServerSample(
            sampled_at=float(len(self.started)),
            database="app",
            max_connections=100,
            reserved=3,
            groups=(),
        )


def monitor(query: CountingQuery, monkeypatch: pytest.MonkeyPatch) -> Monitor:
    m = Monitor("postgresql://mon:secret@db:5432/app")
    monkeypatch.setattr(m, "_sample_locked", query)
    return m


def test_budgets_asking_at_once_share_one_query(monkeypatch: pytest.MonkeyPatch) -> None:
    query = CountingQuery(seconds=0.01)
    m = monitor(query, monkeypatch)

    async def main() -> list[ServerSample]:
        return await asyncio.gather(*(m.sample() for _ in range(50)))

    samples = asyncio.run(main())
    assert len(query.started) == 1
    assert {s.sampled_at for s in samples} == {1.0}


def test_one_who_asks_during_a_query_gets_the_next_one_not_that_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    query = CountingQuery(seconds=0.05)
    m = monitor(query, monkeypatch)

    async def main() -> tuple[ServerSample, list[ServerSample], list[float]]:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(m.sample())
        await asyncio.sleep(0.02)  # the first query is running
        asked_at = loop.time()
        later = await asyncio.gather(*(m.sample() for _ in range(5)))
        return await first, later, [asked_at]

    first, later, (asked_at,) = asyncio.run(main())
    assert first.sampled_at == 1.0
    # The five that asked meanwhile share a second query, which started after they asked.
    assert {s.sampled_at for s in later} == {2.0}
    assert len(query.started) == 2
    assert query.started[1] >= asked_at
    assert query.most_at_once == 1  # one query at a time on the one connection


def test_callers_one_after_the_other_each_get_a_fresh_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    query = CountingQuery()
    m = monitor(query, monkeypatch)

    async def main() -> list[float]:
        return [(await m.sample()).sampled_at for _ in range(3)]

    assert asyncio.run(main()) == [1.0, 2.0, 3.0]


def test_every_waiter_sees_the_error_and_the_next_ask_tries_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    query = CountingQuery(seconds=0.01, fail=True)
    m = monitor(query, monkeypatch)

    async def main() -> tuple[list[BaseException | ServerSample], ServerSample]:
        failed = await asyncio.gather(*(m.sample() for _ in range(3)), return_exceptions=True)
        query.fail = False
        return failed, await m.sample()

    failed, recovered = asyncio.run(main())
    assert all(
        isinstance(e, ProbeError) and e.failure is ProbeFailure.DATABASE_UNREACHABLE for e in failed
    )
    assert recovered.sampled_at == 2.0


def test_a_cancelled_waiter_does_not_cancel_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    query = CountingQuery(seconds=0.05)
    m = monitor(query, monkeypatch)

    async def main() -> ServerSample:
        gone = asyncio.ensure_future(m.sample())  # a budget deleted while its probe runs
        stays = asyncio.ensure_future(m.sample())
        await asyncio.sleep(0.01)
        gone.cancel()
        return await stays

    assert asyncio.run(main()).sampled_at == 1.0
    assert len(query.started) == 1


class Clock:
    """A settable clock for the monitor (when each query began)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_budgets_due_at_one_slot_share_its_sample_even_one_after_the_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The budgets of a database due at one slot of the poll grid wake one after the other: the
    first starts the slot's query, the others take it, running or done; none queries alone."""
    query, clock = CountingQuery(seconds=0.01), Clock(1000.2)
    m = Monitor("postgresql://mon:secret@db:5432/app", clock=clock)
    monkeypatch.setattr(m, "_sample_locked", query)

    async def main() -> list[float]:
        first = asyncio.ensure_future(m.sample(not_before=1000.0))
        await asyncio.sleep(0.005)  # its query is running
        during = await m.sample(not_before=1000.0)
        after = await m.sample(not_before=1000.0)  # done by now: the same sample
        clock.now = 1010.1
        next_slot = await m.sample(not_before=1010.0)  # the next slot: a new query
        return [(await first).sampled_at, during.sampled_at, after.sampled_at, next_slot.sampled_at]

    assert asyncio.run(main()) == [1.0, 1.0, 1.0, 2.0]
    assert len(query.started) == 2


def test_a_sample_begun_before_the_slot_is_not_taken_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    query, clock = CountingQuery(seconds=0.05), Clock(999.9)
    m = Monitor("postgresql://mon:secret@db:5432/app", clock=clock)
    monkeypatch.setattr(m, "_sample_locked", query)

    async def main() -> tuple[float, float]:
        early = asyncio.ensure_future(m.sample(not_before=990.0))
        await asyncio.sleep(0.01)  # a query begun at 999.9 runs
        clock.now = 1000.05
        slot = await m.sample(not_before=1000.0)  # not that one: it began before the slot
        return (await early).sampled_at, slot.sampled_at

    assert asyncio.run(main()) == (1.0, 2.0)
    assert query.started[1] >= query.started[0]
    assert query.most_at_once == 1
