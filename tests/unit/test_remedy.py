"""Knowing what the remedy does: container restarts that follow the operator's terminations.

Measured before: a node-postgres leak without an ``error`` listener was held by crash-looping the
app (28 container restarts in 180 s, serving 35 % of the time), and the operator never noticed.
"""

from __future__ import annotations

import dataclasses

from connbudget.kube.pods import pod_info_from_body
from connbudget.model.actions import RestartPod, TerminateBackends
from connbudget.model.observations import PodInfo
from connbudget.policy import plan
from connbudget.policy.remedy import CRASH_WINDOW_SECONDS, REMEMBER_SECONDS, RemedyWatch
from unit.builders import NOW, idle_group, leaking, pod, run, spec

WEB1, WEB2 = pod("web-1", "10.0.0.1"), pod("web-2", "10.0.0.2")
OVER = plan.Memory(level=plan.Level.OVER, breach_since=NOW - 20)


def restarted(p: PodInfo, n: int) -> PodInfo:
    return dataclasses.replace(p, restarts=n)


def test_restarts_after_terminations_twice_mean_the_owner_dies_on_termination() -> None:
    watch = RemedyWatch()
    assert watch.observe([WEB1, WEB2], at=NOW) == ()
    watch.terminated(["web-1"], at=NOW + 1)
    assert watch.observe([restarted(WEB1, 1), WEB2], at=NOW + 5) == ()  # once may be the app's
    watch.terminated(["web-1", "web-2"], at=NOW + 20)
    assert watch.observe([restarted(WEB1, 1), restarted(WEB2, 1)], at=NOW + 24) == (
        "Deployment/web",
    )
    assert watch.dies_on_termination() == {"Deployment/web"}
    # Said once; still known.
    watch.terminated(["web-1"], at=NOW + 30)
    assert watch.observe([restarted(WEB1, 2), restarted(WEB2, 1)], at=NOW + 33) == ()
    assert watch.dies_on_termination() == {"Deployment/web"}
    # It holds REMEMBER_SECONDS: a fix rolled out gets tried again afterwards.
    watch.observe([restarted(WEB1, 2), restarted(WEB2, 1)], at=NOW + 34 + REMEMBER_SECONDS)
    assert watch.dies_on_termination() == frozenset()


def test_restarts_without_a_termination_before_them_are_the_apps_own() -> None:
    watch = RemedyWatch()
    watch.observe([WEB1], at=NOW)
    for i in range(1, 5):
        watch.observe([restarted(WEB1, i)], at=NOW + 10 * i)
    assert watch.dies_on_termination() == frozenset()
    # ... and so are restarts long after a termination.
    watch.terminated(["web-1"], at=NOW + 100)
    watch.observe([restarted(WEB1, 5)], at=NOW + 101 + CRASH_WINDOW_SECONDS)
    watch.terminated(["web-1"], at=NOW + 200)
    watch.observe([restarted(WEB1, 6)], at=NOW + 201 + CRASH_WINDOW_SECONDS)
    assert watch.dies_on_termination() == frozenset()


def test_a_pod_gone_is_forgotten() -> None:
    watch = RemedyWatch()
    watch.observe([WEB1], at=NOW)
    watch.terminated(["web-1"], at=NOW)
    watch.observe([], at=NOW + 1)
    # A new pod of the same name starts at 0 restarts: nothing to compare with.
    watch.observe([restarted(WEB1, 3)], at=NOW + 2)
    assert watch.dies_on_termination() == frozenset()


def test_the_restart_count_is_read_from_every_container() -> None:
    body = {
        "metadata": {"name": "web-1", "namespace": "shop", "uid": "u"},
        "status": {
            "containerStatuses": [{"restartCount": 3}, {"restartCount": 2}, {}],
        },
    }
    assert pod_info_from_body(body).restarts == 5


def test_a_leak_that_dies_on_termination_is_never_terminated_and_is_restarted_instead() -> None:
    groups = [idle_group(WEB1, [40.0] * 50 + [1.0] * 35)]
    owners = [leaking(abandoned={"web-1": 50})]
    calm = run(spec(), [WEB1], [idle_group(WEB1, [40.0] * 10)], owners=owners)
    assert any(isinstance(a, TerminateBackends) for a in calm.actions)  # as a rule...
    fragile = frozenset({"Deployment/web"})
    d = run(spec(), [WEB1], groups, memory=OVER, owners=owners, fragile=fragile)
    assert not any(isinstance(a, TerminateBackends) for a in d.actions)  # ... but not this one
    assert [a.pod for a in d.actions if isinstance(a, RestartPod)] == ["web-1"]
    assert d.restart_cause is plan.RestartCause.DIES_ON_TERMINATION
    calm_fragile = run(
        spec(), [WEB1], [idle_group(WEB1, [40.0] * 10)], owners=owners, fragile=fragile
    )
    assert calm_fragile.actions == ()  # no breach: nothing at all


def test_a_young_pod_that_dies_on_termination_is_restarted_all_the_same() -> None:
    # Found on the sandbox: a node-postgres leak concluded to die on termination filled the
    # server while its pods were younger than minPodAgeSeconds (120 s by default).
    young = pod("web-1", "10.0.0.1", age=30.0)
    groups = [idle_group(young, [40.0] * 70)]
    owners = [leaking(abandoned={"web-1": 70})]
    d = run(spec(), [young], groups, owners=owners, fragile=frozenset({"Deployment/web"}))
    assert [a.pod for a in d.actions if isinstance(a, RestartPod)] == ["web-1"]


def test_a_leak_that_dies_on_termination_is_replaced_one_pod_at_a_time_not_once_a_cooldown() -> (
    None
):
    # A fixed cooldown (60 s by default) cannot hold a leak of a connection a second per pod:
    # its pods are replaced as the leak needs, the next once the last one's replacement is ready.
    cooling = dataclasses.replace(OVER, cooldown_until=NOW + 30)
    owners = [leaking(abandoned={"web-1": 70})]
    fragile = frozenset({"Deployment/web"})
    groups = [idle_group(WEB1, [40.0] * 70)]
    d = run(spec(), [WEB1, WEB2], groups, memory=cooling, owners=owners, fragile=fragile)
    assert [a.pod for a in d.actions if isinstance(a, RestartPod)] == ["web-1"]
    replacing = dataclasses.replace(WEB2, ready=False)
    held = run(spec(), [WEB1, replacing], groups, memory=cooling, owners=owners, fragile=fragile)
    assert not any(isinstance(a, RestartPod) for a in held.actions)
    assert held.holds[-1][2] == "restarts wait for pod web-2 to be replaced and ready"


def test_when_restarts_wait_a_leak_that_dies_on_termination_is_terminated_for_the_budget() -> None:
    # The last resort: over the budget, its last restart not replaced yet; the alternative to a
    # crash is every client of the server refused.
    replacing = dataclasses.replace(WEB2, terminating=True)
    groups = [idle_group(WEB1, [40.0] * 85)]
    owners = [leaking(abandoned={"web-1": 85})]
    fragile = frozenset({"Deployment/web"})
    d = run(spec(), [WEB1, replacing], groups, memory=OVER, owners=owners, fragile=fragile)
    assert not any(isinstance(a, RestartPod) for a in d.actions)
    (ended,) = [a for a in d.actions if isinstance(a, TerminateBackends)]
    assert len(ended.backends) == 85 - 80  # only back within the budget, never for the line
    assert d.restart_cause is plan.RestartCause.DIES_ON_TERMINATION  # said while it waits
    groups = [idle_group(WEB1, [40.0] * 70)]
    within = run(spec(), [WEB1, replacing], groups, owners=owners, fragile=fragile)
    assert not any(isinstance(a, TerminateBackends) for a in within.actions)
