"""The client's token bucket (``kube.flow``): a burst, then a steady rate, in order; deferrable
work only while the bucket is at least half full."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connbudget.kube.flow import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def bucket(qps: float, burst: int) -> tuple[TokenBucket, Clock]:
    clock = Clock()
    return TokenBucket(qps, burst, clock=clock, sleep=clock.sleep), clock


def test_a_burst_goes_at_once_then_calls_go_at_the_rate() -> None:
    b, clock = bucket(10.0, 5)

    async def main() -> list[float]:
        times = []
        for _ in range(25):
            await b.take()
            times.append(clock.now)
        return times

    times = asyncio.run(main())
    assert times[:5] == [0.0] * 5
    assert times[-1] == pytest.approx(2.0)  # 20 more at 10 a second
    gaps = [later - earlier for earlier, later in itertools.pairwise(times[5:])]
    assert all(g == pytest.approx(0.1) for g in gaps)


def test_waiters_take_their_turn_in_the_order_they_came() -> None:
    b, _ = bucket(5.0, 1)
    order: list[int] = []

    async def one(i: int) -> None:
        await b.take()
        order.append(i)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(8)))

    asyncio.run(main())
    assert order == list(range(8))


def test_spare_while_at_least_half_full() -> None:
    b, clock = bucket(10.0, 10)
    assert b.spare()
    for _ in range(6):
        assert b.try_take()
    assert not b.spare()  # 4 left of 10
    clock.now += 0.1
    assert b.spare()  # 5 again


def test_no_limit_with_qps_zero() -> None:
    b, clock = bucket(0.0, 1)
    assert all(b.try_take() for _ in range(1000))
    asyncio.run(b.take())
    assert b.spare()
    assert clock.now == 0.0


@pytest.mark.parametrize(("qps", "burst"), [(-1.0, 10), (10.0, 0)])
def test_a_bucket_that_cannot_work_is_refused(qps: float, burst: int) -> None:
    with pytest.raises(ValueError, match="qps >= 0 and burst >= 1"):
        TokenBucket(qps, burst)


@settings(max_examples=200, deadline=None)
@given(
    qps=st.floats(min_value=0.5, max_value=200.0),
    burst=st.integers(min_value=1, max_value=50),
    gaps=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=60),
)
def test_never_more_than_the_burst_plus_the_rate(qps: float, burst: int, gaps: list[float]) -> None:
    """However calls arrive, those let through by ``t`` number at most burst + qps x t."""
    b, clock = bucket(qps, burst)
    taken = 0
    for gap in gaps:
        clock.now += gap
        while b.try_take():
            taken += 1
        assert taken <= burst + qps * clock.now + 1e-6


def test_the_time_calls_waited_is_a_counter_read_at_each_scrape() -> None:
    from prometheus_client import generate_latest

    from connbudget.report.metrics import Metrics

    b, _ = bucket(10.0, 1)
    metrics = Metrics()
    metrics.count_throttling(lambda: b.waited)

    def scraped() -> str:
        return generate_latest(metrics.registry).decode()

    assert "connbudget_kube_throttled_seconds_total 0.0" in scraped()

    async def three() -> None:
        for _ in range(3):
            await b.take()

    asyncio.run(three())
    assert b.waited == pytest.approx(0.2)  # the first went at once, two waited 0.1 s each
    assert "connbudget_kube_throttled_seconds_total 0.2" in scraped()
