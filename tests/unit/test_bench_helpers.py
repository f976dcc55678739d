"""The benchmarks' arithmetic: spreads, percentiles, cadence, metric parsing, the report."""

from __future__ import annotations

import math

import pytest

from bench.common import Spread, metric_samples, percentile, probe_counts
from bench.footprint import _slope, expected_probes
from bench.report import from_json, render, to_json

METRICS = """\
# HELP connbudget_probe_duration_seconds Time to probe the database.
# TYPE connbudget_probe_duration_seconds histogram
connbudget_probe_duration_seconds_bucket{budget="b",le="0.001",namespace="ns"} 0.0
connbudget_probe_duration_seconds_count{budget="b",namespace="ns"} 6.0
connbudget_probe_duration_seconds_sum{budget="b",namespace="ns"} 0.03
connbudget_probe_duration_seconds_count{budget="c",namespace="ns"} 5.0
connbudget_probe_duration_seconds_sum{budget="c",namespace="ns"} 0.05
connbudget_monitor_connections 5.0
"""


def test_a_spread_is_the_median_with_min_and_max() -> None:
    s = Spread.of([3, 1, 2])
    assert (s.median, s.low, s.high, s.n) == (2, 1, 3, 3)
    assert s.show("{:.0f}") == "2 (1-3)"
    assert Spread.of([4]).show("{:.1f}", " ms") == "4.0 ms"
    assert Spread.of([]).show() == "n/a"
    assert to_json(s) == {"median": 2, "min": 1, "max": 3, "n": 3}
    assert from_json({"a": [to_json(s)]}) == {"a": [s]}


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0], 99, 1.0),
        ([float(i) for i in range(1, 21)], 50, 10.0),
        ([float(i) for i in range(1, 21)], 99, 20.0),  # 20 episodes: p99 is the slowest
        ([float(i) for i in range(1, 101)], 99, 99.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50))


def test_cadence_allows_the_worker_tick() -> None:
    assert expected_probes(60) == 5  # a 10 s poll on a 1 s tick: at least every 11 s
    assert expected_probes(40) == 3
    assert expected_probes(10, poll=1) == 5


def test_metric_samples_and_probe_counts_read_prometheus_text() -> None:
    assert metric_samples(METRICS, "connbudget_monitor_connections") == [({}, 5.0)]
    assert probe_counts(METRICS) == {"ns/b": (6.0, 0.03), "ns/c": (5.0, 0.05)}


def test_slope_of_a_line() -> None:
    assert _slope([(0, 100.0), (1, 102.0), (2, 104.0)]) == pytest.approx(2.0)
    assert _slope([(0, 5.0)]) == 0.0


def test_the_report_states_each_target_with_its_verdict() -> None:
    ratio = Spread.of([5.0, 5.2, 5.4])
    results = {
        "date": "2026-11-25 04:00 UTC",
        "machine": "2 CPUs",
        "repeats": 3,
        "operator": "commit abc",
        "total_seconds": 60,
        "probe": {
            "backends1000": {
                "backends": 1000,
                "probe_ms": Spread.of([6.0]),
                "floor_ms": Spread.of([1.2]),
                "ratio": ratio,
                "query_ms": Spread.of([5.0]),
                "query_ratio": Spread.of([4.2]),
                "target_ratio": 1.5,
            }
        },
    }
    text = render(results)
    assert "| probe at most 1.5x its floor at 1,000 backends | 5.20x (5.00-5.40)" in text
    assert "**missed**" in text
    assert "**Why the target is missed.**" in text
    assert text.index("## Targets") < text.index("## 3. Probe cost")
