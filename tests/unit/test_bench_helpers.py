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
from bench.probecost import idle_backends, last_statement, step_figures
from bench.report import exhaustion_verdicts, from_json, render, to_json
from connbudget.model.observations import BackendGroup, ServerSample
from connbudget.policy import fingerprint

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
    from bench.footprint import POLL

    assert expected_probes(60, poll=10) == 5  # a 10 s poll on a 1 s tick: at least every 11 s
    assert expected_probes(40, poll=10) == 3
    assert expected_probes(10, poll=1) == 5
    assert POLL == 5  # the spec's default, read through the operator's parser
    assert expected_probes(60) == 10


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


def _group(app: str, state: str, backends: list[tuple[int, float, float]]) -> BackendGroup:
    return BackendGroup(
        database="app",
        user="app",
        application_name=app,
        client_addr="10.0.0.1",
        state=state,
        count=len(backends),
        max_idle_seconds=max((s for _, s, _ in backends), default=0.0),
        oldest_backend_start=min((t for _, _, t in backends), default=0.0),
        backends=tuple(backends),
    )


def test_the_statements_are_asked_about_idle_client_backends_only() -> None:
    sample = ServerSample(
        sampled_at=100.0,
        database="app",
        max_connections=100,
        reserved=3,
        groups=(
            _group("pod-0", "active", [(1, 0.1, 10.0)]),
            _group("connbudget", "idle", [(2, 5.0, 11.0)]),
            _group("pod-0", "idle", [(3, 9.0, 12.0), (4, 8.0, 13.0)]),
            _group("pod-1", "idle", [(5, 7.0, 14.0)]),
        ),
    )
    assert idle_backends(sample, 2) == [(3, 12.0), (4, 13.0)]
    assert idle_backends(sample, 100) == [(3, 12.0), (4, 13.0), (5, 14.0)]


def test_the_held_connections_run_one_statement_shape_with_their_own_literals() -> None:
    one, two = (last_statement(i).as_string(None) for i in (1, 2))
    assert "'user1@example.com'" in one
    assert one != two
    shapes = [fingerprint.statement_of(q, None) for q in (one, two)]
    assert shapes[0] is not None
    assert shapes[0] == shapes[1]
    assert "example.com" not in shapes[0].text
    assert 80 <= len(one) <= fingerprint.STATEMENT_LIMIT


def test_step_figures_are_ratios_to_the_floor_of_the_same_repeat() -> None:
    medians = [
        {"probe": 0.010, "floor": 0.002, "query": 0.008},
        {"probe": 0.012, "floor": 0.004, "query": 0.010},
    ]
    fig = step_figures(medians)
    assert set(fig) == {"probe_ms", "floor_ms", "ratio", "query_ms", "query_ratio"}
    assert (fig["ratio"].low, fig["ratio"].high) == pytest.approx((3.0, 5.0))
    asked = [m | {"statements": 0.001, "statements_query": 0.0005, "poll": 0.012} for m in medians]
    fig = step_figures(asked)
    assert fig["statements_ms"].median == pytest.approx(1.0)
    assert fig["statements_query_ms"].median == pytest.approx(0.5)
    assert (fig["statements_ratio"].low, fig["statements_ratio"].high) == pytest.approx((0.25, 0.5))
    assert fig["with_statements_ms"].median == pytest.approx(12.0)
    assert (fig["with_statements_ratio"].low, fig["with_statements_ratio"].high) == (
        pytest.approx((3.0, 6.0))
    )


def test_the_probe_section_states_what_asking_for_statements_adds() -> None:
    row = {
        "backends": 1000,
        "probe_ms": Spread.of([1.4]),
        "floor_ms": Spread.of([1.0]),
        "ratio": Spread.of([1.4]),
        "query_ms": Spread.of([1.2]),
        "query_ratio": Spread.of([1.2]),
        "target_ratio": 1.5,
        "statements_asked": 100,
        "statements_found": 100,
        "statements_shown": 100,
        "statement_chars": 121.0,
        "statements_ms": Spread.of([0.9, 1.1, 1.0]),
        "statements_ratio": Spread.of([0.9, 1.1, 1.0]),
        "statements_query_ms": Spread.of([0.6]),
        "with_statements_ms": Spread.of([2.4]),
        "with_statements_ratio": Spread.of([2.4]),
    }
    text = render(
        {
            "date": "d",
            "machine": "m",
            "repeats": 3,
            "total_seconds": 60,
            "probe": {"iterations": 30, "backends1000": row},
        }
    )
    assert "30 calls of each per repeat" in text
    assert "last ran a statement with literals (121 characters" in text
    assert "took 1.00 ms (0.90-1.10) (1.00x (0.90-1.10) the floor)" in text
    assert "its query alone, without decoding or normalising, took 0.60 ms." in text
    assert "took 2.40 ms: 2.40x the floor, against 1.40x for the probe alone" in text
    # An earlier run's figures, without the statements: the section as it was.
    before = {k: v for k, v in row.items() if "statement" not in k}
    text = render(
        {
            "date": "d",
            "machine": "m",
            "repeats": 3,
            "total_seconds": 60,
            "probe": {"backends1000": before},
        }
    )
    assert "naming a leak's statement" not in text
    assert "as 100 pods would hold them.\n" in text
    assert "100 calls of each per repeat" in text


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


# --- the fault run's judges (tests/faults/checks.py): each catches what it is meant to ------------

from faults import checks  # noqa: E402

T0 = 1_800_000_000.0  # an epoch second for the synthetic logs
NS = "faults"


def pg_line(t: float, pid: int, app: str, host: str, level: str, msg: str) -> str:
    import datetime as dt

    stamp = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{stamp} UTC [{pid}] app={app} host={host} {level}:  {msg}"


def selection(**kw: Any) -> checks.Selection:
    base: dict[str, Any] = {
        "budget": "leaky",
        "pods": frozenset({f"{NS}/leaky-1"}),
        "alive": ((T0 - 100, T0 + 1000),),
        "max_pods_per_cycle": 1,
        "cooldown_seconds": 30,
    }
    base.update(kw)
    return checks.Selection(**base)


def seen(pid: int, state: str, t: float, pod: str | None = f"{NS}/leaky-1") -> dict[Any, Any]:
    b = checks.BackendSeen(pid=pid, backend_start=T0 - 50, t=t, state=state, pod=pod, app="x")
    return {(pid, b.backend_start): b}


def ended_at(t: float, pid: int = 42) -> list[checks.PgLogLine]:
    lines = checks.parse_pg_log(
        [pg_line(t, pid, "leaky-1", "198.18.0.5", "FATAL", checks.TERMINATED)]
    )
    return checks.terminations(lines, end=T0 + 1000)


def test_the_pg_log_parser_reads_the_prefix_and_skips_the_servers_own_shutdown() -> None:
    lines = checks.parse_pg_log(
        [
            "2026-01-01 00:00:00.000 UTC [1] LOG:  starting PostgreSQL (no prefix yet)",
            pg_line(T0, 10, "", "", "LOG", "received fast shutdown request"),
            pg_line(T0 + 0.1, 11, "leaky-1", "198.18.0.5", "FATAL", checks.TERMINATED),
            pg_line(T0 + 2, 12, "", "", "LOG", checks.SERVER_READY),
            pg_line(T0 + 3, 13, "leaky-1", "198.18.0.5", "FATAL", checks.TERMINATED),
        ]
    )
    assert len(lines) == 4
    assert lines[1].pid == 11
    assert lines[1].host == "198.18.0.5"
    assert lines[1].t == pytest.approx(T0 + 0.1, abs=0.01)
    assert [line.pid for line in checks.terminations(lines, end=T0 + 10)] == [13]


@pytest.mark.parametrize(
    ("state", "seen_before", "pod", "invariants"),
    [
        pytest.param("idle", 0.2, f"{NS}/leaky-1", [], id="idle-selected"),
        pytest.param("active", 0.2, f"{NS}/leaky-1", ["terminated a backend 'active'"], id="busy"),
        pytest.param(
            "idle in transaction",
            0.2,
            f"{NS}/leaky-1",
            ["terminated a backend 'idle in transaction'"],
            id="in-transaction",
        ),
        pytest.param("active", 10.0, f"{NS}/leaky-1", [], id="busy-but-sample-too-old-to-tell"),
        pytest.param(
            "idle",
            0.2,
            f"{NS}/steady-1",
            ["terminated a backend of an unselected pod"],
            id="steady",
        ),
        pytest.param(
            "idle", 0.2, None, ["terminated a backend of an unselected pod"], id="nobodys"
        ),
    ],
)
def test_terminations_are_judged_by_last_state_and_pod(
    state: str, seen_before: float, pod: str | None, invariants: list[str]
) -> None:
    t = T0 + 100
    _, got = checks.judge_terminations(
        ended=ended_at(t),
        seen=seen(42, state, t - seen_before, pod),
        selections=[selection()],
        min_idle_seconds=3,
    )
    assert [v.invariant for v in got] == invariants


def test_a_termination_of_a_paused_budgets_pod_or_an_unseen_backend_is_a_violation() -> None:
    t = T0 + 100
    paused = selection(paused=((T0 + 50, T0 + 200),))
    _, got = checks.judge_terminations(
        ended=ended_at(t), seen=seen(42, "idle", t - 0.2), selections=[paused], min_idle_seconds=3
    )
    assert [v.invariant for v in got] == ["terminated a backend of an unselected pod"]
    _, got = checks.judge_terminations(
        ended=ended_at(t), seen={}, selections=[selection()], min_idle_seconds=3
    )
    assert [v.invariant for v in got] == ["terminated a backend never seen"]
    # The run's own terminations (the Secret rotation) are not the operator's.
    _, got = checks.judge_terminations(
        ended=ended_at(t), seen={}, selections=[selection()], own=[42], min_idle_seconds=3
    )
    assert got == []


def audit_line(t: float, verb: str, resource: str, name: str, code: int, **extra: Any) -> str:
    import datetime as dt
    import json

    group, _, sub = resource.partition("/")
    ref: dict[str, Any] = {"resource": group, "namespace": NS, "name": name}
    if sub:
        ref["subresource"] = sub
    stamp = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps(
        {
            "stage": "ResponseComplete",
            "verb": verb,
            "objectRef": ref,
            "responseStatus": {"code": code},
            "requestReceivedTimestamp": stamp,
            "stageTimestamp": stamp,
            **extra,
        }
    )


def evictions(*events: tuple[float, str, str, int]) -> list[checks.AuditEvent]:
    return checks.parse_audit(
        [
            audit_line(t, "delete" if r == "pods" else "create", r, name, code)
            for t, r, name, code in events
        ]
    )


def test_evictions_of_selected_pods_within_the_rate_pass() -> None:
    audit = evictions(
        (T0, "pods/eviction", "leaky-1", 201),
        (T0 + 31.5, "pods/eviction", "leaky-2", 201),
        (T0 + 40, "pods/eviction", "leaky-3", 429),  # refused by a PDB: not a restart
    )
    pods = frozenset({f"{NS}/leaky-1", f"{NS}/leaky-2", f"{NS}/leaky-3"})
    judged, got = checks.judge_evictions(
        audit=audit, namespace=NS, selections=[selection(pods=pods)]
    )
    assert (judged, got) == (3, [])


def test_evictions_too_many_per_cooldown_unselected_or_of_a_terminating_pod_are_caught() -> None:
    pods = frozenset({f"{NS}/leaky-1", f"{NS}/leaky-2"})
    audit = evictions(
        (T0, "pods/eviction", "leaky-1", 201),
        (T0 + 10, "pods/eviction", "leaky-2", 201),  # within the 30 s cooldown
        (T0 + 20, "pods/eviction", "steady-1", 201),  # nobody's
        (T0 + 40, "pods", "leaky-3", 200),  # deleted by someone
        (T0 + 45, "pods/eviction", "leaky-3", 200),  # then evicted
    )
    pods |= {f"{NS}/leaky-3"}
    _, got = checks.judge_evictions(audit=audit, namespace=NS, selections=[selection(pods=pods)])
    assert [v.invariant for v in got] == [
        "more evictions than maxPodsPerCycle within cooldownSeconds",
        "evicted an unselected pod",
        "evicted a pod already terminating",
    ]


def test_a_recreated_budget_starts_a_fresh_cooldown() -> None:
    pods = frozenset({f"{NS}/leaky-1", f"{NS}/leaky-2"})
    audit = evictions(
        (T0, "pods/eviction", "leaky-1", 201), (T0 + 20, "pods/eviction", "leaky-2", 201)
    )
    twice = selection(pods=pods, alive=((T0 - 100, T0 + 5), (T0 + 12, T0 + 1000)))
    _, got = checks.judge_evictions(audit=audit, namespace=NS, selections=[twice])
    assert got == []


def lease_write(t: float, holder: str, code: int = 200) -> str:
    return audit_line(
        t,
        "update",
        "leases",
        "connbudget-operator",
        code,
        requestObject={"spec": {"holderIdentity": holder}},
    )


def test_lease_terms_come_from_successful_writes() -> None:
    audit = checks.parse_audit(
        [
            lease_write(T0, "a"),
            lease_write(T0 + 2, "a"),
            lease_write(T0 + 3, "b", code=409),  # lost the race: no term
            lease_write(T0 + 20, "b"),
            lease_write(T0 + 22, "b"),
        ]
    )
    terms = checks.lease_terms(audit, namespace=NS, name="connbudget-operator")
    assert [(t.holder, t.start - T0, t.last_renewal - T0) for t in terms] == [
        ("a", 0, 2),
        ("b", 20, 22),
    ]
    assert checks.judge_terms(terms) == []
    early = checks.lease_terms(
        checks.parse_audit([lease_write(T0, "a"), lease_write(T0 + 5, "b")]),
        namespace=NS,
        name="connbudget-operator",
    )
    assert [v.invariant for v in checks.judge_terms(early)] == [
        "the Lease was taken while its holder could still act"
    ]


def test_an_action_outside_the_replicas_own_term_is_caught() -> None:
    terms = [checks.Term("a", T0, T0 + 30), checks.Term("b", T0 + 50, T0 + 100)]
    ok = checks.Action(T0 + 10, "a", "TerminateIdle", "Succeeded")
    late = checks.Action(T0 + 60, "a", "RestartPods", "Succeeded")  # b's term: a acted
    planned = checks.Action(T0 + 60, "a", "RestartPods", "Planned")  # a dry run does nothing
    judged, got = checks.judge_actions(
        actions=[ok, late, planned], terms=terms, evictions=[], ended=ended_at(T0 + 45)
    )
    assert judged == 3
    assert [v.invariant for v in got] == [
        "a replica acted outside its own lease term",
        "an action while no replica held the Lease",
    ]


def test_an_action_logged_right_after_its_replica_was_frozen_is_judged_before_the_freeze() -> None:
    # The fault run: the leader was frozen 28.6 s with an eviction done; it logged the action
    # 3 ms after it woke, in the next term, and the audit log had the eviction in its own term.
    terms = [checks.Term("a", T0, T0 + 20), checks.Term("b", T0 + 35, T0 + 100)]
    woke = checks.Action(T0 + 40.003, "a", "RestartPods", "Succeeded")
    _, caught = checks.judge_actions(actions=[woke], terms=terms, evictions=[], ended=[])
    assert [v.invariant for v in caught] == ["a replica acted outside its own lease term"]
    frozen = [("a", T0 + 11.4, T0 + 40.0)]
    _, got = checks.judge_actions(
        actions=[woke], terms=terms, evictions=[], ended=[], frozen=frozen
    )
    assert got == []
    # Acting long after it woke is still caught.
    late = checks.Action(T0 + 60, "a", "RestartPods", "Succeeded")
    _, got = checks.judge_actions(
        actions=[late], terms=terms, evictions=[], ended=[], frozen=frozen
    )
    assert [v.invariant for v in got] == ["a replica acted outside its own lease term"]


def test_actions_identity_and_tracebacks_are_read_from_a_replicas_log() -> None:
    import json

    log = [
        json.dumps(
            {
                "time": "2027-01-15T08:00:00.000+00:00",
                "message": "leader election",
                "identity": "host-abc",
            }
        ),
        json.dumps(
            {
                "time": "2027-01-15T08:00:05.000+00:00",
                "message": "action",
                "action": "TerminateIdle",
                "result": "Succeeded",
                "detail": "3 backends",
            }
        ),
        json.dumps(
            {
                "time": "2027-01-15T08:00:06.000+00:00",
                "message": "boom",
                "exception": "Traceback (most recent call last):\n...",
            }
        ),
    ]
    identity, acts, tracebacks = checks.parse_actions(log)
    assert identity == "host-abc"
    assert [(a.replica, a.step, a.result) for a in acts] == [
        ("host-abc", "TerminateIdle", "Succeeded")
    ]
    assert len(tracebacks) == 1


def status(t: float, ready: str, probe: float | None) -> checks.StatusSample:
    return checks.StatusSample(t=T0 + t, budget="leaky", ready=ready, probe_time=probe)


def test_a_fault_noticed_and_recovered_in_time_passes_and_a_late_one_is_caught() -> None:
    fault = checks.Fault("pg_stall", T0, T0 + 15, ("leaky",), notice=("DatabaseUnreachable",))
    good = [
        status(1, "True:ProbeSucceeded", T0),
        status(7, "False:DatabaseUnreachable", T0 + 6),
        status(17, "True:ProbeSucceeded", T0 + 16.5),
    ]
    out = checks.judge_fault(fault, good, notice_within=10, recover_within=30)
    assert out.violations == []
    assert out.noticed_after == pytest.approx(7)
    assert out.recovered_after == pytest.approx(2)
    late = [
        status(12, "False:DatabaseUnreachable", T0 + 11),
        status(17, "True:ProbeSucceeded", T0 + 10),  # a stale probe is not a recovery
    ]
    out = checks.judge_fault(fault, late, notice_within=10, recover_within=30)
    assert [v.invariant for v in out.violations] == [
        "a fault not noticed in status in time",
        "a fault not recovered from in time",
    ]


def test_rss_growth_compares_the_last_fifth_with_the_first() -> None:
    flat = [(T0 + i, 80.0 + (i % 3)) for i in range(100)]
    assert checks.growth_mb(flat, warmup=10) == pytest.approx(0, abs=1.5)
    leak = [(T0 + i, 80.0 + i * 0.5) for i in range(100)]
    assert checks.growth_mb(leak, warmup=10) == pytest.approx(36, abs=3)
    assert checks.growth_mb(leak[:5], warmup=0) is None


def test_the_fault_run_section_reports_its_figures_and_its_verdict() -> None:
    from bench.report import _faults

    targets: list[tuple[str, str, str]] = []
    run = {
        "seed": 12,
        "duration_s": 1800,
        "date": "2027-01-15 08:00 UTC",
        "faults": {"pg_stall": 2, "leader_kill": 1},
        "faults_injected": 3,
        "time_to_notice_s": {"pg_stall": [7.4, 8.0], "leader_kill": []},
        "time_to_recover_s": {"pg_stall": [1.5, 2.5], "leader_kill": [1.4]},
        "leader_takeover_s": {"leader_kill": [15.6]},
        "checked": {
            "terminations": 80,
            "evictions": 8,
            "lease_terms": 3,
            "operator_actions": 19,
            "replicas_started": 3,
            "status_samples": 600,
        },
        "rss_growth_mb": {"1": 0.4, "2": None},
        "violations": [],
    }
    text = "\n".join(_faults(run, targets))
    assert "| pg_stall | 2 | 8.0 (7.4-8.0) | 2.5 (1.5-2.5) |" in text
    assert "Lease taken over after 15.6" in text
    assert "Violations: 0." in text
    assert targets == [("fault run: no invariant broken", "0 violations in 3 faults", "**met**")]


def test_a_lease_not_taken_over_in_time_after_the_leader_stopped_is_caught() -> None:
    terms = [checks.Term("a", T0, T0 + 10), checks.Term("b", T0 + 27, T0 + 60)]
    took, got = checks.judge_takeover(killed_at=T0 + 11, old_holder="a", terms=terms, within=25)
    assert (took, got) == (16, [])
    took, got = checks.judge_takeover(killed_at=T0 + 1, old_holder="a", terms=terms, within=25)
    assert took == 26
    assert [v.invariant for v in got] == ["nobody took over the Lease in time"]
    _, got = checks.judge_takeover(killed_at=T0 + 40, old_holder="b", terms=terms, within=25)
    assert "never" in got[0].evidence


def test_a_recovery_needs_no_probe_newer_than_the_fault_only_newer_than_its_failures() -> None:
    # Found by the fault run: a replica that took over before the fault's end wrote its status
    # then, and the next write that moves only lastProbeTime comes a heartbeat (60 s) later.
    fault = checks.Fault("leader_kill", T0, T0 + 24, ("leaky",))
    taken_over = [
        status(1, "True:ProbeSucceeded", T0 - 30),  # the killed leader's last write
        status(17, "True:ProbeSucceeded", T0 + 16),  # the new leader's first
        status(25, "True:ProbeSucceeded", T0 + 16),
    ]
    assert checks.recovered_at(fault, taken_over, "leaky") == T0 + 25
    # lastProbeTime has whole seconds: a probe in the fault's first second counts.
    paused = checks.Fault("budget_pause", T0 + 0.6, T0 + 12, ("leaky",))
    assert checks.recovered_at(paused, [status(13, "True:ProbeSucceeded", T0)], "leaky") == T0 + 13
    # No probe since the fault began (a replica stuck): not recovered.
    assert checks.recovered_at(fault, [status(25, "True:ProbeSucceeded", T0 - 30)], "leaky") is None
    # Ready again only on a probe at least as new as the last failed one.
    failed = [
        status(5, "False:DatabaseUnreachable", T0 + 5),
        status(25, "True:ProbeSucceeded", T0 + 3),
        status(26, "True:ProbeSucceeded", T0 + 26),
    ]
    assert checks.recovered_at(fault, failed, "leaky") == T0 + 26


# The footprint section: every figure from the run's data (issue: no figure typed into prose).
FOOTPRINT_SETUP = {
    "namespaces": 13,
    "pods": 777,
    "databases": 7,
    "poll_seconds": 17,
    "settle_seconds": 19,
    "target_budgets": 777,
    "rss_target_mb": 222.0,
    "cpu_target_percent": 3.0,
}
IMPORT_RSS = {
    "interpreter": 9.4,
    "operator": 96.6,
    "kopf": 58.4,
    "kubernetes": 47.3,
    "psycopg": 36.2,
    "prometheus_client": 25.1,
}


def _fp_row(budgets: int, rss: float, cpu: float, probes: list[float], **extra: Any) -> Any:
    return {
        "budgets": budgets,
        "rss_mb": rss,
        "cpu_percent": cpu,
        "probes_per_budget": Spread.of(probes),
        "window_seconds": 41.0,
        "expected_probes_min": 2,
        "cadence_kept": True,
        "db_connections": extra.get("db", 1),
        "databases": extra.get("db", 1),
        "probe_ms_mean": extra.get("ms", 2.5),
        "warnings_no_pods_selected": 0,
    }


def _fp_run(top: int, **extra: Any) -> dict[str, Any]:
    return {
        "rows": {
            "1": _fp_row(1, 131.3, 0.11, [3.0]),
            str(top): _fp_row(top, 333.3, 4.44, [2.0, 3.0, 3.0], db=7, ms=6.6),
        },
        "marginal": {"rss_kb_per_budget": 265.0, "cpu_percent_per_100_budgets": 0.55},
        **extra,
    }


def test_the_footprint_section_renders_every_figure_from_the_run() -> None:
    import re

    from bench.report import _footprint

    targets: list[tuple[str, str, str]] = []
    run = _fp_run(777, setup=FOOTPRINT_SETUP, import_rss_mb=IMPORT_RSS, import_rss_repeats=5)
    text = "\n".join(_footprint(run, targets))
    assert "the median of 5 interpreters each. The operator 97 MB; kopf 58 MB" in text
    assert "the Kubernetes client 47 MB, psycopg 36 MB, prometheus_client 25 MB" in text
    assert "the bare interpreter's 9 MB" in text
    assert "importing the operator takes 97 MB of it (above)" in text
    assert "add the rest, about 35 MB" in text  # 131.3 MB with one budget, less the imports
    assert "stays within 222 MB up to about 350 budgets" in text  # (222 - 131.3) * 1024 / 265
    assert "poll costs about 1.0 ms of CPU" in text  # 4.44 % of a core * 17 s / 777 budgets
    assert "(17 s) spread over 13 namespaces and 7 databases" in text
    assert [t for t, _, _ in targets[:2]] == [
        "at most 222 MB resident at 777 budgets",
        "at most 3 % of one core at 777 budgets",
    ]
    # Every number in the section: the data's, the setup's, or computed from them.
    allowed = {
        *("4", "17", "13", "7", "777", "19"),  # heading, setup
        *("1", "131.3", "0.11", "3", "41", "2", "2.5"),  # one budget's row
        *("333.3", "4.44", "6.6"),  # the top row
        *("265", "0.55", "100"),  # marginal cost (per 100 budgets)
        *("5", "97", "58", "47", "36", "25", "9"),  # import memory
        *("131", "35", "222", "350", "1.0"),  # why: derived from the above
        "18.7",  # why: the whole operator's CPU per poll with one budget (0.11 % of 17 s)
    }
    assert set(re.findall(r"\d+(?:\.\d+)?", text)) <= allowed


def test_the_footprint_section_leaves_import_memory_out_for_a_run_that_did_not_measure_it() -> None:
    from bench.footprint import CPU_TARGET_PERCENT, RSS_TARGET_MB, TARGET_BUDGETS
    from bench.report import _footprint

    targets: list[tuple[str, str, str]] = []
    # An older results.json: no import figures and no recorded setup (today's constants).
    text = "\n".join(_footprint(_fp_run(TARGET_BUDGETS), targets))
    assert "Import memory" not in text
    assert "a fixed cost: the operator's imports, the client's worker threads" in text
    assert "importing the operator takes" not in text
    assert [t for t, _, _ in targets[:2]] == [
        f"at most {RSS_TARGET_MB:g} MB resident at {TARGET_BUDGETS} budgets",
        f"at most {CPU_TARGET_PERCENT:g} % of one core at {TARGET_BUDGETS} budgets",
    ]


def test_the_footprint_section_types_no_figure_into_its_prose() -> None:
    import ast
    import inspect
    import re

    from bench import report

    tree = ast.parse(inspect.getsource(report))
    funcs = [
        f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("_footprint")
    ]
    assert {f.name for f in funcs} >= {"_footprint", "_footprint_imports"}
    specs = {
        id(c)
        for f in funcs
        for v in ast.walk(f)
        if isinstance(v, ast.FormattedValue) and v.format_spec
        for c in ast.walk(v.format_spec)
    }
    # Prose has spaces; keys ("cpu_percent_per_100_budgets") and format strings have none.
    prose = [
        c.value
        for f in funcs
        for c in ast.walk(f)
        if isinstance(c, ast.Constant)
        and isinstance(c.value, str)
        and " " in c.value
        and id(c) not in specs
    ]
    # The section's number and a unit ("% of a core per 100 budgets") are not figures.
    typed = [
        p for p in prose if re.search(r"\d", p.replace("## 4. ", "").replace("per 100 budgets", ""))
    ]
    assert typed == []
    # Numbers in the code are unit conversions only (%, ms, KB); targets come from the setup.
    numbers = {
        c.value
        for f in funcs
        for c in ast.walk(f)
        if isinstance(c, ast.Constant) and type(c.value) in (int, float)
    }
    assert numbers <= {0, 1, 100, 1000, 1024}


def test_import_rss_reads_a_fresh_interpreters_resident_memory_per_entry() -> None:
    from bench.footprint import IMPORTS, import_rss_mb

    got = import_rss_mb({"interpreter": (), "decimal": ("decimal", "json")}, repeats=1)
    assert list(got) == ["interpreter", "decimal"]
    assert all(mb > 1 for mb in got.values())
    assert list(IMPORTS)[:2] == ["interpreter", "operator"]


def test_the_footprint_section_judges_the_scale_targets_from_the_rows() -> None:
    from bench.footprint import footprint_setup
    from bench.report import _footprint

    setup = {**footprint_setup(), "ratio_budgets": 40, "memory_budgets": 80}
    run = {
        "rows": {
            "1": _fp_row(1, 100.0, 0.5, [3.0]),
            "40": _fp_row(40, 101.0, 4.0, [3.0]),
            "80": _fp_row(80, 103.0, 6.0, [3.0]),
        },
        "marginal": {"rss_kb_per_budget": 38.9, "cpu_percent_per_100_budgets": 6.9},
        "setup": setup,
    }
    targets: list[tuple[str, str, str]] = []
    _footprint(run, targets)
    found = {t: (v, ok) for t, v, ok in targets}
    ratio = next(k for k in found if k.startswith("CPU scales with databases: 40 budgets"))
    assert found[ratio][0] == "8.0x (4.00 % vs 0.50 %)"  # 4.0 / 0.5
    assert "met" in found[ratio][1]
    memory = next(k for k in found if k.startswith("80 budgets on one replica"))
    assert found[memory][0] == "103.0 MB, 39 KB per budget"  # 3 MB over 79 budgets
    assert "missed" in found[memory][1]  # 39 KB > 25 KB
