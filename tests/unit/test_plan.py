"""The remediation plan: levels, breach timing, gentle-first escalation, limits, pause, dry-run."""

from __future__ import annotations

import dataclasses

import pytest

from connbudget.model.actions import RestartPod, ScalePooler, TerminateBackends
from connbudget.model.observations import PoolerSample
from connbudget.model.spec import AttributionMode, ObjectRef, RestartMethod, Step
from connbudget.policy import attribution, plan, usage
from connbudget.policy.plan import Hold, Level, Memory, Transition
from unit.builders import NOW, active_group, idle_group, pod, run, spec

WEB1, WEB2, WORKER = (
    pod("web-1", "10.0.0.1"),
    pod("web-2", "10.0.0.2"),
    pod("worker-1", "10.0.0.9", app="worker", owner="worker"),
)
OVER = Memory(level=Level.OVER, breach_since=NOW - 20)  # over the budget for 20 s already


def terminated(d: plan.Decision) -> list[tuple[str, float]]:
    return [
        (b.pod, b.idle_seconds)
        for a in d.actions
        if isinstance(a, TerminateBackends)
        for b in a.backends
    ]


def restarts(d: plan.Decision) -> list[RestartPod]:
    return [a for a in d.actions if isinstance(a, RestartPod)]


def test_within_budget_nothing_happens() -> None:
    d = run(spec(), [WEB1], [idle_group(WEB1, [5.0] * 10)])
    assert d.level is Level.WITHIN
    assert d.actions == ()
    assert d.transition is None


def test_crossing_the_warning_line_warns_once() -> None:
    d = run(spec(), [WEB1], [idle_group(WEB1, [5.0] * 64)])
    assert d.level is Level.WARNING
    assert d.transition is Transition.WARNING
    again = run(spec(), [WEB1], [idle_group(WEB1, [5.0] * 64)], memory=d.memory)
    assert again.transition is None


def test_a_short_breach_waits_for_the_breach_window() -> None:
    d = run(spec(), [WEB1], [idle_group(WEB1, [30.0] * 85)])
    assert d.level is Level.OVER
    assert d.transition is Transition.EXCEEDED
    assert d.actions == ()
    assert [h[1] for h in d.holds] == [Hold.BREACH_WINDOW]
    assert d.memory.breach_since == NOW


def test_a_sustained_breach_terminates_longest_idle_first_down_to_the_warning_line() -> None:
    idles = [float(i) for i in range(20, 105)]  # 85 idle backends, 20..104 s idle
    d = run(spec(), [WEB1], [idle_group(WEB1, idles)], memory=OVER)
    got = terminated(d)
    # 85 counted, warning line 64: terminate 22 so usage falls below it.
    assert len(got) == 22
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    assert got[0][1] == 104.0
    assert restarts(d) == []
    assert d.memory.episode_since == NOW
    assert d.memory.cleaned_pods == ("web-1",)


def test_a_fast_leak_is_acted_on_at_once() -> None:
    history = [(NOW - 4 + i, 60 + 8 * i) for i in range(5)]  # 8 connections per second
    d = run(spec(), [WEB1], [idle_group(WEB1, [12.0] * 92)], history=history)
    assert d.memory.breach_since == NOW  # the breach has just begun...
    assert d.seconds_to_full is not None
    assert d.seconds_to_full < 15
    assert terminated(d)  # ...but the server would be full before breachSeconds


def test_leaked_backends_are_terminated_whatever_the_budget_says() -> None:
    d = run(spec(), [WEB1], [idle_group(WEB1, [400.0, 350.0, 5.0])])
    assert d.level is Level.WITHIN
    assert terminated(d) == [("web-1", 400.0), ("web-1", 350.0)]
    assert d.memory.episode_since is None


def test_active_and_idle_in_transaction_backends_are_never_terminated() -> None:
    groups = [active_group(WEB1, 50), active_group(WEB1, 40, state="idle in transaction")]
    d = run(spec(), [WEB1], groups, memory=OVER)
    assert d.level is Level.OVER
    assert d.actions == ()


def test_a_reused_pool_is_not_emptied_when_the_leak_is_elsewhere() -> None:
    steady = pod("web-steady", "10.0.0.5")
    groups = [idle_group(WEB1, [40.0] * 80), idle_group(steady, [12.0] * 5)]
    d = run(spec(), [WEB1, steady], groups, memory=OVER)
    pods = {p for p, _ in terminated(d)}
    assert pods == {"web-1"}


def test_pods_outside_the_selector_are_never_touched() -> None:
    groups = [idle_group(WORKER, [500.0] * 90)]
    d = run(
        spec(),
        [WEB1, WORKER],
        groups,
        memory=Memory(
            level=Level.OVER, escalation=2, episode_since=NOW - 60, breach_since=NOW - 60
        ),
    )
    assert d.level is Level.OVER
    assert d.actions == ()


def test_still_breached_next_cycle_escalates_to_restarting_the_worst_pod() -> None:
    groups = [idle_group(WEB1, [40.0] * 60), idle_group(WEB2, [40.0] * 30)]
    first = run(spec(), [WEB1, WEB2], groups, memory=OVER)
    assert terminated(first)
    assert restarts(first) == []
    second = run(spec(), [WEB1, WEB2], groups, memory=first.memory, now=NOW + 10)
    (r,) = restarts(second)
    assert (r.pod, r.method) == ("web-1", RestartMethod.EVICT)
    assert second.memory.cooldown_until == NOW + 10 + 60


def test_restarts_wait_for_the_cooldown_but_terminations_do_not() -> None:
    groups = [idle_group(WEB1, [40.0] * 90)]
    memory = Memory(
        level=Level.OVER,
        breach_since=NOW - 60,
        episode_since=NOW - 50,
        escalation=1,
        cooldown_until=NOW + 30,
    )
    d = run(spec(), [WEB1], groups, memory=memory)
    assert restarts(d) == []
    assert (Step.RESTART_PODS, Hold.COOLDOWN) in [(s, h) for s, h, _ in d.holds]
    assert terminated(d)


def test_young_pods_are_not_restarted() -> None:
    young = pod("web-9", "10.0.0.7", age=30)
    memory = Memory(level=Level.OVER, breach_since=NOW - 60, episode_since=NOW - 50, escalation=1)
    d = run(spec(), [young], [idle_group(young, [40.0] * 90)], memory=memory)
    assert restarts(d) == []
    assert Hold.MIN_POD_AGE in [h for _, h, _ in d.holds]


def test_terminating_pods_are_not_restarted_again() -> None:
    leaving = pod("web-1", "10.0.0.1", terminating=True)
    memory = Memory(level=Level.OVER, breach_since=NOW - 60, episode_since=NOW - 50, escalation=1)
    d = run(
        spec(),
        [leaving, WEB2],
        [idle_group(leaving, [40.0] * 60), idle_group(WEB2, [40.0] * 30)],
        memory=memory,
    )
    assert [r.pod for r in restarts(d)] == ["web-2"]


def test_max_pods_per_cycle_bounds_restarts() -> None:
    pods = [pod(f"web-{i}", f"10.0.1.{i}") for i in range(5)]
    groups = [idle_group(p, [40.0] * 20) for p in pods]
    memory = Memory(level=Level.OVER, breach_since=NOW - 60, episode_since=NOW - 50, escalation=1)
    s = spec(remediation__restartPods={"maxPodsPerCycle": 2})
    assert len(restarts(run(s, pods, groups, memory=memory))) == 2


def test_rollout_restart_targets_each_owner_once() -> None:
    pods = [pod(f"web-{i}", f"10.0.1.{i}") for i in range(3)]
    groups = [idle_group(p, [40.0] * 30) for p in pods]
    memory = Memory(level=Level.OVER, breach_since=NOW - 60, episode_since=NOW - 50, escalation=1)
    s = spec(remediation__restartPods={"maxPodsPerCycle": 3, "method": "RolloutRestart"})
    (r,) = restarts(run(s, pods, groups, memory=memory))
    assert r.targets == ("Deployment/web",)


def test_a_pod_that_re_leaks_after_termination_is_restarted() -> None:
    memory = Memory(
        level=Level.OVER,
        breach_since=NOW - 60,
        episode_since=NOW - 50,
        escalation=0,
        cleaned_pods=("web-2",),
    )
    groups = [idle_group(WEB1, [40.0] * 50), idle_group(WEB2, [15.0] * 40)]
    d = run(spec(), [WEB1, WEB2], groups, memory=memory)
    assert [r.pod for r in restarts(d)] == ["web-2"]


def test_when_terminate_finds_nothing_the_next_step_acts_in_the_same_cycle() -> None:
    s = spec(remediation__terminateIdle={"minIdleSeconds": 10})
    only_pooled = pod("web-1", "10.0.0.1")
    d = run(s, [only_pooled], [idle_group(only_pooled, [5.0] * 90)], memory=OVER)
    # Nothing is idle long enough to terminate, and nothing looks leaked: no restart either.
    assert d.actions == ()
    assert d.memory.escalation == 2  # walked through every step


def test_paused_plans_nothing() -> None:
    d = run(spec(), [WEB1], [idle_group(WEB1, [400.0] * 90)], memory=OVER, paused=True)
    assert d.actions == ()
    assert [h for _, h, _ in d.holds] == [Hold.PAUSED]


def test_dry_run_plans_and_advances_the_cooldown() -> None:
    s = spec(remediation__dryRun=True)
    memory = Memory(level=Level.OVER, breach_since=NOW - 60, episode_since=NOW - 50, escalation=1)
    d = run(s, [WEB1], [idle_group(WEB1, [40.0] * 90)], memory=memory)
    assert d.dry_run
    assert restarts(d)
    assert d.memory.cooldown_until == NOW + 60


def test_back_under_the_budget_is_not_yet_recovery() -> None:
    memory = Memory(level=Level.OVER, breach_since=NOW - 60, episode_since=NOW - 50, escalation=1)
    between = run(spec(), [WEB1], [idle_group(WEB1, [5.0] * 70)], memory=memory)
    assert between.level is Level.WARNING
    assert between.transition is None
    assert between.memory.episode_since == NOW - 50
    below = run(spec(), [WEB1], [idle_group(WEB1, [5.0] * 30)], memory=between.memory)
    assert below.level is Level.WITHIN
    assert below.transition is Transition.RECOVERED
    assert below.memory == Memory(level=Level.WITHIN)


POOLER = ObjectRef(api_version="apps/v1", kind="Deployment", name="pgbouncer")


def scale(
    *, connections: int, server: int, replicas: int, waiting: int = 0, breached: bool
) -> ScalePooler | None:
    s = spec(
        pooler={
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgbouncer"},
            "minReplicas": 1,
            "maxReplicas": 4,
            "serverConnectionsPerReplica": 20,
        }
    )
    u = usage.Usage(
        connections=connections,
        budget=80,
        warning_line=64,
        server_max_connections=100,
        reserved=3,
        server_total=connections,
        leaked=0,
        unattributed=0,
        by_owner=(),
    )
    return plan.plan_scaling(
        spec=s,
        usage=u,
        breached=breached,
        pooler=PoolerSample(replicas=replicas, clients_waiting=waiting, server_connections=server),
    )


@pytest.mark.parametrize(
    ("kwargs", "desired"),
    [
        pytest.param(
            {"connections": 90, "server": 60, "replicas": 3, "breached": True}, 2, id="down-to-fit"
        ),
        pytest.param(
            {"connections": 90, "server": 80, "replicas": 4, "breached": True},
            3,
            id="down-until-it-fits",
        ),
        pytest.param(
            {"connections": 90, "server": 20, "replicas": 1, "breached": True}, None, id="at-min"
        ),
        pytest.param(
            {"connections": 40, "server": 20, "replicas": 1, "waiting": 5, "breached": False},
            2,
            id="up-clients-waiting",
        ),
        pytest.param(
            {"connections": 70, "server": 20, "replicas": 1, "waiting": 5, "breached": False},
            None,
            id="no-room-to-grow",
        ),
        pytest.param(
            {"connections": 40, "server": 20, "replicas": 4, "waiting": 5, "breached": False},
            None,
            id="at-max",
        ),
    ],
)
def test_pooler_scaling(kwargs: dict[str, int | bool], desired: int | None) -> None:
    got = scale(**kwargs)  # type: ignore[arg-type]
    assert (got.desired if got else None) == desired


def test_backends_from_a_reused_ip_are_not_pinned_on_the_new_pod() -> None:
    new = pod("web-new", "10.0.0.1", age=30)  # took the IP of a pod that died
    old_backends = idle_group(new, [100.0] * 3, start_age=200)
    old_backends = dataclasses.replace(old_backends, application_name="web-dead")
    idx = attribution.PodIndex.build([new])
    (a,) = attribution.attribute_backends(
        groups=[old_backends], index=idx, mode=AttributionMode.AUTO
    )
    assert a.pod is None
    fresh = idle_group(new, [5.0], start_age=10)
    (b,) = attribution.attribute_backends(groups=[fresh], index=idx, mode=AttributionMode.AUTO)
    assert b.pod == new
    assert b.via is attribution.Via.CLIENT_ADDR


def test_a_relapse_in_the_same_episode_acts_without_a_second_breach_window() -> None:
    memory = Memory(level=Level.WARNING, episode_since=NOW - 30, escalation=1)
    d = run(spec(), [WEB1], [idle_group(WEB1, [40.0] * 85)], memory=memory)
    assert d.memory.breach_since == NOW  # a new breach...
    assert terminated(d)  # ...acted on at once


def test_the_forecast_counts_the_poll_interval() -> None:
    # Full in 23 s: after the 15 s window, but before the poll after it (10 s cadence).
    history = [(NOW - 4 + i, 70 + i) for i in range(5)]  # 1 connection per second, 74 now
    s = spec(remediation={"breachSeconds": 15}, pollSeconds=10)
    d = run(s, [WEB1], [idle_group(WEB1, [12.0] * 81)], history=history)
    assert d.seconds_to_full is not None
    assert 15 < d.seconds_to_full < 15 + 10
    assert terminated(d)


def test_pods_sharing_one_address_are_told_apart_by_application_name() -> None:
    a, b = pod("web-a", "10.0.0.50"), pod("web-b", "10.0.0.50")  # hostNetwork: the node's IP
    idx = attribution.PodIndex.build([a, b])
    (got,) = attribution.attribute_backends(
        groups=[idle_group(b, [5.0])], index=idx, mode=AttributionMode.AUTO
    )
    assert got.pod == b
    assert got.via is attribution.Via.APPLICATION_NAME
    (none,) = attribution.attribute_backends(
        groups=[idle_group(b, [5.0])], index=idx, mode=AttributionMode.CLIENT_ADDR
    )
    assert none.pod is None
