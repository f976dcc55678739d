"""The benchmarks' arithmetic: spreads, percentiles, cadence, metric parsing, the report."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.__main__ import merged
from bench.common import (
    Spread,
    busy_fraction,
    metric_samples,
    parse_terminations,
    parse_time,
    percentile,
    probe_counts,
    workload_of,
)
from bench.exhaustion import breaches, first_within, seconds_at_least
from bench.footprint import _slope, expected_probes
from bench.report import exhaustion_verdicts, from_json, render, to_json

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


# --- the exhaustion scenario's arithmetic and report ---------------------------------------------


def test_breaches_run_from_the_first_sample_over_to_the_first_back_within() -> None:
    samples = [(0.0, 70), (1.0, 81), (1.5, 85), (2.0, 80), (3.0, 90)]
    assert breaches(samples, 80, end=4.5) == [(1.0, 1.0), (3.0, 1.5)]
    assert breaches([(0.0, 10)], 80, end=9.0) == []


def test_seconds_at_least_holds_each_sample_until_the_next() -> None:
    samples = [(0.0, 96), (1.0, 97), (1.25, 99), (2.0, 50), (3.0, 97)]
    assert seconds_at_least(samples, 97, end=3.5) == pytest.approx(1.0 + 0.5)
    assert seconds_at_least([], 97, end=3.0) == 0.0


def test_first_within_skips_missing_and_early_values() -> None:
    series = [(9.0, 7.0), (10.0, None), (12.0, 3.0), (15.0, 6.0), (16.0, 7.0)]
    assert first_within(series, 7.0, 0.2, since=10.0) == pytest.approx(5.0)
    assert first_within(series, 20.0, 0.2, since=10.0) is None


def test_terminations_are_read_from_postgres_log_with_the_backend_name() -> None:
    text = (
        "2026-12-03 09:30:01.250 UTC [123] app=leak-5d8f7c9b4-x2kq9 FATAL:  terminating "
        "connection due to administrator command\n"
        "2026-12-03 09:30:02.000 UTC [124] app=django-7f9c-abcde FATAL:  terminating connection "
        "due to idle-session timeout\n"
        "2026-12-03 09:30:03.000 UTC [125] app=probe FATAL:  sorry, too many clients already\n"
    )
    found = parse_terminations(text)
    assert [(app, cause) for _, app, cause in found] == [
        ("leak-5d8f7c9b4-x2kq9", "terminated"),
        ("django-7f9c-abcde", "timeout"),
    ]
    assert found[0][0] == pytest.approx(parse_time("2026-12-03T09:30:01.250Z"))
    assert workload_of("leak-5d8f7c9b4-x2kq9") == "leak"
    assert workload_of("probe") == "probe"


def test_busy_fraction_of_two_readings() -> None:
    assert busy_fraction((10.0, 100.0), (15.0, 110.0)) == pytest.approx(0.5)
    assert math.isnan(busy_fraction((1.0, 2.0), (1.0, 2.0)))


def test_a_merge_keeps_the_other_phases_with_their_run() -> None:
    previous = {"date": "d0", "operator": "commit a", "exhaustion": {"x": 1}, "probe": {"y": 2}}
    kept = merged(previous, {"exhaustion"})
    assert kept == {"probe": {"y": 2, "from_run": {"date": "d0", "operator": "commit a"}}}


def _lane(key: str, refused: int, failed: int, **extra: Any) -> dict[str, Any]:
    lane: dict[str, Any] = {
        "strategy": key,
        "refused": {"probe": refused, "apps": 0, "total": refused},
        "probe_attempts": 100,
        "healthy_failed": failed,
        "healthy_requests": 30,
        "healthy_failed_by_outcome": {"terminated": failed},
        "inflight_broken": 0,
        "seconds_over_budget": 0.0,
        "breaches": 0,
        "longest_breach": 0.0,
        "seconds_full": 0.0,
        "peak": 60,
        "backends_ended": {},
        "pods_restarted": {"leak": 0},
        "leak_sent_per_second": 7.0,
        "leak_estimate": None,
    }
    return lane | extra


def test_the_exhaustion_targets_are_computed_from_the_results() -> None:
    estimate = {"driven": 20.0, "first_within": 12.0, "end": 19.5, "classes": {}, "series": []}
    lanes = {
        "none": _lane("none", 1000, 0),
        "ist10": _lane("ist10", 30, 12),
        "cb": _lane("cb", 9, 0, leak_estimate=estimate, operator_events={"LeakDetected": 1}),
    }
    ex = {
        "window": 120.0,
        "warmup": 20.0,
        "setup": {
            "max_connections": 100,
            "usable": 97,
            "budget": 80,
            "spec": {"budget": {"maxConnections": 80}},
            "probe_interval": 0.25,
            "sample_interval": 0.25,
            "leak_pod_rate": 10.0,
            "inflight": {
                "INFLIGHT_FRACTION": "0.3",
                "INFLIGHT_IDLE_MIN": "1",
                "INFLIGHT_IDLE_MAX": "3",
            },
            "healthy": [{"name": "django", "label": "Django", "connections": 3, "gap": [5, 30]}],
            "strategies": {"none": "no guard", "ist10": "ist 10 s", "cb": "connbudget"},
            "targets": {
                "rate_tolerance": 0.2,
                "rate_within": 30.0,
                "breach_within": 2.0,
                "refused_share_at_20": 0.01,
            },
        },
        "rates": {
            "20": {
                "rate": 20.0,
                "leak_pods": 2,
                "cpu_busy": 0.8,
                "cpu_saturated_seconds": 3,
                "cpu_seconds": 120,
                "lanes": lanes,
            }
        },
    }
    verdicts = {t: met for t, _, met in exhaustion_verdicts(ex)}
    assert verdicts["connbudget: at most 1% of no guard's refusals at 20/s"] is True
    assert verdicts["connbudget: 0 healthy requests failed"] is True
    assert verdicts[
        "connbudget: leak rate within 20% of the driven rate within 30 s of the leak starting"
    ]
    side = next(t for t in verdicts if t.startswith("connbudget at 20/s, beside"))
    assert verdicts[side] is True
    text = render(
        {"date": "d", "machine": "m", "repeats": 1, "total_seconds": 60, "exhaustion": ex}
    )
    assert "| connbudget: at most 1% of no guard's refusals at 20/s | 9 vs 1000 (0.90%) |" in text
    assert "![leak of 20/s](tests/bench/charts/exhaustion-20.png)" in text
