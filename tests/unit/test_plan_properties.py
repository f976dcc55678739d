"""Properties of the plan that must hold for any input (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from connbudget.model.actions import RestartPod, ScalePooler, TerminateBackends
from connbudget.model.observations import BackendGroup, PodInfo
from connbudget.model.spec import BudgetSpec, Step
from connbudget.policy.plan import Level, Memory
from connbudget.policy.usage import is_governed
from unit.builders import NOW, NS, pod, run, spec

STATES = ["idle", "active", "idle in transaction", "idle in transaction (aborted)", None]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[PodInfo], list[BackendGroup]]:
    n = draw(st.integers(min_value=0, max_value=8))
    pods = [
        pod(
            f"p{i}",
            f"10.0.0.{i + 1}",
            app=draw(st.sampled_from(["web", "web", "other"])),
            age=draw(st.floats(min_value=0, max_value=5000)),
            terminating=draw(st.booleans()),
            namespace=draw(st.sampled_from([NS, NS, NS, "elsewhere"])),
        )
        for i in range(n)
    ]
    groups = []
    for i, p in enumerate(pods):
        for state in draw(st.lists(st.sampled_from(STATES), max_size=3, unique=True)):
            idles = draw(st.lists(st.floats(min_value=0, max_value=1000), min_size=1, max_size=40))
            groups.append(
                BackendGroup(
                    database="app",
                    user="app",
                    application_name=p.name,
                    client_addr=p.ip,
                    state=state,
                    count=len(idles),
                    max_idle_seconds=max(idles),
                    oldest_backend_start=NOW - 900,
                    backends=tuple(
                        (i * 1000 + 100 * STATES.index(state) + j, s, NOW - 900)
                        for j, s in enumerate(idles)
                    ),
                )
            )
    return pods, groups


memories = st.builds(
    Memory,
    level=st.sampled_from(list(Level)),
    breach_since=st.one_of(st.none(), st.floats(min_value=NOW - 600, max_value=NOW)),
    cooldown_until=st.one_of(st.none(), st.floats(min_value=NOW - 100, max_value=NOW + 100)),
    episode_since=st.one_of(st.none(), st.floats(min_value=NOW - 600, max_value=NOW)),
    escalation=st.integers(min_value=0, max_value=2),
    cleaned_pods=st.lists(st.sampled_from([f"p{i}" for i in range(8)]), max_size=3).map(tuple),
)


@st.composite
def specs(draw: st.DrawFn) -> BudgetSpec:
    steps = draw(
        st.permutations([s.value for s in Step]).flatmap(
            lambda p: st.integers(min_value=1, max_value=3).map(lambda k: p[:k])
        )
    )
    return spec(
        budget={"maxConnections": draw(st.integers(min_value=1, max_value=120))},
        remediation={
            "dryRun": draw(st.booleans()),
            "breachSeconds": draw(st.integers(min_value=0, max_value=60)),
            "steps": steps,
            "restartPods": {
                "maxPodsPerCycle": draw(st.integers(min_value=1, max_value=3)),
                "method": draw(st.sampled_from(["Evict", "Delete", "RolloutRestart"])),
            },
            "terminateIdle": {"maxPerCycle": draw(st.integers(min_value=1, max_value=60))},
        },
    )


@settings(max_examples=400, deadline=None)
@given(world=worlds(), memory=memories, s=specs(), paused=st.booleans())
def test_the_plan_never_breaks_its_limits(
    world: tuple[list[PodInfo], list[BackendGroup]], memory: Memory, s: BudgetSpec, paused: bool
) -> None:
    pods, groups = world
    d = run(s, pods, groups, memory=memory, paused=paused)
    by_name = {p.name: p for p in pods}
    idle_pids = {pid for g in groups if g.state == "idle" for pid, _, _ in g.idle}
    restarts = [a for a in d.actions if isinstance(a, RestartPod)]
    scalings = [a for a in d.actions if isinstance(a, ScalePooler)]
    terminations = [b for a in d.actions if isinstance(a, TerminateBackends) for b in a.backends]

    # Pause and dry-run: paused plans nothing; a dry-run plan is flagged so it is never carried out.
    if paused:
        assert d.actions == ()
    assert d.dry_run == s.remediation.dry_run
    # Never more than maxPodsPerCycle restarts, nor more than maxPerCycle terminations.
    assert len(restarts) <= s.remediation.restart_pods.max_pods_per_cycle
    assert len(terminations) <= s.remediation.terminate_idle.max_per_cycle
    # No restart or scaling during the cooldown.
    if memory.cooldown_until is not None and memory.cooldown_until > NOW:
        assert restarts == []
        assert scalings == []
    # Only governed, live pods are targeted, and only their idle backends.
    for r in restarts:
        target = by_name[r.pod]
        assert is_governed(target, s.selector, NS)
        assert not target.terminating
        assert NOW - target.created_at >= s.remediation.restart_pods.min_pod_age_seconds
    for b in terminations:
        assert b.pid in idle_pids
        assert is_governed(by_name[b.pod], s.selector, NS)
        assert not by_name[b.pod].terminating
    assert len({b.pid for b in terminations}) == len(terminations)
    # Steps not listed are never taken.
    if Step.RESTART_PODS not in s.remediation.steps:
        assert restarts == []
    if Step.TERMINATE_IDLE not in s.remediation.steps:
        assert terminations == []
